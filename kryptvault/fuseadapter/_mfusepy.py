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
import errno
import logging
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

log = logging.getLogger("kryptvault.fuse")


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

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Every libfuse callback goes through here: -errno for an OSError, EIO (not
        mfusepy's EINVAL) for any other exception, which also gets logged; a
        BaseException stops the loop as in mfusepy. Leaner than mfusepy's own wrapper,
        which formats an error string for every failed lookup."""
        try:
            return func(*args, **kwargs) or 0
        except OSError as e:
            err = e.errno
            if isinstance(err, int) and err > 0:
                return -err
            log.error("FUSE operation %s raised %r", func.__name__, e)
            return -errno.EINVAL
        except Exception:
            log.exception("FUSE operation %s failed", func.__name__)
            return -errno.EIO
        except BaseException as e:
            self._FUSE__critical_exception = e  # mfusepy re-raises it after the loop
            log.critical("FUSE operation %s: %r, stopping", func.__name__, e)
            mfusepy.fuse_exit()
            return -errno.EFAULT

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
        # Offset mode: every entry carries its cookie, so libfuse (3.14) sends real
        # readdirplus entries (in its "whole directory" mode it drops the attributes).
        plus = bool(flags & FUSE_READDIR_PLUS)
        try:
            entries = self.operations.readdir_entries(self._p(path), fip.contents.fh, offset, plus)
        except OSError as e:
            return -(e.errno or errno.EIO)
        st = c_stat()
        size = ctypes.sizeof(st)
        for name, cookie, attrs in entries:
            ctypes.memset(ctypes.byref(st), 0, size)
            if isinstance(attrs, tuple):
                st.st_ino, st.st_mode = attrs
                fill = 0
            else:
                _fill_stat(st, attrs)
                fill = FUSE_FILL_DIR_PLUS
            if filler(buf, name, st, cookie, fill) != 0:
                break
        return 0

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        # Hand the request buffer itself to the filesystem (the store copies what it keeps)
        # instead of mfusepy's string_at() copy of up to 1 MiB.
        data = memoryview(ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte * size)).contents)
        try:
            return int(self.operations.write(self._p(path), data, offset, fip.contents))
        finally:
            data.release()

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        try:
            s, extra_link = self.operations.stat(self._p(path), _fh(fip))
        except OSError as e:
            return -(e.errno or errno.EIO)
        st = buf.contents
        ctypes.memset(buf, 0, ctypes.sizeof(c_stat))
        _fill_stat(st, s)
        if extra_link:
            st.st_nlink += 1
        return 0

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        try:
            ret = self.operations.getxattr_raw(self._p(path), name)
        except OSError as e:
            return -(e.errno or errno.EIO)
        if ret is None:
            return -errno.ENODATA
        if not value:
            return len(ret)
        if len(ret) > size:
            return -errno.ERANGE
        ctypes.memmove(value, ret, len(ret))
        return len(ret)


def _fill_stat(st: Any, s: Any) -> None:
    st.st_ino = s.ino
    st.st_mode = s.mode
    st.st_nlink = s.nlink
    st.st_uid = s.uid
    st.st_gid = s.gid
    st.st_rdev = s.rdev
    st.st_size = s.size
    st.st_blocks = s.blocks
    st.st_blksize = s.blksize
    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(s.atime_ns, 1_000_000_000)
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(s.mtime_ns, 1_000_000_000)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(s.ctime_ns, 1_000_000_000)
