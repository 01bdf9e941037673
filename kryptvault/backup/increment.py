"""Increment files: the bytes of an older version that differ from the next newer one
(a reverse delta), docs/BACKUP.md "Increment file".

    data      the old bytes of every extent, concatenated in extent order
    table     count x (offset u64, length u64): extents of the older version, ascending,
              non-overlapping, each inside [0, size)
    footer    64 bytes: "KVBKINC1", vault UUID (16), version u64, base version u64,
              size u64 (of `version`), base size u64 (of `base version`), count u64
    trailer   SHA-256 of every byte before it

All integers little-endian. Applying an increment to version `base version` (a file of
`base size` bytes) = write every extent at its offset, then truncate to `size`. The same
file is the undo journal of an in-place backup: it is durable before the newer bytes go
into current.kv, and applying it to any partly patched current.kv gives `version` back.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
import uuid
from dataclasses import dataclass

from kryptvault.backup.fsutil import StepHook, read_exact, read_into, write_all
from kryptvault.backup.manifest import ChunkHasher, ChunkSums
from kryptvault.errors import FormatError

INC_MAGIC = b"KVBKINC1"
_FOOTER = struct.Struct("<8s16sQQQQQ")
_EXTENT = struct.Struct("<QQ")
FOOTER_SIZE = _FOOTER.size + 32  # footer + trailer
assert _FOOTER.size == 64
_BUFFER = 1 << 20


class IncrementError(FormatError):
    """An increment file is malformed or damaged."""


class IncrementWriter:
    """Streams an increment into a fresh file; `finish` writes table, footer and trailer."""

    def __init__(self, fd: int, hook: StepHook) -> None:
        self._fd = fd
        self._hook = hook
        self._pos = 0
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._chunks = ChunkHasher()
        self.extents: list[tuple[int, int]] = []
        self.data_bytes = 0

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if not length:
            return
        if self.extents:
            last_off, last_len = self.extents[-1]
            if offset < last_off + last_len:
                raise ValueError("increment extents must ascend without overlap")
            if offset == last_off + last_len:
                self.extents[-1] = (last_off, last_len + length)
            else:
                self.extents.append((offset, length))
        else:
            self.extents.append((offset, length))
        self.data_bytes += length
        self._emit(data)

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._sha.update(data)
        self._chunks.update(data)
        self._buf += data
        if len(self._buf) >= _BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            write_all(self._fd, self._buf, self._pos, self._hook)
            self._pos += len(self._buf)
            self._buf = bytearray()

    def finish(self, vault_uuid: uuid.UUID, version: int, base_version: int, size: int,
               base_size: int) -> ChunkSums:
        for off, length in self.extents:
            self._emit(_EXTENT.pack(off, length))
        self._emit(_FOOTER.pack(INC_MAGIC, vault_uuid.bytes, version, base_version, size, base_size,
                                len(self.extents)))
        self._emit(self._sha.digest())
        self._flush()
        return self._chunks.finish()


@dataclass(frozen=True)
class Increment:
    """A parsed increment (the table and footer; data stays in the file)."""

    fd: int
    vault_uuid: uuid.UUID
    version: int
    base_version: int
    size: int
    base_size: int
    offsets: tuple[int, ...]  # container offsets, ascending
    lengths: tuple[int, ...]
    file_offsets: tuple[int, ...]  # where each extent's bytes start in the file
    file_size: int

    @property
    def data_bytes(self) -> int:
        return sum(self.lengths)

    @classmethod
    def load(cls, fd: int) -> Increment:
        file_size = os.fstat(fd).st_size
        if file_size < FOOTER_SIZE:
            raise IncrementError("increment file is truncated")
        tail = read_exact(fd, _FOOTER.size, file_size - FOOTER_SIZE)
        magic, raw_uuid, version, base_version, size, base_size, count = _FOOTER.unpack(tail)
        if magic != INC_MAGIC:
            raise IncrementError("increment footer is damaged (bad magic)")
        table_at = file_size - FOOTER_SIZE - count * _EXTENT.size
        if count > file_size or table_at < 0:
            raise IncrementError("increment extent table does not fit the file")
        table = read_exact(fd, count * _EXTENT.size, table_at)
        offsets: list[int] = []
        lengths: list[int] = []
        file_offsets: list[int] = []
        pos = 0
        end = 0
        for off, length in _EXTENT.iter_unpack(table):
            if length == 0 or off < end:
                raise IncrementError("increment extents overlap or are empty")
            if off + length > size:
                raise IncrementError("increment extent lies past the version's size")
            offsets.append(off)
            lengths.append(length)
            file_offsets.append(pos)
            pos += length
            end = off + length
        if pos != table_at:
            raise IncrementError("increment data length does not match its extent table")
        return cls(fd, uuid.UUID(bytes=raw_uuid), version, base_version, size, base_size,
                   tuple(offsets), tuple(lengths), tuple(file_offsets), file_size)

    def check_trailer(self) -> bool:
        """True if the trailer matches the whole file (reads all of it)."""
        sha = hashlib.sha256()
        pos, end = 0, self.file_size - 32
        while pos < end:
            data = read_exact(self.fd, min(_BUFFER * 4, end - pos), pos)
            if not data:
                return False
            sha.update(data)
            pos += len(data)
        return sha.digest() == read_exact(self.fd, 32, end)

    def overlay(self, buf: bytearray, start: int) -> None:
        """Write this increment's bytes that fall in [start, start + len(buf)) into buf."""
        end = start + len(buf)
        i = max(0, bisect.bisect_right(self.offsets, start) - 1)
        view = memoryview(buf)
        while i < len(self.offsets):
            off, length = self.offsets[i], self.lengths[i]
            if off >= end:
                break
            lo, hi = max(off, start), min(off + length, end)
            if lo < hi:
                got = read_into(self.fd, view[lo - start : hi - start], self.file_offsets[i] + lo - off)
                if got != hi - lo:
                    raise IncrementError("increment file is shorter than its extent table says")
            i += 1

    def extents_in_file_range(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The container ranges (of `version`) whose bytes lie in file bytes [lo, hi)."""
        out: list[tuple[int, int]] = []
        for off, length, fpos in zip(self.offsets, self.lengths, self.file_offsets, strict=True):
            a, b = max(fpos, lo), min(fpos + length, hi)
            if a < b:
                out.append((off + a - fpos, b - a))
        return out

    def apply(self, fd: int, hook: StepHook) -> None:
        """Turn a file holding `base version` (or any partial patch towards it from `version`)
        into `version`: set the size, then write every extent. Equivalent to the documented
        order (extents never lie past `size`), but frees the grown tail first and writes only
        pieces that differ, so undoing a backup that ran out of space needs no new space.
        The caller fsyncs."""
        os.ftruncate(fd, self.size)
        hook.tick()
        for off, length, fpos in zip(self.offsets, self.lengths, self.file_offsets, strict=True):
            done = 0
            while done < length:
                piece = read_exact(self.fd, min(length - done, _BUFFER), fpos + done)
                if not piece:
                    raise IncrementError("increment file is shorter than its extent table says")
                current = read_exact(fd, len(piece), off + done)
                if current != piece:
                    _write_differences(fd, piece, current, off + done, hook)
                done += len(piece)


def _write_differences(fd: int, want: bytes, have: bytes, offset: int, hook: StepHook) -> None:
    """Write the 4 KiB pieces of `want` that differ from `have` (coalesced)."""
    unit = 4096
    start = -1
    for pos in range(0, len(want), unit):
        same = want[pos : pos + unit] == have[pos : pos + unit]
        if not same and start < 0:
            start = pos
        elif same and start >= 0:
            write_all(fd, want[start:pos], offset + start, hook)
            start = -1
    if start >= 0:
        write_all(fd, want[start:], offset + start, hook)
