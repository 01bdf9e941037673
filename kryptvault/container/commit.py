"""Commit records: two 4 KiB slots that alternate (docs/FORMAT.md §4.6)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from kryptvault.container.layout import COMMIT_OFFSETS, COMMIT_SLOT_SIZE
from kryptvault.crypto.aead import NONCE_LEN, TAG_LEN, Aead, AuthenticationFailed
from kryptvault.errors import FormatError, IntegrityError

STORE_FORMAT_VERSION = 1
COMMIT_AAD_MAGIC = b"KVCOMMIT"
COMMIT_PLAINTEXT_SIZE = 256
# plaintext:
#   0 u64 generation            8 u32 store format version (1)
#  12 u32 block size           16 u32 allocation unit size      20 u32 reserved (0)
#  24 56B object-table stream root
#  80 u64 data-area size in units
#  88 u64 data-key encryptions so far
#  96 u64 timestamp, ns since the epoch
# 104 u64 next-oid hint (lowest free oid at commit time)
# 112 144B reserved, zero
_PLAIN = struct.Struct("<QIII4x56sQQQQ")
assert _PLAIN.size == 112
SEALED_SIZE = NONCE_LEN + COMMIT_PLAINTEXT_SIZE + TAG_LEN  # 284 bytes used of 4096


@dataclass(frozen=True)
class CommitRecord:
    generation: int
    block_size: int
    unit_size: int
    table_root: bytes
    total_units: int
    encryptions: int
    timestamp_ns: int
    next_oid: int


def commit_aad(vault_uuid: bytes, slot: int) -> bytes:
    return COMMIT_AAD_MAGIC + vault_uuid + bytes([slot])


def seal_commit(meta: Aead, vault_uuid: bytes, rec: CommitRecord, nonce: bytes) -> bytes:
    """The full 4096-byte slot image: nonce || ciphertext || tag || zero padding."""
    plain = bytearray(COMMIT_PLAINTEXT_SIZE)
    _PLAIN.pack_into(
        plain, 0, rec.generation, STORE_FORMAT_VERSION, rec.block_size, rec.unit_size,
        rec.table_root, rec.total_units, rec.encryptions, rec.timestamp_ns, rec.next_oid,
    )
    slot = rec.generation % 2
    sealed = meta.seal(nonce, plain, commit_aad(vault_uuid, slot))
    image = bytearray(COMMIT_SLOT_SIZE)
    image[:NONCE_LEN] = nonce
    image[NONCE_LEN:SEALED_SIZE] = sealed
    return bytes(image)


def open_commit(meta: Aead, vault_uuid: bytes, slot: int, image: bytes) -> CommitRecord | None:
    """The record in one slot image, or None if it does not authenticate / is not for this slot."""
    if len(image) < SEALED_SIZE:
        return None
    try:
        plain = meta.open(image[:NONCE_LEN], image[NONCE_LEN:SEALED_SIZE], commit_aad(vault_uuid, slot))
    except AuthenticationFailed:
        return None
    gen, version, bs, us, root, total, enc, ts, nxt = _PLAIN.unpack_from(plain)
    if version != STORE_FORMAT_VERSION:
        raise FormatError(f"commit record has store format version {version}; this build reads 1")
    if gen % 2 != slot:
        return None
    return CommitRecord(gen, bs, us, root, total, enc, ts, nxt)


def read_latest_commit(fd: int, meta: Aead, vault_uuid: bytes) -> CommitRecord:
    """The highest generation whose slot authenticates; IntegrityError if neither does."""
    best: CommitRecord | None = None
    for slot, offset in enumerate(COMMIT_OFFSETS):
        rec = open_commit(meta, vault_uuid, slot, os.pread(fd, COMMIT_SLOT_SIZE, offset))
        if rec is not None and (best is None or rec.generation > best.generation):
            best = rec
    if best is None:
        raise IntegrityError(
            "neither commit record authenticates: both commit slots are damaged (or the key is wrong)"
        )
    return best
