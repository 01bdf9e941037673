"""Keyslots: wrapping the master key under a key-encryption key (FORMAT.md §3).

KEK = HKDF-SHA256(ikm, salt="kryptvault-kek-v1", info = vault UUID || slot index || kind), with
  token+password: ikm = Argon2id(password, slot salt) || token secret || token binding
  recovery:       ikm = the recovery key (20 random bytes)
The master key is sealed with AES-256-GCM under the KEK; the AAD covers the slot's public
fields, so changing a slot's KDF parameters, salt, kind or identity breaks the unwrap.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from kryptvault.container.header import (
    KIND_RECOVERY,
    KIND_TOKEN_PASSWORD,
    MAC_OFFSET,
    Header,
    Keyslot,
)
from kryptvault.crypto.aead import Aead, AuthenticationFailed, new_nonce
from kryptvault.crypto.kdf import ARGON2_SALT_LEN, argon2id, hkdf_sha256
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import Secret, constant_time_equal
from kryptvault.errors import AuthenticationError, IntegrityError, UsageError

MASTER_KEY_LEN = 32
TOKEN_SECRET_LEN = 32
RECOVERY_KEY_LEN = 20
KEK_SALT = b"kryptvault-kek-v1"
SUBKEY_SALT = b"kryptvault-subkey-v1"
_B32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@dataclass
class TokenFactor:
    """What a token contributes to a slot: its secret share and the identity it binds."""

    secret: Secret
    binding: bytes
    identity: bytes


def _kek_info(vault_uuid: uuid.UUID, index: int, kind: int) -> bytes:
    return vault_uuid.bytes + bytes([index, kind])


def derive_password_kek(
    vault_uuid: uuid.UUID,
    index: int,
    slot_salt: bytes,
    params: Argon2Params,
    password: Secret,
    token: TokenFactor,
) -> Secret:
    with argon2id(password, slot_salt, params) as stretched:
        ikm = Secret(len(stretched) + len(token.secret) + len(token.binding) or 1)
        with ikm, stretched.view() as s, token.secret.view() as t, ikm.view() as out:
            out[: len(s)] = s
            out[len(s) : len(s) + len(t)] = t
            out[len(s) + len(t) :] = token.binding
            return hkdf_sha256(ikm, _kek_info(vault_uuid, index, KIND_TOKEN_PASSWORD), salt=KEK_SALT)


def derive_recovery_kek(vault_uuid: uuid.UUID, index: int, recovery_key: Secret) -> Secret:
    return hkdf_sha256(recovery_key, _kek_info(vault_uuid, index, KIND_RECOVERY), salt=KEK_SALT)


def seal_slot(
    vault_uuid: uuid.UUID,
    index: int,
    template: Keyslot,
    kek: Secret,
    master: Secret,
    nonce: bytes | None = None,
) -> Keyslot:
    """Fill in nonce and wrapped key of `template` (its other fields are what the AAD binds)."""
    nonce = nonce or new_nonce()
    aad = template.associated_data(vault_uuid, index)
    with master.view() as key_view:
        wrapped = Aead(kek).seal(nonce, key_view, aad)
    return Keyslot(
        template.kind,
        template.created,
        template.kdf,
        template.salt,
        nonce,
        wrapped,
        template.token_identity,
        template.label,
    )


def open_slot(vault_uuid: uuid.UUID, index: int, slot: Keyslot, kek: Secret) -> Secret | None:
    try:
        return Aead(kek).open_into_secret(
            slot.nonce, slot.wrapped_key, slot.associated_data(vault_uuid, index)
        )
    except AuthenticationFailed:
        return None


def new_password_slot(
    vault_uuid: uuid.UUID,
    index: int,
    master: Secret,
    password: Secret,
    token: TokenFactor,
    params: Argon2Params,
    label: str = "",
) -> Keyslot:
    salt = os.urandom(ARGON2_SALT_LEN)
    template = Keyslot(
        KIND_TOKEN_PASSWORD, int(time.time()), params, salt, bytes(12), bytes(48), token.identity, label
    )
    with derive_password_kek(vault_uuid, index, salt, params, password, token) as kek:
        return seal_slot(vault_uuid, index, template, kek, master)


def new_recovery_slot(
    vault_uuid: uuid.UUID,
    index: int,
    master: Secret,
    recovery_key: Secret,
    label: str = "recovery",
) -> Keyslot:
    template = Keyslot(
        KIND_RECOVERY, int(time.time()), None, bytes(ARGON2_SALT_LEN), bytes(12), bytes(48), b"", label
    )
    with derive_recovery_kek(vault_uuid, index, recovery_key) as kek:
        return seal_slot(vault_uuid, index, template, kek, master)


def unlock_with_password(
    header: Header, password: Secret, token: TokenFactor, candidates: Iterable[int] | None = None
) -> tuple[Secret, int]:
    """Try the token+password slots (only `candidates` when given: the caller knows which
    slots record the token at hand, which saves an Argon2 run per other slot).

    The error cannot say which factor was wrong, and does not pretend to.
    """
    allowed = None if candidates is None else set(candidates)
    for index, slot in header.active_slots():
        if slot.kind != KIND_TOKEN_PASSWORD or (allowed is not None and index not in allowed):
            continue
        assert slot.kdf is not None
        with derive_password_kek(header.vault_uuid, index, slot.salt, slot.kdf, password, token) as kek:
            master = open_slot(header.vault_uuid, index, slot, kek)
        if master is not None:
            return master, index
    raise AuthenticationError("wrong password or wrong token (no keyslot opened)")


def unlock_with_recovery_key(header: Header, recovery_key: Secret) -> tuple[Secret, int]:
    for index, slot in header.active_slots():
        if slot.kind != KIND_RECOVERY:
            continue
        with derive_recovery_kek(header.vault_uuid, index, recovery_key) as kek:
            master = open_slot(header.vault_uuid, index, slot, kek)
        if master is not None:
            return master, index
    raise AuthenticationError("wrong recovery key (no recovery slot opened)")


def subkey(master: Secret, purpose: bytes, vault_uuid: uuid.UUID) -> Secret:
    """Independent keys per purpose (b"data", b"meta", b"header"), so no key serves two roles."""
    return hkdf_sha256(master, purpose + vault_uuid.bytes, salt=SUBKEY_SALT)


def header_mac(header: Header, header_key: Secret) -> bytes:
    with header_key.view() as key_view:
        mac = crypto_hmac.HMAC(key_view, hashes.SHA256())
    body = header.body()
    assert len(body) == MAC_OFFSET
    mac.update(body)
    return mac.finalize()


def authenticate_header(header: Header, master: Secret) -> None:
    with subkey(master, b"header", header.vault_uuid) as key:
        expected = header_mac(header, key)
    if not constant_time_equal(expected, header.mac):
        raise IntegrityError("the container header failed authentication (tampered or damaged)")


def sign_header(header: Header, master: Secret) -> Header:
    from dataclasses import replace

    with subkey(master, b"header", header.vault_uuid) as key:
        return replace(header, mac=header_mac(header, key))


# -- recovery keys: 160 random bits, written down as 8 groups of 4 base32 characters --------


def new_recovery_key() -> Secret:
    return Secret.random(RECOVERY_KEY_LEN)


def format_recovery_key(key: Secret) -> Secret:
    """The printable form, itself a secret (it is the key)."""
    with key.view() as raw:
        bits = int.from_bytes(raw, "big")
    chars = bytearray()
    for shift in range(RECOVERY_KEY_LEN * 8 - 5, -1, -5):
        chars.append(ord(_B32_ALPHABET[(bits >> shift) & 31]))
    del bits
    grouped = bytearray(b"-".join(bytes(chars[i : i + 4]) for i in range(0, len(chars), 4)))
    chars[:] = bytes(len(chars))
    out = Secret.from_bytes(grouped)
    grouped[:] = bytes(len(grouped))
    return out


def parse_recovery_key(text: Secret) -> Secret:
    """Accept the printed form with any case, spaces or dashes; reject anything else."""
    value = 0
    count = 0
    with text.view() as view:
        for byte in view:
            ch = chr(byte).upper()
            if ch in " -\t\r\n":
                continue
            pos = _B32_ALPHABET.find(ch)
            if pos < 0:
                raise UsageError("the recovery key has a character that is not in its alphabet")
            value = (value << 5) | pos
            count += 1
    if count != RECOVERY_KEY_LEN * 8 // 5:
        raise UsageError(f"the recovery key must have {RECOVERY_KEY_LEN * 8 // 5} characters, got {count}")
    raw = bytearray(value.to_bytes(RECOVERY_KEY_LEN, "big"))
    del value
    out = Secret.from_bytes(raw)
    raw[:] = bytes(len(raw))
    return out
