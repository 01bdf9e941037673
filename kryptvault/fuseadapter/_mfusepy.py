"""Import mfusepy bound to libfuse3, plus the few wrapper fixes kryptvault needs.

mfusepy picks libfuse2 when both are installed; kryptvault needs libfuse3 (1 MiB writes,
rename flags, readdirplus), so this module asks for it before the first import. Import
`kryptvault.fuseadapter` before anything else imports mfusepy.

`KvFUSE` overrides mfusepy's libfuse3 wrappers where 3.1.1 drops information:
rename flags (RENAME_NOREPLACE/EXCHANGE), the file handle of ftruncate/fchmod/fchown/
futimens (needed for open-but-unlinked files, whose path is NULL), UTIME_NOW/UTIME_OMIT
(mfusepy folds them into a plain number) and readdirplus (full attributes in one reply).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

if "mfusepy" not in sys.modules and not (
    os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME")
):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        import mfusepy
    finally:
        os.environ.pop("FUSE_LIBRARY_NAME", None)
else:
    import mfusepy

if mfusepy.fuse_version_major != 3:  # pragma: no cover - depends on the machine
    raise ImportError(
        f"kryptvault needs libfuse3; mfusepy loaded libfuse {mfusepy.fuse_version_major}."
        f"{mfusepy.fuse_version_minor} (import kryptvault.fuseadapter before mfusepy)"
    )

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
FUSE_READDIR_PLUS = 1
FUSE_FILL_DIR_PLUS = 2

Operations = mfusepy.Operations
FuseOSError = mfusepy.FuseOSError
c_stat = mfusepy.c_stat
fuse_get_context = mfusepy.fuse_get_context
libfuse = mfusepy._libfuse
libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
libfuse.fuse_invalidate_path.restype = ctypes.c_int


def _fh(fip: Any) -> Any:
    return fip.contents if fip else None


def _timespec_ns(ts: Any) -> int:
    if ts.tv_nsec in (UTIME_NOW, UTIME_OMIT):
        return int(ts.tv_nsec)
    return int(ts.tv_sec) * 1_000_000_000 + int(ts.tv_nsec)


class KvFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy.FUSE with raw_fi semantics kept for setattr-family calls (see module doc)."""

    def _p(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(self.operations.rename(self._p(old), self._p(new), flags) or 0)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return int(self.operations.truncate(self._p(path), length, _fh(fip)) or 0)

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return int(self.operations.chmod(self._p(path), mode, _fh(fip)) or 0)

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        if ctypes.c_uint32(uid + 1).value == 0:
            uid = -1
        if ctypes.c_uint32(gid + 1).value == 0:
            gid = -1
        return int(self.operations.chown(self._p(path), uid, gid, _fh(fip)) or 0)

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        if buf:
            times = (_timespec_ns(buf.contents.actime), _timespec_ns(buf.contents.modtime))
        else:
            times = (UTIME_NOW, UTIME_NOW)
        return int(self.operations.utimens(self._p(path), times, _fh(fip)) or 0)

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        plus = bool(flags & FUSE_READDIR_PLUS)
        entries = self.operations.readdir_entries(self._p(path), fip.contents.fh, plus)
        st = c_stat()
        size = ctypes.sizeof(st)
        for name, attrs in entries:
            ctypes.memset(ctypes.byref(st), 0, size)
            fill = 0
            if attrs is not None:
                if plus and len(attrs) > 2:
                    (
                        st.st_ino,
                        st.st_mode,
                        st.st_nlink,
                        st.st_uid,
                        st.st_gid,
                        st.st_rdev,
                        st.st_size,
                        st.st_blocks,
                        st.st_blksize,
                        at,
                        mt,
                        ct,
                    ) = attrs
                    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(at, 1_000_000_000)
                    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(mt, 1_000_000_000)
                    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(ct, 1_000_000_000)
                    fill = FUSE_FILL_DIR_PLUS
                else:
                    st.st_ino, st.st_mode = attrs[0], attrs[1]
            if filler(buf, name, st, 0, fill) != 0:
                break
        return 0
