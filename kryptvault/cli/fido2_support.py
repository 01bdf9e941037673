"""Enrolling a FIDO2 security key (`init --token fido2`, `token add --new-token fido2`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import click

from kryptvault.cli.secrets_input import SecretSource, read_secret
from kryptvault.container.keyslots import TokenFactor
from kryptvault.crypto.secret import Secret
from kryptvault.errors import TokenError, UsageError
from kryptvault.token.fido2key import (
    FIDO2_SPEC,
    Authenticator,
    Fido2Identity,
    authenticators_for,
    enroll,
    hmac_secret,
    is_fido2_spec,
)

__all__ = ["enrol_factor", "is_fido2_spec", "pick_authenticator", "pin_asker", "reopen", "touch_notice"]


def pin_asker(pin_file: Path | None) -> Callable[[], Secret]:
    source = SecretSource(file=pin_file)
    return lambda: read_secret(source, "Security key PIN: ", what="PIN")


def touch_notice(line: str) -> None:
    click.echo(line, err=True)


def pick_authenticator(spec: str, enrolled: Iterable[Fido2Identity] = ()) -> Authenticator:
    """The key to enrol: the one at the given path, else the one plugged key that holds
    none of `enrolled` (so the key that opened the vault is not enrolled twice)."""
    plugged = authenticators_for(spec)
    if not plugged:
        raise TokenError("no FIDO2 security key is plugged in")
    chosen: Authenticator | None = None
    try:
        known = list(enrolled)
        fresh = [a for a in plugged if not any(a.holds(i) for i in known)]
        if spec != FIDO2_SPEC and not fresh:
            raise UsageError(f"the security key {plugged[0].describe()} is already enrolled in this vault")
        if not fresh:
            raise UsageError(
                "every plugged security key is already enrolled in this vault: plug in the new one"
            )
        if len(fresh) > 1:
            raise UsageError(
                f"several FIDO2 security keys are plugged ({_names(fresh)}): "
                "choose one with --token fido2:PATH"
            )
        chosen = fresh[0]
        return chosen
    finally:
        for other in plugged:
            if other is not chosen:
                other.close()


def reopen(auth: Authenticator) -> Authenticator:
    """`auth` found again after it was closed (the unlock in between lists every key)."""
    auth.close()
    return authenticators_for(f"{FIDO2_SPEC}:{auth.path}")[0]


def _names(authenticators: list[Authenticator]) -> str:
    return "; ".join(a.describe() for a in authenticators)


def enrol_factor(auth: Authenticator, label: str, ask_pin: Callable[[], Secret]) -> TokenFactor:
    """Make the credential and read its hmac-secret once (two touches): the factor the new
    slot is sealed with. Wipe `factor.secret`. The PIN is asked once for both."""
    asked: list[Secret] = []

    def pin_once() -> Secret:
        if not asked:
            asked.append(ask_pin())
        return asked[0].copy()

    try:
        identity = enroll(auth, ask_pin=pin_once, notice=touch_notice, vault_label=label)
        touch_notice("Touch your security key again to derive the vault's key")
        secret = hmac_secret(auth, identity, ask_pin=pin_once, notice=None)
    finally:
        for pin in asked:
            pin.wipe()
    return TokenFactor(secret, identity.binding(), identity.encode())
