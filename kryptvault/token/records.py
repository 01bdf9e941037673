"""Rollback records: the highest commit generation seen, per (vault, lineage).

One file per vault, `<vault-uuid>.kvgen`, next to the share file on a token (and, for
mounts with the recovery key, under the local state directory). It holds no secret, so
it can be rewritten often (every few seconds while a vault is mounted) without putting
the share file at risk. Layout (big-endian), specified in docs/TOKEN.md "Rollback records":

    0   8  magic b"KVGENRC1"          16 16  vault UUID
    8   2  version = 1                32 40·n  records: lineage id (16), generation (u64),
    10  2  number of records n             last update, Unix seconds (u64), zero (8)
    12  4  zero                       32+40·n  32  SHA-256 of everything before it

A record only ever rises (`advance`); nothing here lowers one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.durable import replace_file
from kryptvault.errors import TokenError

MAGIC = b"KVGENRC1"
VERSION = 1
SUFFIX = ".kvgen"
MAX_RECORDS = 64
_HEAD = struct.Struct(">8sHHI16s")
_RECORD = struct.Struct(">16sQQ8x")
_DIGEST = 32
_MAX_SIZE = _HEAD.size + MAX_RECORDS * _RECORD.size + _DIGEST


class RecordsDamaged(TokenError):
    pass


@dataclass
class RollbackRecords:
    vault_uuid: uuid.UUID
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # lineage -> (gen, updated)

    def get(self, lineage: bytes) -> int:
        return self.entries.get(lineage, (0, 0))[0]

    def advance(self, lineage: bytes, generation: int) -> bool:
        """Raise the record of `lineage` to `generation`; False if it was already there."""
        if generation <= self.get(lineage):
            return False
        self.entries[lineage] = (generation, int(time.time()))
        if len(self.entries) > MAX_RECORDS:
            # The least recently updated lineage goes: an old side copy, as a rule.
            oldest = min((e[1], k) for k, e in self.entries.items() if k != lineage)[1]
            del self.entries[oldest]
        return True


def records_path(directory: Path, vault_uuid: uuid.UUID) -> Path:
    return directory / f"{vault_uuid}{SUFFIX}"


def encode_records(records: RollbackRecords) -> bytes:
    items = sorted(records.entries.items())
    out = bytearray(_HEAD.pack(MAGIC, VERSION, len(items), 0, records.vault_uuid.bytes))
    for lineage, (gen, stamp) in items:
        out += _RECORD.pack(lineage, gen, stamp)
    out += hashlib.sha256(out).digest()
    return bytes(out)


def decode_records(data: bytes, vault_uuid: uuid.UUID) -> RollbackRecords:
    bad = RecordsDamaged(f"the rollback record file of vault {vault_uuid} is damaged")
    if len(data) < _HEAD.size + _DIGEST or data[:8] != MAGIC:
        raise bad
    _magic, version, count, zero, raw_uuid = _HEAD.unpack_from(data)
    if version != VERSION:
        raise RecordsDamaged(
            f"the rollback record file of vault {vault_uuid} has version {version}; upgrade kryptvault"
        )
    if zero or count > MAX_RECORDS or len(data) != _HEAD.size + count * _RECORD.size + _DIGEST:
        raise bad
    if not hmac.compare_digest(hashlib.sha256(data[:-_DIGEST]).digest(), data[-_DIGEST:]):
        raise bad
    if raw_uuid != vault_uuid.bytes:
        raise bad
    records = RollbackRecords(vault_uuid)
    for i in range(count):
        lineage, gen, stamp = _RECORD.unpack_from(data, _HEAD.size + i * _RECORD.size)
        records.entries[lineage] = (gen, stamp)
    return records


def read_records(directory: Path, vault_uuid: uuid.UUID) -> RollbackRecords:
    """The records in `directory` (none yet: empty). RecordsDamaged if unreadable as such."""
    path = records_path(directory, vault_uuid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return RollbackRecords(vault_uuid)
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror}")
    try:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            data = f.read(_MAX_SIZE + 1)
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror}")
    finally:
        os.close(fd)
    return decode_records(data, vault_uuid)


def write_records(directory: Path, records: RollbackRecords) -> None:
    """Atomically replace the record file: temp file, fsync, rename, fsync (as the share
    file, docs/TOKEN.md: vfat needs the second fsync of the file after the rename)."""
    try:
        replace_file(records_path(directory, records.vault_uuid), encode_records(records))
    except OSError as exc:
        raise TokenError(f"cannot write the rollback record in {directory}: {exc.strerror or exc}")


def advance_records(directory: Path, vault_uuid: uuid.UUID, lineage: bytes, generation: int) -> bool:
    """Read, raise one lineage's record, write back if it rose. A damaged file is replaced
    (its records are lost: a warning for the caller, never a reason to stop a mount)."""
    with _records_lock(directory):
        try:
            records = read_records(directory, vault_uuid)
        except RecordsDamaged:
            records = RollbackRecords(vault_uuid)
        if not records.advance(lineage, generation):
            return False
        write_records(directory, records)
        return True


@contextlib.contextmanager
def _records_lock(directory: Path) -> Iterator[None]:
    """Read-modify-write under an flock on the directory itself: two daemons of one vault
    (the vault and a fork mounted beside it) raise different lineages in one file, and an
    unserialised pair would write back what the other had just raised, lowered again.
    flock on a directory needs no file on the token and works on vfat."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise TokenError(f"cannot open {directory}: {exc.strerror}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
