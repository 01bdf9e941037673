"""The container header: two alternating copies, keyslots, checksum and MAC (FORMAT.md §2).

A header copy is checksummed so a torn or rotted copy is recognised without secrets, and
MAC-ed with a key derived from the master key so that, once unlocked, tampering shows.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass, field, replace

from kryptvault.container.commit import SEALED_SIZE
from kryptvault.container.layout import (
    CIPHER_SUITE_AES256GCM_HKDF_ARGON2ID,
    COMMIT_OFFSETS,
    COMMIT_SLOT_SIZE,
    DATA_AREA_OFFSET,
    FORMAT_VERSION,
    HEADER_COPY_SIZE,
    HEADER_OFFSETS,
    MAGIC,
    MAX_BLOCK_SIZE_LOG2,
    MIN_BLOCK_SIZE_LOG2,
    Layout,
)
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import constant_time_equal
from kryptvault.errors import FormatError

SLOT_COUNT = 16
SLOT_SIZE = 512
SLOTS_OFFSET = 64
MAC_OFFSET = HEADER_COPY_SIZE - 64
CHECKSUM_OFFSET = HEADER_COPY_SIZE - 32

SLOT_EMPTY = 0
SLOT_ACTIVE = 1
KIND_TOKEN_PASSWORD = 1
KIND_RECOVERY = 2
KIND_NAMES = {KIND_TOKEN_PASSWORD: "token+password", KIND_RECOVERY: "recovery"}

MAX_IDENTITY_LEN = 200
MAX_LABEL_LEN = 64
WRAPPED_KEY_LEN = 48

_FIXED = struct.Struct(">8sHHBBBB16sQQI12x")
_SLOT_HEAD = struct.Struct(">BBHIQIII4x32s12s48sH")
assert _FIXED.size == SLOTS_OFFSET
assert _SLOT_HEAD.size == 126


@dataclass(frozen=True)
class Keyslot:
    kind: int
    created: int
    kdf: Argon2Params | None
    salt: bytes
    nonce: bytes
    wrapped_key: bytes
    token_identity: bytes = b""
    label: str = ""

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"unknown({self.kind})")

    def encode(self) -> bytes:
        kdf = self.kdf or Argon2Params(0, 0, 0)
        label = self.label.encode("utf-8")
        if len(self.token_identity) > MAX_IDENTITY_LEN or len(label) > MAX_LABEL_LEN:
            raise FormatError("keyslot token identity or label too long")
        head = _SLOT_HEAD.pack(
            SLOT_ACTIVE,
            self.kind,
            0,
            0,
            self.created,
            kdf.time_cost,
            kdf.memory_kib,
            kdf.parallelism,
            self.salt,
            self.nonce,
            self.wrapped_key,
            len(self.token_identity),
        )
        body = (
            head
            + self.token_identity.ljust(MAX_IDENTITY_LEN, b"\0")
            + bytes([len(label)])
            + label.ljust(MAX_LABEL_LEN, b"\0")
        )
        return body.ljust(SLOT_SIZE, b"\0")

    @staticmethod
    def decode(raw: bytes) -> Keyslot | None:
        (state, kind, res1, res2, created, t, m, p, salt, nonce, wrapped, id_len) = _SLOT_HEAD.unpack_from(
            raw
        )
        if state == SLOT_EMPTY:
            if any(raw):
                raise FormatError("an empty keyslot holds data")
            return None
        if state != SLOT_ACTIVE or kind not in KIND_NAMES or res1 or res2:
            raise FormatError("a keyslot has an unknown state or kind")
        if id_len > MAX_IDENTITY_LEN:
            raise FormatError("a keyslot's token identity is too long")
        label_off = _SLOT_HEAD.size + MAX_IDENTITY_LEN
        label_len = raw[label_off]
        if label_len > MAX_LABEL_LEN:
            raise FormatError("a keyslot's label is too long")
        identity = raw[_SLOT_HEAD.size : _SLOT_HEAD.size + id_len]
        try:
            label = raw[label_off + 1 : label_off + 1 + label_len].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("a keyslot's label is not UTF-8")
        kdf = Argon2Params(t, m, p) if kind == KIND_TOKEN_PASSWORD else None
        slot = Keyslot(kind, created, kdf, salt, nonce, wrapped, identity, label)
        if slot.encode() != raw:  # padding and reserved bytes must be zero: one canonical form
            raise FormatError("a keyslot has non-zero reserved bytes")
        return slot

    def associated_data(self, vault_uuid: uuid.UUID, index: int) -> bytes:
        """Everything in the slot but the nonce and wrapped key, bound to vault and position."""
        raw = self.encode()
        return b"KVSLOT1" + vault_uuid.bytes + bytes([index, self.kind]) + raw[:64] + raw[124:]


@dataclass(frozen=True)
class Header:
    vault_uuid: uuid.UUID
    sequence: int
    created: int
    layout: Layout
    slots: tuple[Keyslot | None, ...] = field(default=(None,) * SLOT_COUNT)
    version: int = FORMAT_VERSION
    mac: bytes = bytes(32)

    def body(self) -> bytes:
        """Bytes [0, MAC_OFFSET): what the MAC covers."""
        fixed = _FIXED.pack(
            MAGIC,
            self.version,
            CIPHER_SUITE_AES256GCM_HKDF_ARGON2ID,
            self.layout.block_size.bit_length() - 1,
            self.layout.unit_size.bit_length() - 1,
            SLOT_COUNT,
            0,
            self.vault_uuid.bytes,
            self.sequence,
            self.created,
            0,
        )
        slots = b"".join(s.encode() if s else bytes(SLOT_SIZE) for s in self.slots)
        return (fixed + slots).ljust(MAC_OFFSET, b"\0")

    def encode(self) -> bytes:
        covered = self.body() + self.mac
        return covered + hashlib.sha256(covered).digest()

    def with_slots(self, slots: tuple[Keyslot | None, ...]) -> Header:
        return replace(self, slots=slots)

    def active_slots(self) -> list[tuple[int, Keyslot]]:
        return [(i, s) for i, s in enumerate(self.slots) if s is not None]

    def slot_area(self) -> bytes:
        """The encoded keyslots: two copies with equal slot areas unwrap alike."""
        return self.body()[SLOTS_OFFSET : SLOTS_OFFSET + SLOT_COUNT * SLOT_SIZE]


def decode_header(raw: bytes) -> Header:
    """Parse one header copy; FormatError says what is wrong with it."""
    if len(raw) < HEADER_COPY_SIZE:
        raise FormatError("header copy is truncated")
    raw = raw[:HEADER_COPY_SIZE]
    if raw[:8] != MAGIC:
        raise FormatError("no kryptvault magic")
    digest = hashlib.sha256(raw[:CHECKSUM_OFFSET]).digest()
    if not constant_time_equal(digest, raw[CHECKSUM_OFFSET:]):
        raise FormatError("header checksum mismatch")
    (_, version, suite, bs_log2, unit_log2, slot_count, res, uuid_raw, seq, created, flags) = (
        _FIXED.unpack_from(raw)
    )
    if version != FORMAT_VERSION:
        raise FormatError(
            f"unknown format version {version} (this kryptvault reads version {FORMAT_VERSION})"
        )
    if suite != CIPHER_SUITE_AES256GCM_HKDF_ARGON2ID:
        raise FormatError(f"unknown cipher suite {suite}")
    if not MIN_BLOCK_SIZE_LOG2 <= bs_log2 <= MAX_BLOCK_SIZE_LOG2 or unit_log2 != 12:
        raise FormatError("unsupported block geometry")
    if slot_count != SLOT_COUNT or res or flags:
        raise FormatError("unsupported header flags or slot count")
    slots = tuple(
        Keyslot.decode(raw[SLOTS_OFFSET + i * SLOT_SIZE : SLOTS_OFFSET + (i + 1) * SLOT_SIZE])
        for i in range(SLOT_COUNT)
    )
    header = Header(
        vault_uuid=uuid.UUID(bytes=uuid_raw),
        sequence=seq,
        created=created,
        layout=Layout(block_size=1 << bs_log2),
        slots=slots,
        version=version,
        mac=raw[MAC_OFFSET:CHECKSUM_OFFSET],
    )
    if header.encode() != raw:
        raise FormatError("header has non-zero reserved bytes")
    return header


# The bytes of the fixed region that FORMAT.md §1 and §4.6 say are zero and that no
# structure covers: each commit slot's padding after its sealed record, and the reserved
# 24 KiB before the data area. (start, end, name)
ZERO_REGIONS = (
    *(
        (offset + SEALED_SIZE, offset + COMMIT_SLOT_SIZE, f"the padding of commit slot {i}")
        for i, offset in enumerate(COMMIT_OFFSETS)
    ),
    (COMMIT_OFFSETS[-1] + COMMIT_SLOT_SIZE, DATA_AREA_OFFSET, "the reserved area before the data area"),
)
HEADER_REGION = 2 * HEADER_COPY_SIZE


@dataclass(frozen=True)
class HeaderRead:
    header: Header
    copy_index: int
    damaged: tuple[tuple[int, str], ...]  # (copy index, reason) of copies that did not parse
    # The other valid copies, best first: where an unlock falls back to when `header`
    # does not authenticate (a key-less edit can make a forged copy look newest).
    others: tuple[tuple[int, Header], ...] = ()
    raw: bytes = field(default=b"", repr=False)  # both copies as read: was the header changed since?
    nonzero: tuple[str, ...] = ()  # ZERO_REGIONS that are not zero
    # Set while the copies name different vaults and no key has told which is genuine.
    disagreement: str | None = None

    def damage_note(self) -> str | None:
        notes = [self.disagreement] if self.disagreement else []
        if self.damaged:
            names = ", ".join(f"copy {'AB'[i]} ({why})" for i, why in self.damaged)
            notes.append(f"header {names} is damaged; opened with copy {'AB'[self.copy_index]}")
        notes += [f"{what} is not zero" for what in self.nonzero]
        return "; ".join(notes) or None

    def copies(self) -> tuple[tuple[int, Header], ...]:
        return ((self.copy_index, self.header), *self.others)

    def opened_with(self, index: int, failed: list[tuple[int, str]]) -> HeaderRead:
        """This read as it is once copy `index` has authenticated and the copies in
        `failed` have not."""
        header = dict(self.copies())[index]
        copies = dict(self.copies())
        failed = [
            (i, f"names another vault, {copies[i].vault_uuid}"
             if copies[i].vault_uuid != header.vault_uuid else why)
            for i, why in failed
        ]
        # A copy of another vault that was never tried (it ranked below the one that
        # opened) is as damaged as one that failed: it cannot be this vault's header.
        failed += [(i, f"names another vault, {h.vault_uuid}") for i, h in self.others
                   if h.vault_uuid != header.vault_uuid and i not in dict(failed)]
        others = tuple((i, h) for i, h in self.others if i != index and i not in dict(failed))
        return replace(
            self, header=header, copy_index=index, damaged=(*self.damaged, *failed), others=others,
            disagreement=None,
        )


def header_unchanged(fd: int, read: HeaderRead) -> bool:
    """Whether both header copies still hold what `read` saw (for read-modify-write under
    header_lock: the sequence alone cannot tell, a forged copy may carry any sequence)."""
    import os

    return os.pread(fd, HEADER_REGION, 0) == read.raw


def vaults_disagree(copies: list[tuple[int, Header]]) -> str | None:
    """What to tell the user when the valid copies name different vault UUIDs, or None.
    The checksum needs no key, so anyone can edit one copy's UUID; which copy is genuine
    only its keyslots and MAC can tell, once unlocked."""
    if len({h.vault_uuid for _, h in copies}) < 2:
        return None
    named = ", ".join(f"copy {'AB'[i]} says {h.vault_uuid}" for i, h in sorted(copies, key=lambda c: c[0]))
    return (f"the two header copies disagree about the vault ({named}): one of them was altered "
            "or damaged; unlocking it (mount, fsck) finds the genuine one, and "
            "'kryptvault fsck --repair' rewrites the other")


def read_header(fd: int, *, allow_disagreement: bool = False) -> HeaderRead:
    """Both copies, the newest-looking first. Copies naming different vaults are an
    error (FormatError, saying so) unless `allow_disagreement`: for an unlock, which tries
    each copy on its own and so finds the genuine one."""
    import os

    size = os.fstat(fd).st_size
    if size < HEADER_COPY_SIZE:
        head = os.pread(fd, 8, 0)
        if head[:8] == MAGIC[: len(head)] and head:
            raise FormatError("the container is truncated (shorter than one header)")
        raise FormatError("not a kryptvault container")
    results: list[tuple[int, Header]] = []
    damaged: list[tuple[int, str]] = []
    magic_seen = False
    region = os.pread(fd, HEADER_REGION, 0)
    for index, offset in enumerate(HEADER_OFFSETS):
        raw = region[offset : offset + HEADER_COPY_SIZE]
        magic_seen |= raw[:8] == MAGIC
        try:
            results.append((index, decode_header(raw)))
        except FormatError as exc:
            damaged.append((index, str(exc)))
    if not results:
        if not magic_seen:
            raise FormatError("not a kryptvault container")
        versions = [why for _, why in damaged if why.startswith("unknown format version")]
        if versions:
            raise FormatError(versions[0])
        raise FormatError("both header copies are damaged: " + "; ".join(why for _, why in damaged))
    disagreement = vaults_disagree(results)
    if disagreement is not None and not allow_disagreement:
        raise FormatError(disagreement)
    ranked = sorted(results, key=lambda r: r[1].sequence, reverse=True)
    index, header = ranked[0]
    nonzero = tuple(what for start, end, what in ZERO_REGIONS if any(os.pread(fd, end - start, start)))
    return HeaderRead(header, index, tuple(damaged), tuple(ranked[1:]), region, nonzero, disagreement)
