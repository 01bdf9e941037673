"""Plaintext group descriptors: per-chunk last-write generations for key-less incremental
backup (docs/FORMAT.md §4.8). A hint only: never trusted for integrity."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from array import array
from dataclasses import dataclass

from kryptvault.container.layout import Layout

GROUP_MAGIC = b"KVGROUP1"
# 0 8B magic | 8 u64 group index | 16 u64 generation of this write | 24 u32 chunk count
# 28 u32 reserved | 32 chunk count x u64 last-write generation | block_size-32 SHA-256
_HEAD = struct.Struct("<8sQQII")
DESCRIPTOR_OVERHEAD = _HEAD.size + 32  # 64 bytes


@dataclass(frozen=True)
class GroupGeometry:
    block_size: int
    unit_size: int

    @property
    def units_per_chunk(self) -> int:
        return self.block_size // self.unit_size

    @property
    def chunks_per_group(self) -> int:
        return (self.block_size - DESCRIPTOR_OVERHEAD) // 8

    @property
    def units_per_group(self) -> int:
        return self.chunks_per_group * self.units_per_chunk


def _gens_bytes(gens: array) -> bytes:  # type: ignore[type-arg]
    if sys.byteorder == "little":
        return gens.tobytes()
    swapped = array("Q", gens)
    swapped.byteswap()
    return swapped.tobytes()


def encode_descriptor(geom: GroupGeometry, group: int, generation: int, gens: array) -> bytes:  # type: ignore[type-arg]
    cpg = geom.chunks_per_group
    if len(gens) != cpg:
        raise ValueError("descriptor needs one generation per chunk")
    raw = bytearray(geom.block_size)
    _HEAD.pack_into(raw, 0, GROUP_MAGIC, group, generation, cpg, 0)
    raw[_HEAD.size : _HEAD.size + 8 * cpg] = _gens_bytes(gens)
    raw[-32:] = hashlib.sha256(memoryview(raw)[:-32]).digest()
    return bytes(raw)


def decode_descriptor(geom: GroupGeometry, group: int, raw: bytes) -> array | None:  # type: ignore[type-arg]
    """The per-chunk generations, or None if the descriptor is missing, torn or not this group's."""
    cpg = geom.chunks_per_group
    if len(raw) != geom.block_size:
        return None
    magic, index, _gen, count, _res = _HEAD.unpack_from(raw)
    if magic != GROUP_MAGIC or index != group or count != cpg:
        return None
    if hashlib.sha256(memoryview(raw)[:-32]).digest() != raw[-32:]:
        return None
    gens = array("Q")
    gens.frombytes(raw[_HEAD.size : _HEAD.size + 8 * cpg])
    if sys.byteorder != "little":
        gens.byteswap()
    return gens


def changed_chunks_since(
    path_or_fd: str | os.PathLike[str] | int, layout: Layout, generation: int
) -> list[tuple[int, int]]:
    """File byte ranges (offset, length) that may differ from the container as it was at
    `generation`: every chunk last written after it, every group whose descriptor fails
    its checksum (whole group), and always [0, data_offset) (header copies and commit
    slots). Needs no key. Adjacent ranges are merged; ranges are clipped to the file."""
    if isinstance(path_or_fd, int):
        return _changed(path_or_fd, layout, generation)
    fd = os.open(path_or_fd, os.O_RDONLY)
    try:
        return _changed(fd, layout, generation)
    finally:
        os.close(fd)


def _changed(fd: int, layout: Layout, generation: int) -> list[tuple[int, int]]:
    geom = GroupGeometry(layout.block_size, layout.unit_size)
    size = os.fstat(fd).st_size
    out: list[tuple[int, int]] = []

    def add(offset: int, length: int) -> None:
        length = min(length, size - offset)
        if length <= 0:
            return
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))

    add(0, layout.data_offset)
    group_bytes = geom.units_per_group * layout.unit_size
    bs = layout.block_size
    group = 0
    while True:
        start = layout.data_offset + group * group_bytes
        if start >= size:
            break
        gens = decode_descriptor(geom, group, os.pread(fd, bs, start))
        if gens is None:
            add(start, group_bytes)
        else:
            for chunk, gen in enumerate(gens):
                if gen > generation:
                    add(start + chunk * bs, bs)
        group += 1
    return out
