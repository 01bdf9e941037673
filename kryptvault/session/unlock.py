"""Opening a vault: find its token, read the share, ask for the password, unwrap a slot.

This is where the two stacks meet: the container (keyslots) below and the token
(discovery, share files) beside it. Callers hand in how to ask for secrets.
"""

from __future__ import annotations

import contextlib
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
from kryptvault.errors import TokenError
from kryptvault.token.base import Token, TokenIdentity
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


def candidate_slots(header: Header, token: Token) -> list[int]:
    return [i for i, ident in slot_identities(header).items() if ident.matches(token.identity)]


def unlock_container(
    path: Path,
    *,
    token_spec: str | None,
    ask_password: AskSecret,
    ask_recovery_key: AskSecret | None = None,
) -> Unlocked:
    """Open with token + password, or with the recovery key when `ask_recovery_key` is given."""
    read = read_container_header(path)
    header = read.header
    if ask_recovery_key is not None:
        with ask_recovery_key() as text, parse_recovery_key(text) as key:
            master, slot = unlock_with_recovery_key(header, key)
        unlocked = Unlocked(path, read, master, slot)
    else:
        token = find_token(header, token_spec)
        share = token.read_share(header.vault_uuid)
        try:
            factor = token_factor(token, share)
            with factor.secret, ask_password() as password:
                master, slot = unlock_with_password(header, password, factor, candidate_slots(header, token))
        except BaseException:
            share.wipe()
            raise
        unlocked = Unlocked(path, read, master, slot, token, share)
    try:
        authenticate_header(header, unlocked.master)
    except BaseException:
        unlocked.wipe()
        raise
    return unlocked
