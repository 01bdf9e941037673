"""mfusepy operations: path-based FUSE calls translated to the inode API of kryptvault.fs.

Paths are resolved by walking the cached directories for every call (a few dict lookups,
far cheaper than the FUSE round trip), so renames never leave a stale path cache behind.
Calls that come with an open file (`fi`, raw_fi mode) use its handle. Files unlinked
while open keep a hidden in-memory name (libfuse's ".fuse_hidden" rename, turned into an
unlink by Filesystem.hide) so fstat and friends still resolve.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import stat as statmod
import threading
from collections.abc import Callable
from typing import Any

from kryptvault.fs import CommitScheduler, Filesystem, FsError, Stat
from kryptvault.fs.acl import NAMES as ACL_NAMES
from kryptvault.fuseadapter._mfusepy import Operations, fuse_get_context, libfuse

log = logging.getLogger("kryptvault.fuse")

FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_PARALLEL_DIROPS = 1 << 18
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_CAP_HANDLE_KILLPRIV = 1 << 20
FUSE_CAP_CACHE_SYMLINKS = 1 << 23


_HIDDEN = re.compile(rb"\.fuse_hidden[0-9a-f]{16}")


def _b(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _groups_of(pid: int) -> tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


class _Invalidator:
    """Sends fuse_invalidate_path notifications from a helper thread (see
    KryptvaultOperations._invalidate_aliases)."""

    WAIT = 0.5

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, list[bytes], threading.Event]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def run(self, fuse_ptr: int, paths: list[bytes]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="kryptvault-inval", daemon=True
            )
            self._thread.start()
        done = threading.Event()
        self._queue.put((fuse_ptr, paths, done))
        done.wait(self.WAIT)

    def _loop(self) -> None:
        while True:
            fuse_ptr, paths, done = self._queue.get()
            for p in paths:
                libfuse.fuse_invalidate_path(fuse_ptr, p)
            done.set()


class KryptvaultOperations(Operations):  # type: ignore[misc]
    """The FUSE side of a mounted vault; one instance per mount."""

    use_ns = True

    def __init__(
        self,
        fs: Filesystem,
        *,
        writeback: bool = False,
        keep_cache: bool = True,
        attr_timeout: float = 1.0,
        entry_timeout: float = 1.0,
        negative_timeout: float = 0.0,
        commit_delay: float | None = 5.0,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.fs = fs
        self.writeback = writeback
        self.keep_cache = keep_cache
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.negative_timeout = negative_timeout
        self.commit_delay = commit_delay
        self.on_ready = on_ready
        self.scheduler: CommitScheduler | None = None
        self.negotiated_want = 0
        self._fuse_ptr: int | None = None
        # Hard links: libfuse's path API gives every name its own kernel inode, so after
        # a change through one name the others' cached attributes/pages are invalidated.
        self._aliases: dict[int, set[str]] = {}
        self._alias_lock = threading.Lock()
        self._invalidator = _Invalidator()
        # Paths of open files, so that a lock can drop their cached pages (fuse-facts: an
        # aborted connection still serves page-cache hits to fds that are already open).
        self._open_paths: dict[int, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.use_ino = 1
            config.readdir_ino = 0
            # libfuse renames files unlinked while open to ".fuse_hidden..." names so fstat
            # keeps a path; Filesystem.hide() turns that into an unlink (see there).
            config.hard_remove = 0
            config.nullpath_ok = 0
            config.kernel_cache = 0
            config.auto_cache = 0
            config.direct_io = 0
            config.attr_timeout = self.attr_timeout
            config.entry_timeout = self.entry_timeout
            config.negative_timeout = self.negative_timeout
        if conn is not None:
            want = conn.want
            # The kernel clears set-uid/gid bits itself (it knows the caller's capabilities).
            want &= ~FUSE_CAP_HANDLE_KILLPRIV
            # POSIX_ACL: the kernel enforces ACLs and caches them for permission checks
            # (a readdirplus or revalidation drops the cache, so `ls -l` still asks once
            # per file); the filesystem keeps mode and ACL in step and applies default
            # ACLs. DONT_MASK with it: the umask reaches us unapplied (fuse_context.umask),
            # since a default ACL replaces it (without DONT_MASK the kernel would apply
            # both).
            want |= conn.capable & (
                FUSE_CAP_POSIX_ACL
                | FUSE_CAP_DONT_MASK
                | FUSE_CAP_ATOMIC_O_TRUNC
                | FUSE_CAP_AUTO_INVAL_DATA
                | FUSE_CAP_READDIRPLUS
                | FUSE_CAP_READDIRPLUS_AUTO
                | FUSE_CAP_PARALLEL_DIROPS
                | FUSE_CAP_CACHE_SYMLINKS
            )
            if self.writeback and conn.capable & FUSE_CAP_WRITEBACK_CACHE:
                want |= FUSE_CAP_WRITEBACK_CACHE
            else:
                want &= ~FUSE_CAP_WRITEBACK_CACHE
                self.writeback = False
            conn.want = want
            self.negotiated_want = want
            log.debug("FUSE capable=%#x want=%#x", conn.capable, want)
        try:
            self._fuse_ptr = libfuse.fuse_get_context().contents.fuse
        except (AttributeError, ValueError):  # pragma: no cover
            self._fuse_ptr = None
        if self.commit_delay is not None:
            self.scheduler = CommitScheduler(self.fs, self.commit_delay)
            self.scheduler.start()
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        if self.fs.sealed:
            # A lock aborted the connection and ends the process itself: joining threads
            # and trying a commit here would only take CPU from its last steps.
            return
        if self.scheduler is not None:
            self.scheduler.stop(commit=False)
            self.scheduler = None
        self.fs.close()

    # ------------------------------------------------------------------ helpers
    def _ino(self, path: str | None, fi: Any = None) -> int:
        if fi is not None:
            return self.fs.handle_ino(fi.fh)
        if path is None:
            raise FsError(errno.EBADF)
        return self.fs.resolve(_b(path))

    def _parent(self, path: str) -> tuple[int, bytes]:
        return self.fs.resolve_parent(_b(path))

    @staticmethod
    def _attrs(s: Stat) -> dict[str, int]:
        return {
            "st_ino": s.ino,
            "st_mode": s.mode,
            "st_nlink": s.nlink,
            "st_uid": s.uid,
            "st_gid": s.gid,
            "st_rdev": s.rdev,
            "st_size": s.size,
            "st_blocks": s.blocks,
            "st_blksize": s.blksize,
            "st_atime": s.atime_ns,
            "st_mtime": s.mtime_ns,
            "st_ctime": s.ctime_ns,
        }

    def _note_alias(self, path: str | None, s: Stat) -> None:
        if path is not None and s.nlink > 1 and not statmod.S_ISDIR(s.mode):
            with self._alias_lock:
                self._aliases.setdefault(s.ino, set()).add(path)

    def _invalidate_aliases(self, ino: int, but: str | None) -> None:
        """Drop the kernel's cached attributes/pages of the other names of `ino`.

        The notification runs on a helper thread and is waited for briefly: invalidating
        pages waits for page locks, which a read pending on another name holds until this
        (single-threaded) loop answers it; past the wait the loop goes on and the
        notification completes behind it."""
        if not self._aliases or self._fuse_ptr is None:
            return
        with self._alias_lock:
            paths = [_b(p) for p in self._aliases.get(ino, ()) if p != but]
        if paths:
            self._invalidator.run(self._fuse_ptr, paths)

    def _caller(self) -> tuple[int, int]:
        uid, gid, _pid = fuse_get_context()
        return uid, gid

    @staticmethod
    def _umask() -> int:
        """The creating process's umask (sent by the kernel since protocol 7.12)."""
        return int(libfuse.fuse_get_context().contents.umask)

    def _eio_log(self, path: str | None, ino: int, err: FsError) -> None:
        # The inode number, never the path: file names are plaintext, and the daemon's
        # log outlives the mount (docs/SECURITY.md).
        if err.errno == errno.EIO:
            log.error("kryptvault: I/O error on inode %d: %s", ino, err.strerror)

    # ------------------------------------------------------------------ metadata
    def stat(self, path: str | None, fi: Any = None) -> tuple[Stat, bool]:
        """(attributes, whether libfuse will subtract a hidden name's link) — the fast
        path KvFUSE uses for GETATTR."""
        s = self.fs.getattr(self._ino(path, fi))
        if s.nlink > 1:
            self._note_alias(path, s)
        # libfuse subtracts the hidden name's link from a hidden file's count, but
        # Filesystem.hide() already dropped it: add it back for libfuse to remove.
        hidden = path is not None and ".fuse_hidden" in path and bool(
            _HIDDEN.fullmatch(_b(path).rpartition(b"/")[2])
        )
        return s, hidden

    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        s, hidden = self.stat(path, fh)
        attrs = self._attrs(s)
        if hidden:
            attrs["st_nlink"] += 1
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:  # registered; KvFUSE calls readdir_entries
        return [n.decode("utf-8", "surrogateescape") for n, _, _ in self.readdir_entries(path, fh, 0, False)]

    def readdir_entries(
        self, path: str | None, fh: int, offset: int, plus: bool
    ) -> list[tuple[bytes, int, Stat | tuple[int, int]]]:
        """Entries after cookie `offset` of the directory opened as `fh` (its inode)."""
        return self.fs.readdir_from(fh, offset, plus)

    def opendir(self, path: str) -> int:
        ino = self.fs.resolve(_b(path))
        self.fs.opendir(ino)
        return ino  # the directory handle is its inode number

    def releasedir(self, path: str | None, fh: int) -> int:
        self.fs.releasedir(fh)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        uid, gid = self._caller()
        self.fs.mkdir(parent, name, mode, uid, gid, umask=self._umask())
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        parent, name = self._parent(path)
        uid, gid = self._caller()
        self.fs.mknod(parent, name, mode, dev, uid, gid, umask=self._umask())
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy: `target` is the new link's path, `source` the text it points to.
        parent, name = self._parent(target)
        uid, gid = self._caller()
        self.fs.symlink(parent, name, _b(source), uid, gid)
        return 0

    def readlink(self, path: str) -> str:
        return self.fs.readlink(self._ino(path)).decode("utf-8", "surrogateescape")

    def link(self, target: str, source: str) -> int:
        # mfusepy: `target` is the new name, `source` the existing file.
        ino = self._ino(source)
        parent, name = self._parent(target)
        s = self.fs.link(ino, parent, name)
        self._note_alias(source, s)
        self._note_alias(target, s)
        # libfuse gives the new name its own kernel inode, so the kernel does not see
        # the source's new link count: invalidate every other name, the source included.
        self._invalidate_aliases(ino, target)
        return 0

    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        ino = self.fs.lookup(parent, name)
        self.fs.unlink(parent, name)
        if self._aliases:
            with self._alias_lock:
                names = self._aliases.get(ino)
                if names is not None:
                    names.discard(path)
                    if not names:
                        del self._aliases[ino]
            self._invalidate_aliases(ino, path)
        return 0

    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        self.fs.rmdir(parent, name)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        op, on = self._parent(old)
        np_, nn = self._parent(new)
        if flags == 0 and op == np_ and _HIDDEN.fullmatch(nn):
            self.fs.hide(op, on, nn)
            self._track_rename(old, new)
            return 0
        replaced: int | None = None
        if self._aliases:
            try:
                replaced = self.fs.lookup(np_, nn)
            except FsError:
                replaced = None
        self.fs.rename(op, on, np_, nn, flags)
        self._track_rename(old, new)
        if replaced is not None and replaced in self._aliases:
            self._invalidate_aliases(replaced, new)
        return 0

    def _track_rename(self, old: str, new: str) -> None:
        with self._alias_lock:
            for fh, path in self._open_paths.items():
                if path == old or path.startswith(old + "/"):
                    self._open_paths[fh] = new + path[len(old) :]

    def invalidate_open_files(self) -> int:
        """Drop the kernel's cached pages and attributes of every open file (lock step)."""
        if self._fuse_ptr is None:
            return 0
        with self._alias_lock:
            paths = set(self._open_paths.values())
            for names in self._aliases.values():
                paths |= names
        for path in paths:
            libfuse.fuse_invalidate_path(self._fuse_ptr, _b(path))
        return len(paths)

    def chmod(self, path: str | None, mode: int, fi: Any = None) -> int:
        ino = self._ino(path, fi)
        self.fs.chmod(ino, mode)
        self._invalidate_aliases(ino, path)
        return 0

    def chown(self, path: str | None, uid: int, gid: int, fi: Any = None) -> int:
        ino = self._ino(path, fi)
        cuid, cgid, pid = fuse_get_context()
        groups = (cgid, *_groups_of(pid)) if cuid != 0 and gid != -1 else ()
        self.fs.chown(ino, uid, gid, caller_uid=cuid, caller_groups=groups)
        self._invalidate_aliases(ino, path)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int], fi: Any = None) -> int:
        ino = self._ino(path, fi)
        self.fs.utimens(ino, times[0], times[1])
        self._invalidate_aliases(ino, path)
        return 0

    def truncate(self, path: str | None, length: int, fi: Any = None) -> int:
        ino = self._ino(path, fi)
        self.fs.truncate(ino, length)
        self._invalidate_aliases(ino, path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        s = self.fs.statfs()
        return {
            "f_bsize": s.bsize,
            "f_frsize": s.frsize,
            "f_blocks": s.blocks,
            "f_bfree": s.bfree,
            "f_bavail": s.bavail,
            "f_files": s.files,
            "f_ffree": s.ffree,
            "f_favail": s.favail,
            "f_namemax": s.namemax,
        }

    # ------------------------------------------------------------------ xattrs
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        ino = self._ino(path)
        bname = _b(name)
        if bname not in ACL_NAMES:
            self.fs.setxattr(ino, bname, value, options)
            return 0
        cuid, cgid, pid = fuse_get_context()
        groups = (cgid, *_groups_of(pid)) if cuid != 0 else ()
        self.fs.setxattr(ino, bname, value, options, caller_uid=cuid, caller_groups=groups)
        # The mode may have changed: other names of a hard-linked file must not keep it.
        self._invalidate_aliases(ino, path)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.fs.getxattr(self._ino(path), _b(name))

    def getxattr_raw(self, path: str | None, name: bytes) -> bytes | None:
        """The value, or None for ENODATA (the common answer, kept exception-free)."""
        if not self.fs.xattr_namespace_used(name):
            return None
        return self.fs.getxattr(self._ino(path), name)

    def listxattr(self, path: str) -> list[str]:
        return [n.decode("utf-8", "surrogateescape") for n in self.fs.listxattr(self._ino(path))]

    def removexattr(self, path: str, name: str) -> int:
        ino = self._ino(path)
        bname = _b(name)
        self.fs.removexattr(ino, bname)
        if bname in ACL_NAMES:
            self._invalidate_aliases(ino, path)
        return 0

    # ------------------------------------------------------------------ file data
    def _keep_cache(self, s: Stat) -> bool:
        return self.keep_cache and s.nlink <= 1

    def create(self, path: str, mode: int, fi: Any) -> int:
        parent, name = self._parent(path)
        uid, gid = self._caller()
        _s, fh = self.fs.create(parent, name, mode, fi.flags, uid, gid, umask=self._umask())
        if self.writeback:
            self.fs.set_append(fh, False)
        fi.fh = fh
        with self._alias_lock:
            self._open_paths[fh] = path
        return 0

    def open(self, path: str, fi: Any) -> int:
        ino = self._ino(path)
        s = self.fs.getattr(ino)
        fh = self.fs.open(ino, fi.flags, append_in_fs=not self.writeback)
        fi.fh = fh
        with self._alias_lock:
            self._open_paths[fh] = path
        if self._keep_cache(s):
            fi.keep_cache = 1
        if fi.flags & os.O_TRUNC:
            self._invalidate_aliases(ino, path)
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        try:
            return self.fs.read(fi.fh, offset, size)
        except FsError as e:
            self._eio_log(path, self.fs.handle_ino(fi.fh), e)
            raise

    def write(self, path: str | None, data: bytes | memoryview, offset: int, fi: Any) -> int:
        try:
            n = self.fs.write(fi.fh, offset, data)
        except FsError as e:
            self._eio_log(path, self.fs.handle_ino(fi.fh), e)
            raise
        if self._aliases:
            self._invalidate_aliases(self.fs.handle_ino(fi.fh), path)
        return n

    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fi: Any) -> int:
        try:
            self.fs.fallocate(fi.fh, mode, offset, length)
        except FsError as e:
            self._eio_log(path, self.fs.handle_ino(fi.fh), e)
            raise
        if self._aliases:
            self._invalidate_aliases(self.fs.handle_ino(fi.fh), path)
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        with self._alias_lock:
            self._open_paths.pop(fi.fh, None)
        self.fs.release(fi.fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        self.fs.fsync()
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.fsync()
        return 0
