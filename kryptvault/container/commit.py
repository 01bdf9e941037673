"""Commit records: two 4 KiB slots that alternate (docs/FORMAT.md §4.6)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from kryptvault.container.groups import GroupGeometry, decode_descriptor
from kryptvault.container.layout import COMMIT_OFFSETS, COMMIT_SLOT_SIZE, Layout
from kryptvault.crypto.aead import NONCE_LEN, TAG_LEN, Aead, AuthenticationFailed
from kryptvault.errors import FormatError, IntegrityError

STORE_FORMAT_VERSION = 2  # 2: metadata blocks have a second copy (FORMAT.md §4.2 "ditto")
READABLE_STORE_VERSIONS = (1, 2)  # a version-1 container opens; its next commit says 2
COMMIT_AAD_MAGIC = b"KVCOMMIT"
COMMIT_PLAINTEXT_SIZE = 256
# plaintext:
#   0 u64 generation            8 u32 store format version (2; 1 is read)
#  12 u32 block size           16 u32 allocation unit size      20 u32 reserved (0)
#  24 56B object-table stream root
#  80 u64 data-area size in units
#  88 u64 data-key encryptions so far
#  96 u64 timestamp, ns since the epoch
# 104 u64 next-oid hint (lowest free oid at commit time)
# 112 16B lineage id (zero = the vault's original line of commits; see docs/FORMAT.md §4.6)
# 128 128B reserved, zero
_PLAIN = struct.Struct("<QIII4x56sQQQQ16s")
assert _PLAIN.size == 128
LINEAGE_SIZE = 16
ORIGINAL_LINEAGE = bytes(LINEAGE_SIZE)
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
    # A restored copy forked from the vault gets a random one, so that it and the vault
    # it was copied from never share a rollback record (docs/TOKEN.md, "Rollback").
    lineage: bytes = ORIGINAL_LINEAGE


def commit_aad(vault_uuid: bytes, slot: int) -> bytes:
    return COMMIT_AAD_MAGIC + vault_uuid + bytes([slot])


def seal_commit(meta: Aead, vault_uuid: bytes, rec: CommitRecord, nonce: bytes) -> bytes:
    """The full 4096-byte slot image: nonce || ciphertext || tag || zero padding."""
    plain = bytearray(COMMIT_PLAINTEXT_SIZE)
    _PLAIN.pack_into(
        plain, 0, rec.generation, STORE_FORMAT_VERSION, rec.block_size, rec.unit_size,
        rec.table_root, rec.total_units, rec.encryptions, rec.timestamp_ns, rec.next_oid,
        rec.lineage,
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
    gen, version, bs, us, root, total, enc, ts, nxt, lineage = _PLAIN.unpack_from(plain)
    if version not in READABLE_STORE_VERSIONS:
        raise FormatError(f"commit record has store format version {version}; this build reads 1 and 2")
    if gen % 2 != slot:
        return None
    return CommitRecord(gen, bs, us, root, total, enc, ts, nxt, lineage)


def read_latest_commit(fd: int, meta: Aead, vault_uuid: bytes) -> CommitRecord:
    """The highest generation whose slot authenticates; IntegrityError if neither does."""
    return read_commit_slots(fd, meta, vault_uuid).latest


@dataclass(frozen=True)
class CommitSlots:
    """Both slots as read: the record the store opens, and what the other slot holds.

    In a sound container the other slot holds generation latest - 1 (or, right after
    `create()`, zeros). Anything else there is a damaged commit record; `bad_slot` names
    it. Which generation it held cannot be read from it (it does not authenticate), so
    the store decides with the group descriptors whether it was the newer one (§4.6).
    """

    latest: CommitRecord
    latest_slot: int
    other: CommitRecord | None
    bad_slot: int | None

    @property
    def other_slot(self) -> int:
        return 1 - self.latest_slot


def read_commit_slots(fd: int, meta: Aead, vault_uuid: bytes) -> CommitSlots:
    recs: list[CommitRecord | None] = []
    images: list[bytes] = []
    for slot, offset in enumerate(COMMIT_OFFSETS):
        image = os.pread(fd, COMMIT_SLOT_SIZE, offset)
        images.append(image)
        recs.append(open_commit(meta, vault_uuid, slot, image))
    found = [(rec.generation, slot) for slot, rec in enumerate(recs) if rec is not None]
    if not found:
        raise IntegrityError(
            "neither commit record authenticates: both commit slots are damaged (or the key is wrong)"
        )
    _gen, slot = max(found)
    latest = recs[slot]
    assert latest is not None
    other_slot = 1 - slot
    other = recs[other_slot]
    if other is not None and other.generation == latest.generation - 1:
        bad = None
    elif latest.generation == 1 and other is None and not any(images[other_slot]):
        bad = None  # a fresh container: create() zeroes slot 0 and writes generation 1
    else:
        bad = other_slot
    return CommitSlots(latest, slot, other, bad)


@dataclass(frozen=True)
class CommitDamage:
    """A commit slot that should hold a record and does not (docs/FORMAT.md §4.6).

    `newest_lost`: the group descriptors show a commit newer than the record opened
    (`newer_generation`, or None when a torn descriptor leaves it unknown), so the damaged
    slot held the newest generation and the store fell back to `opened_generation`.
    Otherwise the damaged slot held the older record (opened - 1) and nothing is lost.
    """

    slot: int
    opened_generation: int
    newest_lost: bool
    newer_generation: int | None

    def describe(self) -> str:
        if not self.newest_lost:
            return (
                f"commit record slot {self.slot} (generation {self.opened_generation - 1}, the older "
                f"of the two) is damaged; the newest generation {self.opened_generation} is intact"
            )
        lost = (
            f"generation {self.newer_generation}"
            if self.newer_generation is not None
            else f"a generation newer than {self.opened_generation}"
        )
        return (
            f"the newest commit record (slot {self.slot}, {lost}) is damaged or missing: "
            f"the vault fell back to generation {self.opened_generation} and the changes "
            f"of the lost generation are not visible"
        )


def newest_descriptor_generation(fd: int, layout: Layout, total_units: int) -> tuple[int, bool]:
    """(highest generation a group descriptor was written at, whether one was torn).

    Descriptors are written before the commit record (§4.7 step 3), so they still show a
    commit whose record was lost. An all-zero descriptor was never written (a group the
    file grew into without a commit touching it) and says nothing.
    """
    geom = GroupGeometry(layout.block_size, layout.unit_size)
    newest, torn = 0, False
    group_units = geom.units_per_group
    for group in range(-(-max(total_units, 1) // group_units)):
        raw = os.pread(fd, layout.block_size, layout.unit_offset(group * group_units))
        if len(raw) < layout.block_size or not any(raw):
            continue
        gens = decode_descriptor(geom, group, raw)
        if gens is None:
            torn = True
            continue
        newest = max(newest, gens[0])
    return newest, torn


def inspect_commits(
    fd: int, layout: Layout, meta: Aead, vault_uuid: bytes
) -> tuple[CommitSlots, CommitDamage | None]:
    """Both commit slots and, if one is damaged, whether it held the newest generation."""
    slots = read_commit_slots(fd, meta, vault_uuid)
    if slots.bad_slot is None:
        return slots, None
    rec = slots.latest
    newest, torn = newest_descriptor_generation(fd, layout, rec.total_units)
    lost = newest > rec.generation or torn
    newer = newest if newest > rec.generation else None
    return slots, CommitDamage(slots.bad_slot, rec.generation, lost, newer)
