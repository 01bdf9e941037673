"""Opening a vault: find its token, read the share, ask for the password, unwrap a slot.

This is where the two stacks meet: the container (keyslots) below and the token
(discovery, share files) beside it. Callers hand in how to ask for secrets.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.container.header import KIND_TOKEN_PASSWORD, Header, HeaderRead
from kryptvault.container.keyslots import (
    TokenFactor,
    authenticate_header,
    parse_recovery_key,
    unlock_with_password,
    unlock_with_recovery_key,
)
from kryptvault.container.vault import read_container_header
from kryptvault.crypto.secret import Secret
from kryptvault.errors import AuthenticationError, IntegrityError, KryptvaultError, TokenError
from kryptvault.session.audit import AuditLog, Backoff
from kryptvault.token.base import Token, TokenIdentity
from kryptvault.token.fido2key import (
    Authenticator,
    Fido2Identity,
    authenticators_for,
    find_holder,
    hmac_secret,
    is_fido2_spec,
)
from kryptvault.token.resolve import resolve_token
from kryptvault.token.share import Share

AskSecret = Callable[[], Secret]


@dataclass
class Unlocked:
    """An open vault's master key with how it was opened. Wipe it when done."""

    path: Path
    read: HeaderRead
    master: Secret
    slot: int
    token: Token | None = None
    share: Share | None = field(default=None, repr=False)
    # Set when a FIDO2 key opened it (then token and share are None: nothing to read).
    fido2: Fido2Identity | None = None
    authenticator: Authenticator | None = field(default=None, repr=False)
    fido2_secret: Secret | None = field(default=None, repr=False)

    @property
    def header(self) -> Header:
        return self.read.header

    @property
    def vault_uuid(self) -> uuid.UUID:
        return self.read.header.vault_uuid

    def wipe(self) -> None:
        self.master.wipe()
        if self.share is not None:
            self.share.wipe()
        if self.fido2_secret is not None:
            self.fido2_secret.wipe()

    def __enter__(self) -> Unlocked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()


def slot_identities(header: Header) -> dict[int, TokenIdentity]:
    identities: dict[int, TokenIdentity] = {}
    for index, slot in header.active_slots():
        if slot.kind == KIND_TOKEN_PASSWORD and slot.token_identity:
            with contextlib.suppress(TokenError):
                identities[index] = TokenIdentity.decode(slot.token_identity)
    return identities


def fido2_identities(header: Header) -> dict[int, Fido2Identity]:
    identities: dict[int, Fido2Identity] = {}
    for index, slot in header.active_slots():
        if slot.kind == KIND_TOKEN_PASSWORD and Fido2Identity.recorded(slot.token_identity):
            with contextlib.suppress(TokenError):
                identities[index] = Fido2Identity.decode(slot.token_identity)
    return identities


def _fido2_of_read(read: HeaderRead) -> list[Fido2Identity]:
    found: list[Fido2Identity] = []
    for _, header in read.copies():
        for identity in fido2_identities(header).values():
            if identity not in found:
                found.append(identity)
    return found


def find_token(header: Header, spec: str | None) -> Token:
    """The token named by `spec`, or else the plugged token one of the slots records."""
    if spec:
        return resolve_token(spec, vault_uuid=header.vault_uuid)
    identities = [i for i in slot_identities(header).values() if i.kind != "dir"]
    if not identities:
        raise TokenError("this vault's token is a directory: give it with --token PATH")
    errors: list[str] = []
    for identity in identities:
        try:
            return resolve_token(None, vault_uuid=header.vault_uuid, identity=identity)
        except TokenError as exc:
            errors.append(str(exc))
    raise TokenError(errors[0] if len(errors) == 1 else "none of this vault's tokens is plugged in")


def token_factor(token: Token, share: Share) -> TokenFactor:
    return TokenFactor(Secret.from_bytes(share.secret), token.identity.binding(), token.identity.encode())


def opened_factor(unlocked: Unlocked) -> TokenFactor:
    """The token factor that opened `unlocked` (a stick's share or a FIDO2 key's
    hmac-secret), as a fresh copy to re-seal its slot with. Wipe its secret."""
    if unlocked.fido2 is not None and unlocked.fido2_secret is not None:
        identity = unlocked.fido2
        return TokenFactor(unlocked.fido2_secret.copy(), identity.binding(), identity.encode())
    if unlocked.token is None or unlocked.share is None:
        raise TokenError("the vault was opened without a token")
    return token_factor(unlocked.token, unlocked.share)


def candidate_slots(header: Header, token: Token) -> list[int]:
    return [i for i, ident in slot_identities(header).items() if ident.matches(token.identity)]


def unlock_container(
    path: Path,
    *,
    token_spec: str | None,
    ask_password: AskSecret,
    ask_recovery_key: AskSecret | None = None,
    notice: Callable[[str], None] | None = None,
    ask_pin: AskSecret | None = None,
) -> Unlocked:
    """Open with token + password, or with the recovery key when `ask_recovery_key` is given.

    `--token fido2`, or no --token when a plugged FIDO2 key holds a credential of one of
    the slots (found without a touch), opens with the key: `ask_pin` when the slot was
    enrolled with the key's PIN, and "Touch your security key" to `notice` (else stderr).

    Every command that opens a vault comes through here, so here is where a failed
    guess is paid for: the back-off delay before asking, and an `unlock_failed` audit
    entry after a wrong password or recovery key (an `unlock_ok` after a right one).
    `notice` gets the lines meant for the user (the wait); by default they go to stderr
    when it is a terminal (a script's stderr keeps to the one-line error rule).
    """
    say = notice or (_to_stderr if sys.stderr.isatty() else None)
    # Copies that name different vaults are each tried on their own: the one whose
    # keyslot and MAC authenticate is genuine (a key-less edit of one copy's UUID must
    # not make the vault unopenable).
    read = read_container_header(path, allow_disagreement=True)
    vault = read.header.vault_uuid
    vaults = _vaults(read)
    backoff = Backoff()
    # The back-off of every UUID named: editing one copy's UUID must not reset it.
    delay = max(backoff.delay_for(v) for v in vaults)
    if delay > 0:
        if say is not None:
            say(f"waiting {delay:.0f} s after recent failed attempts…")
        time.sleep(delay)
    try:
        unlocked = _unlock(
            path, read, token_spec, ask_password, ask_recovery_key, ask_pin, notice or _to_stderr
        )
    except AuthenticationError:
        for named in vaults:
            backoff.record_failure(named)
        with AuditLog() as audit:
            audit.append(
                "unlock_failed",
                vault=vault,
                container=str(path),
                method="recovery" if ask_recovery_key else "token+password",
            )
        raise
    try:
        vault = unlocked.vault_uuid
        backoff.record_success(vault)
        with AuditLog() as audit:
            audit.append("unlock_ok", vault=vault, slot=unlocked.slot, container=str(path))
    except BaseException:
        unlocked.wipe()
        raise
    return unlocked


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


Opener = Callable[[Header], tuple[Secret, int]]


class _OtherVault(AuthenticationError):
    """A share of one vault tried on a header copy naming another: not an attempt."""


def _vaults(read: HeaderRead) -> list[uuid.UUID]:
    """The vault UUIDs the copies name, the best copy's first."""
    found: list[uuid.UUID] = []
    for _, header in read.copies():
        if header.vault_uuid not in found:
            found.append(header.vault_uuid)
    return found


def _open_some_copy(read: HeaderRead, openers: list[Opener]) -> tuple[HeaderRead, Secret, int, int]:
    """Unwrap a keyslot and authenticate the header, trying the best copy first and then
    the other: which copy is "best" is decided by its sequence number before anything is
    authenticated, so a key-less edit could otherwise make an intact vault unopenable.

    Returns the read as opened (the copies that failed listed as damaged), the master
    key, the slot and which opener worked. Two copies with the same keyslots unwrap
    alike, so a second Argon2 run is spent only where the slots differ.
    """
    outcomes: dict[tuple[bytes, int], tuple[Secret, int] | None] = {}
    failed: list[tuple[int, str]] = []
    errors: list[KryptvaultError] = []
    try:
        for index, header in read.copies():
            area = header.slot_area()
            opened_slot = False
            for n, opener in enumerate(openers):
                if (area, n) not in outcomes:
                    try:
                        master, slot = opener(header)
                    except _OtherVault:
                        continue  # cheap, and nothing to remember for this area
                    except AuthenticationError as exc:
                        outcomes[(area, n)] = None
                        errors.append(exc)
                        continue
                    outcomes[(area, n)] = (master, slot)
                known = outcomes[(area, n)]
                if known is None:
                    continue
                opened_slot = True
                try:
                    authenticate_header(header, known[0])
                except IntegrityError as exc:
                    errors.append(exc)
                    break  # the key is the vault's: this copy's MAC is what is wrong
                outcomes[(area, n)] = None  # handed out, not to be wiped below
                return read.opened_with(index, failed), known[0], known[1], n
            failed.append((index, "failed authentication" if opened_slot else "no keyslot opens it"))
    finally:
        for known in outcomes.values():
            if known is not None:
                known[0].wipe()
    if not errors:
        raise AuthenticationError("no keyslot opens either header copy")
    # Tampering (a slot opened, the MAC did not match) outranks a wrong password.
    raise next((e for e in errors if isinstance(e, IntegrityError)), errors[0])


def _unlock(
    path: Path,
    read: HeaderRead,
    token_spec: str | None,
    ask_password: AskSecret,
    ask_recovery_key: AskSecret | None,
    ask_pin: AskSecret | None = None,
    notice: Callable[[str], None] = _to_stderr,
) -> Unlocked:
    if ask_recovery_key is not None:
        with ask_recovery_key() as text, parse_recovery_key(text) as key:
            opened, master, slot, _ = _open_some_copy(read, [lambda h: unlock_with_recovery_key(h, key)])
        return Unlocked(path, opened, master, slot)
    fido2 = _fido2_of_read(read)
    named = is_fido2_spec(token_spec)
    if named or (not token_spec and fido2):
        holder = _fido2_holder(fido2, token_spec if named else None,
                               required=named or not _has_stick_slots(read))
        if holder is not None:
            return _unlock_fido2(path, read, holder, ask_password, ask_pin, notice)
    token = _find_token_any_copy(read, token_spec)
    vaults = _vaults(read)
    shares: list[tuple[uuid.UUID, Share]] = []
    try:
        missing: TokenError | None = None
        for vault in vaults:
            # The share file is per vault UUID: a copy naming a vault this token has no
            # share for is simply not one this token opens.
            try:
                shares.append((vault, token.read_share(vault)))
            except TokenError as exc:
                missing = missing or exc
                continue
            pending = token.read_pending_share(vault)
            if pending is not None:
                shares.append((vault, pending))
        if not shares:
            assert missing is not None
            raise missing
        factors = [(vault, token_factor(token, share)) for vault, share in shares]
        try:
            with ask_password() as password:
                openers = [_password_opener(password, f, token, vault) for vault, f in factors]
                opened, master, slot, used = _open_some_copy(read, openers)
        finally:
            for _, f in factors:
                f.secret.wipe()
    except BaseException:
        for _, share in shares:
            share.wipe()
        raise
    share = shares.pop(used)[1]
    for _, other in shares:
        other.wipe()
    if used:
        # A rekey stopped between putting the new container in place and making its
        # share the token's share file: finish that (the old share opens nothing now).
        try:
            token.promote_pending_share(share)
        except TokenError as exc:
            _to_stderr(f"warning: could not finish the token's share update: {exc}")
    return Unlocked(path, opened, master, slot, token, share)


def _has_stick_slots(read: HeaderRead) -> bool:
    return any(slot_identities(header) for _, header in read.copies())


def _fido2_holder(
    identities: list[Fido2Identity], spec: str | None, *, required: bool
) -> tuple[Authenticator, Fido2Identity] | None:
    """The plugged key holding one of the credentials (no touch). None, when not
    `required`, lets a vault with both kinds of slot fall back to its stick."""
    if not identities:
        raise TokenError(
            "this vault has no FIDO2 keyslot (enrol a key with 'kryptvault token add --new-token fido2')"
        )
    try:
        authenticators = authenticators_for(spec)
        found = find_holder(authenticators, identities) if authenticators else None
    except TokenError:
        if required:
            raise
        return None  # the vault's stick may be plugged: its path says what is missing
    if found is None and required:
        if not authenticators:
            raise TokenError("no FIDO2 security key is plugged in")
        raise TokenError(
            f"none of the plugged security keys ({len(authenticators)}) holds a credential of this vault"
        )
    return found


def _unlock_fido2(
    path: Path,
    read: HeaderRead,
    holder: tuple[Authenticator, Fido2Identity],
    ask_password: AskSecret,
    ask_pin: AskSecret | None,
    notice: Callable[[str], None],
) -> Unlocked:
    auth, identity = holder
    recorded = identity.encode()

    def opener_for(password: Secret, factor: TokenFactor) -> Opener:
        def opener(header: Header) -> tuple[Secret, int]:
            candidates = [
                i for i, s in header.active_slots()
                if s.kind == KIND_TOKEN_PASSWORD and s.token_identity == recorded
            ]
            return unlock_with_password(header, password, factor, candidates)

        return opener

    # The password first, then the PIN and the touch: the key's timeout runs only
    # while the user is asked to touch.
    with ask_password() as password:
        secret = hmac_secret(auth, identity, ask_pin=ask_pin, notice=notice)
        try:
            factor = TokenFactor(secret, identity.binding(), recorded)
            opened, master, slot, _ = _open_some_copy(read, [opener_for(password, factor)])
        except BaseException:
            secret.wipe()
            raise
    return Unlocked(path, opened, master, slot, fido2=identity, authenticator=auth, fido2_secret=secret)


def _password_opener(password: Secret, factor: TokenFactor, token: Token, vault: uuid.UUID) -> Opener:
    def opener(header: Header) -> tuple[Secret, int]:
        if header.vault_uuid != vault:
            raise _OtherVault("this share belongs to another vault")
        return unlock_with_password(header, password, factor, candidate_slots(header, token))

    return opener


def _find_token_any_copy(read: HeaderRead, spec: str | None) -> Token:
    """The token, found through the best copy's keyslots or else the other copy's."""
    error: TokenError | None = None
    for _, header in read.copies():
        try:
            return find_token(header, spec)
        except TokenError as exc:
            error = error or exc
    assert error is not None
    raise error
