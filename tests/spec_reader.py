"""An independent reader of the header and keyslots, written from docs/FORMAT.md alone.

It deliberately imports nothing from kryptvault: tests use it to prove that the bytes our
code writes are the bytes the spec describes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER_SIZE = 16384


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


@dataclass
class SpecSlot:
    index: int
    kind: int
    t: int
    m: int
    p: int
    salt: bytes
    nonce: bytes
    wrapped: bytes
    identity: bytes
    raw: bytes


@dataclass
class SpecHeader:
    version: int
    block_size: int
    uuid: bytes
    sequence: int
    slots: list[SpecSlot]
    body: bytes
    mac: bytes


def parse_header_copy(raw: bytes) -> SpecHeader | None:
    """None when the copy is not valid per §2."""
    if len(raw) != HEADER_SIZE or raw[:8] != b"KRYPTVLT":
        return None
    if hashlib.sha256(raw[:16352]).digest() != raw[16352:]:
        return None
    version, suite, bs_log2, unit_log2, nslots = struct.unpack(">HHBBB", raw[8:15])
    if version != 1 or suite != 1 or unit_log2 != 12 or nslots != 16:
        return None
    slots = []
    for i in range(16):
        s = raw[64 + 512 * i : 64 + 512 * (i + 1)]
        if s[0] == 0:
            continue
        t, m, p = struct.unpack(">III", s[16:28])
        (id_len,) = struct.unpack(">H", s[124:126])
        slots.append(SpecSlot(i, s[1], t, m, p, s[32:64], s[64:76], s[76:124], s[126 : 126 + id_len], s))
    (sequence,) = struct.unpack(">Q", raw[32:40])
    return SpecHeader(version, 1 << bs_log2, raw[16:32], sequence, slots, raw[:16320], raw[16320:16352])


def read_container_header(path: str) -> SpecHeader:
    with open(path, "rb") as f:
        copies = [parse_header_copy(f.read(HEADER_SIZE)), parse_header_copy(f.read(HEADER_SIZE))]
    valid = [c for c in copies if c is not None]
    if not valid:
        raise ValueError("no valid header copy")
    return max(valid, key=lambda c: c.sequence)


def slot_aad(uuid: bytes, slot: SpecSlot) -> bytes:
    return b"KVSLOT1" + uuid + bytes([slot.index, slot.kind]) + slot.raw[:64] + slot.raw[124:]


def password_kek(uuid: bytes, slot: SpecSlot, password: bytes, token_secret: bytes, binding: bytes) -> bytes:
    stretched = hash_secret_raw(password, slot.salt, slot.t, slot.m, slot.p, 32, Type.ID, 0x13)
    return hkdf(
        stretched + token_secret + binding, b"kryptvault-kek-v1", uuid + bytes([slot.index, slot.kind])
    )


def unwrap(uuid: bytes, slot: SpecSlot, kek: bytes) -> bytes:
    return AESGCM(kek).decrypt(slot.nonce, slot.wrapped, slot_aad(uuid, slot))


def subkey(master: bytes, purpose: bytes, uuid: bytes) -> bytes:
    return hkdf(master, b"kryptvault-subkey-v1", purpose + uuid)


def header_mac_ok(header: SpecHeader, master: bytes) -> bool:
    key = subkey(master, b"header", header.uuid)
    return hmac.compare_digest(hmac.new(key, header.body, hashlib.sha256).digest(), header.mac)
