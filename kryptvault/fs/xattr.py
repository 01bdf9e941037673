"""Extended attributes, serialised into an object's aux stream (stream 1).

Format: a sequence of records `u8 name_len, u32 value_len, name, value` (little-endian),
in no particular order; an empty stream means no attributes.
"""

from __future__ import annotations

import errno
import struct

from kryptvault.fs.errors import FsError

XATTR_CREATE = 1
XATTR_REPLACE = 2
NAME_MAX = 255
SIZE_MAX = 65536  # Linux XATTR_SIZE_MAX
LIST_MAX = 65536  # Linux XATTR_LIST_MAX
TOTAL_MAX = 1 << 20  # all attributes of one object together

_REC = struct.Struct("<BI")

# Bits of the root inode's `flags`: "some object has (had) an attribute in this namespace".
NS_USER = 1 << 0
NS_SECURITY = 1 << 1
NS_TRUSTED = 1 << 2
NS_SYSTEM = 1 << 3
NS_OTHER = 1 << 4
NS_TRACKED = 1 << 31  # the bits above are maintained (set by mkfs); without it: all "used"
_NAMESPACES = ((b"user.", NS_USER), (b"security.", NS_SECURITY), (b"trusted.", NS_TRUSTED),
               (b"system.", NS_SYSTEM))


def namespace_bit(name: bytes) -> int:
    for prefix, bit in _NAMESPACES:
        if name.startswith(prefix):
            return bit
    return NS_OTHER


def load(data: bytes) -> dict[bytes, bytes]:
    attrs: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if pos + _REC.size > end:
            raise ValueError("truncated extended attribute record")
        nlen, vlen = _REC.unpack_from(data, pos)
        pos += _REC.size
        if nlen == 0 or pos + nlen + vlen > end:
            raise ValueError("bad extended attribute record")
        name = bytes(data[pos : pos + nlen])
        pos += nlen
        attrs[name] = bytes(data[pos : pos + vlen])
        pos += vlen
    return attrs


def dump(attrs: dict[bytes, bytes]) -> bytes:
    out = bytearray()
    for name, value in attrs.items():
        out += _REC.pack(len(name), len(value))
        out += name
        out += value
    return bytes(out)


def check_set(attrs: dict[bytes, bytes], name: bytes, value: bytes, flags: int) -> None:
    """Raise the errno Linux gives for setting `name` to `value` with `flags`."""
    if flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise FsError(errno.EINVAL)
    check_name(name)
    if len(value) > SIZE_MAX:
        raise FsError(errno.E2BIG)
    exists = name in attrs
    if flags & XATTR_CREATE and exists:
        raise FsError(errno.EEXIST)
    if flags & XATTR_REPLACE and not exists:
        raise FsError(errno.ENODATA)
    total = sum(_REC.size + len(k) + len(v) for k, v in attrs.items() if k != name)
    if total + _REC.size + len(name) + len(value) > TOTAL_MAX:
        raise FsError(errno.ENOSPC)


def check_name(name: bytes) -> None:
    if not name:
        raise FsError(errno.ERANGE)
    if len(name) > NAME_MAX:
        raise FsError(errno.ERANGE)
    if b"\0" in name:
        raise FsError(errno.EINVAL)
