"""The 128-byte attribute blob every object carries (ObjectStore.get_attrs/set_attrs).

Byte layout, little-endian, 128 bytes (docs: this module is the definition):

    offset size field
         0    4 mode       u32  st_mode including the S_IFMT type bits
         4    4 uid        u32
         8    4 gid        u32
        12    4 nlink      u32  directories: 2 + number of subdirectories
        16    8 rdev       u64  device number for S_IFCHR/S_IFBLK, else 0
        24    4 flags      u32  0 for every object but the root, where bits 0-4 record
                                "an attribute was ever set in namespace user/security/
                                trusted/system/other" (sticky), bit 31 that these
                                bits are maintained (set by mkfs; see xattr.NS_*)
        28    4 version    u32  ATTR_VERSION (1); 0 means "never initialised"
        32    8 atime_ns   i64  nanoseconds since the Unix epoch
        40    8 mtime_ns   i64
        48    8 ctime_ns   i64
        56    8 btime_ns   i64  birth (creation) time
        64    8 parent     u64  directories: oid of the parent directory (root: itself); else 0
        72   56 reserved   zero

Sizes are not stored here: the ObjectStore keeps the length of each stream.
"""

from __future__ import annotations

import stat
import struct

ATTR_SIZE = 128
ATTR_VERSION = 1
_FORMAT = struct.Struct("<IIIIQIIqqqqQ")
_PAD = bytes(ATTR_SIZE - _FORMAT.size)


class Inode:
    """One object's attributes in memory, plus runtime state that is never stored."""

    __slots__ = (
        "atime_ns",
        "btime_ns",
        "ctime_ns",
        "flags",
        "gid",
        "mode",
        "mtime_ns",
        "nlink",
        "oid",
        "opens",
        "parent",
        "rdev",
        "uid",
        "xattrs",
    )

    def __init__(
        self,
        oid: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        now_ns: int,
        rdev: int = 0,
        parent: int = 0,
    ) -> None:
        self.oid = oid
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.rdev = rdev
        self.flags = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = self.btime_ns = now_ns
        self.parent = parent
        self.opens = 0  # open file handles (runtime only)
        self.xattrs: dict[bytes, bytes] | None = None  # parsed aux stream cache (runtime only)

    def pack(self) -> bytes:
        return (
            _FORMAT.pack(
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.rdev,
                self.flags,
                ATTR_VERSION,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.btime_ns,
                self.parent,
            )
            + _PAD
        )

    @classmethod
    def unpack(cls, oid: int, blob: bytes) -> Inode | None:
        """The inode stored in `blob`, or None for a zeroed (never initialised) blob."""
        if len(blob) < _FORMAT.size:
            raise ValueError(f"attribute blob of object {oid} is {len(blob)} bytes")
        (mode, uid, gid, nlink, rdev, flags, version, at, mt, ct, bt, parent) = _FORMAT.unpack_from(
            blob
        )
        if version == 0 and mode == 0:
            return None
        if version != ATTR_VERSION:
            raise ValueError(f"object {oid} has attribute version {version}")
        node = cls(oid, mode, uid, gid, nlink, 0, rdev, parent)
        node.flags = flags
        node.atime_ns, node.mtime_ns, node.ctime_ns, node.btime_ns = at, mt, ct, bt
        return node

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def dtype(self) -> int:
        """The directory-entry type: the S_IFMT bits shifted down (equals DT_* on Linux)."""
        return (self.mode & 0o170000) >> 12
