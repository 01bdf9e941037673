"""Byte layouts of the object store's small structures (docs/FORMAT.md §4.2).

All integers are little-endian. Everything here is a pure function of its arguments so
that the known-answer vectors in tests/vectors/store/ can be checked without a store.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from kryptvault.crypto.aead import NONCE_LEN, TAG_LEN, new_nonce

# Test hook: the store draws every nonce through this module attribute, so a test can
# swap in a deterministic source (tests/test_store_vectors.py). Never set in production.
nonce_source: Callable[[], bytes] = new_nonce

# --- block pointer: 40 bytes ---------------------------------------------------------
#  0  u64  first allocation unit (index into the data area); 0 = hole
#  8  u16  stored length in allocation units (0 iff hole)
# 10  i16  ditto: chunks from copy 1 to the block's second copy, 0 = one copy (stored
#          as a u16 here; 0 in store format 1, where it was "flags"; FORMAT.md §4.2)
# 12  12B  GCM nonce
# 24  16B  GCM tag
POINTER = struct.Struct("<QHH12s16s")
POINTER_SIZE = POINTER.size
assert POINTER_SIZE == 40
HOLE = bytes(POINTER_SIZE)

# --- stream root: 56 bytes -----------------------------------------------------------
#  0  u64  stream size in bytes
#  8  u8   tree depth (0 = root pointer addresses data block 0 directly)
#  9  7B   reserved, zero
# 16  40B  root block pointer
ROOT = struct.Struct("<QB7x40s")
ROOT_SIZE = ROOT.size
assert ROOT_SIZE == 56
EMPTY_ROOT = bytes(ROOT_SIZE)

# --- object-table entry: 256 bytes ---------------------------------------------------
#   0  u8   flags: bit 0 = in use; other bits zero
#   1  7B   reserved
#   8  56B  stream 0 (data) root
#  64  56B  stream 1 (aux) root
# 120  8B   reserved
# 128 128B  attribute blob (opaque to the store)
ENTRY_SIZE = 256
ENTRY_IN_USE = 0x01
ROOT_OFFSETS = (8, 64)
ATTR_OFFSET = 128
ATTR_SIZE = 128
STREAMS = 2

# --- block AAD: 44 bytes -------------------------------------------------------------
BLOCK_AAD_MAGIC = b"KVBLK1"
BLOCK_AAD = struct.Struct("<6s16sQBBQI")
assert BLOCK_AAD.size == 44


def pack_pointer(unit: int, units: int, nonce: bytes, tag: bytes, flags: int = 0) -> bytes:
    return POINTER.pack(unit, units, flags, nonce, tag)


def unpack_pointer(ptr: bytes | bytearray | memoryview) -> tuple[int, int, int, bytes, bytes]:
    """-> (unit, units, flags, nonce, tag)"""
    unit, units, flags, nonce, tag = POINTER.unpack_from(ptr)
    return unit, units, flags, nonce, tag


def pack_root(size: int, depth: int, ptr: bytes) -> bytes:
    return ROOT.pack(size, depth, ptr)


def unpack_root(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, bytes]:
    """-> (size, depth, root pointer)"""
    size, depth, ptr = ROOT.unpack_from(buf, offset)
    return size, depth, ptr


def block_aad(
    vault_uuid: bytes, oid: int, stream: int, level: int, index: int, stored_len: int
) -> bytes:
    """AAD = "KVBLK1" || uuid || oid u64 || stream u8 || level u8 || index u64 || stored bytes u32."""
    return BLOCK_AAD.pack(BLOCK_AAD_MAGIC, vault_uuid, oid, stream, level, index, stored_len)


_ZEROS = memoryview(bytes(1 << 16))


def stored_units(buf: bytearray | bytes | memoryview, unit_size: int, end: int | None = None) -> int:
    """Units left after stripping trailing all-zero units (0 = the block is all zeros).
    `end`: the caller knows every byte from there on is zero (a stream's last block past
    its size), so the search starts there."""
    n = len(buf) if end is None else max(0, min(end, len(buf)))
    if n and buf[n - 1]:
        return -(-n // unit_size)
    if isinstance(buf, memoryview):
        buf = bytes(buf)
    # Compare from the end, 8 KiB at a time and then unit by unit inside the last chunk
    # with data, with startswith against a view of zeros (a memcmp, no copy): a small
    # file's block is mostly zero tail, and copying it out 512 bytes at a time to compare
    # cost 12-25 us a call (a `stat` of a file being written makes several).
    zeros = _ZEROS if unit_size <= 8192 else memoryview(bytes(unit_size))
    chunk = max(8192 // unit_size, 1) * unit_size
    whole_chunk = zeros[:chunk]
    data_end = n
    while data_end >= chunk and buf.startswith(whole_chunk, data_end - chunk):
        data_end -= chunk
    if data_end < chunk and buf.startswith(zeros[:data_end]):
        return 0
    units = -(-data_end // unit_size)
    unit = zeros[:unit_size]
    while units:
        start = (units - 1) * unit_size
        if not buf.startswith(unit if start + unit_size <= n else zeros[: n - start], start):
            break
        units -= 1
    return units


def seal_block(
    seal: Callable[[bytes, memoryview, bytes], bytes],
    vault_uuid: bytes,
    oid: int,
    stream: int,
    level: int,
    index: int,
    plaintext: bytearray | bytes,
    unit: int,
    unit_size: int,
    nonce: bytes,
) -> tuple[memoryview, bytes]:
    """Encrypt one block's stored form -> (ciphertext to write at `unit`, block pointer).

    An all-zero block yields (empty, HOLE) and consumes no nonce.
    """
    units = stored_units(plaintext, unit_size)
    if units == 0:
        return memoryview(b""), HOLE
    length = units * unit_size
    aad = block_aad(vault_uuid, oid, stream, level, index, length)
    sealed = seal(nonce, memoryview(plaintext)[:length], aad)
    view = memoryview(sealed)
    return view[:length], pack_pointer(unit, units, nonce, bytes(view[length:]))


assert NONCE_LEN == 12 and TAG_LEN == 16
