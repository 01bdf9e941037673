"""Directory entries, serialised into the directory object's data stream (stream 0).

Stream format: the 4-byte magic b"KVD1", then records

    oid u64 | type u8 | name_len u16 | name bytes            (little-endian)

`type` is the entry's S_IFMT >> 12 (the Linux DT_* value); type 0 marks a deleted record
(a tombstone) whose bytes are skipped. Adding an entry appends one record, removing one
rewrites its type byte, replacing the target of a name rewrites its oid and type in
place: each change writes a handful of bytes, never the whole directory. When the
tombstones outgrow the live records the directory is compacted (rewritten and
truncated). Order is irrelevant; names are unique among live records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

MAGIC = b"KVD1"
_REC = struct.Struct("<QBH")
REC_HEADER = _REC.size  # 11
NAME_MAX = 255
_TYPE_OFFSET = 8  # offset of the type byte inside a record
_COMPACT_MIN_DEAD = 4096

Write = tuple[int, bytes]  # (offset in the data stream, bytes to write there)


class Directory:
    """A directory's entries: name -> [oid, type, record offset]."""

    __slots__ = ("dead", "end", "entries")

    def __init__(self) -> None:
        self.entries: dict[bytes, list[int]] = {}
        self.end = len(MAGIC)
        self.dead = 0

    @classmethod
    def new(cls) -> tuple[Directory, bytes]:
        """An empty directory and the bytes of its initial stream."""
        return cls(), MAGIC

    @classmethod
    def load(cls, data: bytes) -> Directory:
        d = cls()
        if not data:
            return d
        if data[:4] != MAGIC:
            raise ValueError("directory stream has a bad magic")
        pos = 4
        end = len(data)
        entries = d.entries
        unpack = _REC.unpack_from
        while pos < end:
            if pos + REC_HEADER > end:
                raise ValueError("truncated directory record")
            oid, typ, nlen = unpack(data, pos)
            stop = pos + REC_HEADER + nlen
            if nlen == 0 or nlen > NAME_MAX or stop > end:
                raise ValueError("bad directory record")
            if typ:
                name = data[pos + REC_HEADER : stop]
                if name in entries:
                    raise ValueError("duplicate directory entry")
                entries[name] = [oid, typ, pos]
            else:
                d.dead += stop - pos
            pos = stop
        d.end = end
        return d

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: bytes) -> list[int] | None:
        return self.entries.get(name)

    def items(self) -> Iterator[tuple[bytes, int, int]]:
        for name, (oid, typ, _) in self.entries.items():
            yield name, oid, typ

    def add(self, name: bytes, oid: int, typ: int) -> Write:
        assert name not in self.entries and typ
        pos = self.end
        record = _REC.pack(oid, typ, len(name)) + name
        self.entries[name] = [oid, typ, pos]
        self.end = pos + len(record)
        return pos, record

    def remove(self, name: bytes) -> Write:
        pos = self.entries.pop(name)[2]
        self.dead += REC_HEADER + len(name)
        return pos + _TYPE_OFFSET, b"\0"

    def replace(self, name: bytes, oid: int, typ: int) -> Write:
        entry = self.entries[name]
        entry[0] = oid
        entry[1] = typ
        return entry[2], _REC.pack(oid, typ, len(name))[: _TYPE_OFFSET + 1]

    def needs_compaction(self) -> bool:
        return self.dead >= _COMPACT_MIN_DEAD and self.dead * 2 > self.end

    def compact(self) -> bytes:
        """Rewrite without tombstones; returns the whole new stream (caller truncates to it)."""
        out = bytearray(MAGIC)
        for name, entry in self.entries.items():
            entry[2] = len(out)
            out += _REC.pack(entry[0], entry[1], len(name))
            out += name
        self.end = len(out)
        self.dead = 0
        return bytes(out)
