"""The requests a FUSE server answers, one method per opcode, over kryptvault.fs.

Node ids are inode numbers (the root is 1 in both), with the filesystem's per-session
generation, so the kernel keeps one inode per vault inode (hard links stay coherent under
the writeback cache). Each method gets the request's node id, caller uid/gid/pid and body
and returns the reply's payload (or raises an OSError: its errno is the answer). How the
requests travel (the loop, replies, notifications, INIT) is server.py's business.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kryptvault.fs import UTIME_NOW, UTIME_OMIT, Filesystem, FsError, Stat
from kryptvault.fs.acl import NAMES as ACL_NAMES
from kryptvault.fuseadapter import wire as w
from kryptvault.fuseadapter.pagecache import STORE_BLOCK, PageCacheFeed

log = logging.getLogger("kryptvault.fuse")

# The writeback cache accepts write(2) before the vault sees the data, so ENOSPC could
# only be told at close/fsync. While the vault has less spare room than this (well above
# what the kernel lets a FUSE mount hold dirty), files are opened for direct I/O instead:
# every write reaches the vault first and fails there with ENOSPC, as before.
WRITEBACK_ROOM = 256 << 20
ROOM_CHECK_INTERVAL = 0.5
_EMPTY = b""
READ_BUFFER = 128 * 1024  # what the kernel asks for at a time in a sequential read

Handler = Callable[[int, int, int, int, memoryview], Any]


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _groups_of(pid: int) -> tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


def _member(gid: int, pid: int) -> Callable[[int], bool]:
    """Whether the caller (primary group `gid`, process `pid`) is in a group."""
    return lambda group: group == gid or group in _groups_of(pid)


def _cstr(body: memoryview, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name at `start`; (name, offset after the NUL)."""
    raw = body[start:].tobytes()
    end = raw.find(b"\0")
    if end < 0:
        raise FsError(errno.EINVAL)
    return raw[:end], start + end + 1


def _attr(s: Stat) -> bytes:
    a_s, a_n = divmod(s.atime_ns, 1_000_000_000)
    m_s, m_n = divmod(s.mtime_ns, 1_000_000_000)
    c_s, c_n = divmod(s.ctime_ns, 1_000_000_000)
    return w.ATTR.pack(
        s.ino, s.size, s.blocks, a_s, m_s, c_s, a_n, m_n, c_n,
        s.mode, s.nlink, s.uid, s.gid, s.rdev, s.blksize, 0,
    )  # fmt: skip


def _drop(counts: dict[int, int], key: int) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class Requests:
    """The per-opcode handlers and the state they share (lookup counts, open handles)."""

    def __init__(
        self,
        fs: Filesystem,
        *,
        writeback: bool,
        attr_timeout: float,
        entry_timeout: float,
        negative_timeout: float,
        store_blocks: bool,
    ) -> None:
        self.fs = fs
        self.writeback = writeback
        self._attr_valid = _split_seconds(attr_timeout)
        self._entry_valid = _split_seconds(entry_timeout)
        self._negative_valid = _split_seconds(negative_timeout)
        self._state_lock = threading.Lock()
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, tuple[int, bool]] = {}  # fh -> (inode, writable)
        self._opens: dict[int, int] = {}  # inode -> open file handles (lock write-back)
        self._direct: set[int] = set()  # handles opened for direct I/O (low on room)
        self._loop_local = threading.local()
        self._room_checked = 0.0
        self._room_low = False
        self.feed = PageCacheFeed(self._notify, fs.generation, stores=store_blocks)
        self.handlers: dict[int, Handler] = {
            w.LOOKUP: self._lookup,
            w.GETATTR: self._getattr,
            w.SETATTR: self._setattr,
            w.READLINK: self._readlink,
            w.SYMLINK: self._symlink,
            w.MKNOD: self._mknod,
            w.MKDIR: self._mkdir,
            w.UNLINK: self._unlink,
            w.RMDIR: self._rmdir,
            w.RENAME: self._rename,
            w.RENAME2: self._rename2,
            w.LINK: self._link,
            w.OPEN: self._open,
            w.READ: self._read,
            w.WRITE: self._write,
            w.STATFS: self._statfs,
            w.RELEASE: self._release,
            w.FSYNC: self._fsync,
            w.FSYNCDIR: self._fsync,
            w.SETXATTR: self._setxattr,
            w.GETXATTR: self._getxattr,
            w.LISTXATTR: self._listxattr,
            w.REMOVEXATTR: self._removexattr,
            w.OPENDIR: self._opendir,
            w.READDIR: self._readdir,
            w.READDIRPLUS: self._readdirplus,
            w.RELEASEDIR: self._releasedir,
            w.CREATE: self._create,
            w.FALLOCATE: self._fallocate,
        }

    def _notify(self, code: int, parts: list[bytes | memoryview]) -> int:
        """Send a notification to the kernel; 0 or the errno it answered (server.py)."""
        raise NotImplementedError

    def _new_entry(self, s: Stat) -> bytes:
        """The entry of a file just made: its number may be a freed one reused."""
        if self.feed.content_changing(s.ino):
            self.feed.stale(s.ino, 0, 0)
        return self._entry(s)

    def _entry(self, s: Stat) -> bytes:
        ino = s.ino
        with self._state_lock:  # _remember, inline: every LOOKUP passes here
            self._lookups[ino] = self._lookups.get(ino, 0) + 1
        ev, evn = self._entry_valid
        av, avn = self._attr_valid
        a_s, a_n = divmod(s.atime_ns, 1_000_000_000)
        m_s, m_n = divmod(s.mtime_ns, 1_000_000_000)
        c_s, c_n = divmod(s.ctime_ns, 1_000_000_000)
        return w.ENTRY_ATTR_OUT.pack(
            ino, self.fs.generation(ino), ev, av, evn, avn,
            ino, s.size, s.blocks, a_s, m_s, c_s, a_n, m_n, c_n,
            s.mode, s.nlink, s.uid, s.gid, s.rdev, s.blksize, 0,
        )  # fmt: skip

    def _attr_out(self, s: Stat) -> bytes:
        av, avn = self._attr_valid
        return w.ATTR_OUT.pack(av, avn, 0) + _attr(s)

    # ------------------------------------------------------------------ lookup counts
    def _remember(self, ino: int) -> None:
        with self._state_lock:
            self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def _forget(self, ino: int, n: int) -> None:
        with self._state_lock:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)

    # ------------------------------------------------------------------ metadata
    def _lookup(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        name, _ = _cstr(body)
        fs = self.fs
        try:
            found = fs.lookup_stat(parent, name)
        except FsError as e:
            if e.errno == errno.ENOENT and self._negative_valid[0] | self._negative_valid[1]:
                ev, evn = self._negative_valid
                return w.ENTRY_OUT.pack(0, 0, ev, 0, evn, 0) + bytes(w.ATTR.size)
            raise
        return self._entry(found)

    def _getattr(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        return self._attr_out(self.fs.getattr(ino))

    def _setattr(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (valid, _pad, _fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _u4,
         new_uid, new_gid, _u5) = w.SETATTR_IN.unpack_from(body)  # fmt: skip
        fs = self.fs
        # The reply carries the attributes after the last change; each change returns
        # them, so a separate getattr (a second stat of the inode) is needed only when
        # nothing after a truncation returned them.
        after: Stat | None = None
        if valid & (w.FATTR_UID | w.FATTR_GID):
            groups = (gid, *_groups_of(pid)) if uid != 0 and valid & w.FATTR_GID else ()
            after = fs.chown(
                ino,
                new_uid if valid & w.FATTR_UID else -1,
                new_gid if valid & w.FATTR_GID else -1,
                caller_uid=uid,
                caller_groups=groups,
            )
        if valid & w.FATTR_SIZE:
            racing_store = self.feed.content_changing(ino)
            fs.truncate(ino, size)
            if racing_store:
                self.feed.stale(ino, 0, 0)
            if valid & w.FATTR_KILL_SUIDGID:
                self._kill_suidgid(ino, gid, pid)
            after = None
        if valid & w.FATTR_MODE:
            after = fs.chmod(ino, mode)
        if valid & (w.FATTR_ATIME | w.FATTR_MTIME):
            a = UTIME_OMIT
            m = UTIME_OMIT
            if valid & w.FATTR_ATIME:
                a = UTIME_NOW if valid & w.FATTR_ATIME_NOW else atime * 1_000_000_000 + atimens
            if valid & w.FATTR_MTIME:
                m = UTIME_NOW if valid & w.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimens
            after = fs.utimens(ino, a, m)
        return self._attr_out(after if after is not None else fs.getattr(ino))

    def _readlink(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        return self.fs.readlink(ino)

    def _symlink(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        name, at = _cstr(body)
        target, _ = _cstr(body, at)
        return self._new_entry(self.fs.symlink(parent, name, target, uid, gid))

    def _mknod(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        mode, rdev, umask, _ = w.MKNOD_IN.unpack_from(body)
        name, _ = _cstr(body, w.MKNOD_IN.size)
        return self._new_entry(self.fs.mknod(parent, name, mode, rdev, uid, gid, umask=umask))

    def _mkdir(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        mode, umask = w.MKDIR_IN.unpack_from(body)
        name, _ = _cstr(body, w.MKDIR_IN.size)
        return self._new_entry(self.fs.mkdir(parent, name, mode, uid, gid, umask=umask))

    def _unlink(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self.fs.unlink(parent, _cstr(body)[0])
        return _EMPTY

    def _rmdir(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self.fs.rmdir(parent, _cstr(body)[0])
        return _EMPTY

    def _rename(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (newdir,) = w.RENAME_IN.unpack_from(body)
        old, at = _cstr(body, w.RENAME_IN.size)
        new, _ = _cstr(body, at)
        self.fs.rename(parent, old, newdir, new, 0)
        return _EMPTY

    def _rename2(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        newdir, flags, _ = w.RENAME2_IN.unpack_from(body)
        old, at = _cstr(body, w.RENAME2_IN.size)
        new, _ = _cstr(body, at)
        self.fs.rename(parent, old, newdir, new, flags)
        return _EMPTY

    def _link(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (old,) = w.LINK_IN.unpack_from(body)
        name, _ = _cstr(body, w.LINK_IN.size)
        return self._entry(self.fs.link(old, parent, name))

    def _statfs(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        s = self.fs.statfs()
        return w.STATFS_OUT.pack(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namemax, s.frsize, 0
        )

    # ------------------------------------------------------------------ xattrs
    def _setxattr(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        size, flags = w.SETXATTR_IN.unpack_from(body)
        name, at = _cstr(body, w.SETXATTR_IN.size)
        value = body[at : at + size].tobytes()
        if name in ACL_NAMES:
            groups = (gid, *_groups_of(pid)) if uid != 0 else ()
            self.fs.setxattr(ino, name, value, flags, caller_uid=uid, caller_groups=groups)
        else:
            self.fs.setxattr(ino, name, value, flags)
        return _EMPTY

    def _getxattr(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        size, _ = w.GETXATTR_IN.unpack_from(body)
        name, _ = _cstr(body, w.GETXATTR_IN.size)
        fs = self.fs
        if not fs.xattr_namespace_used(name):
            raise FsError(errno.ENODATA)
        value = fs.getxattr(ino, name)
        return self._sized(value, size)

    def _listxattr(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        size, _ = w.GETXATTR_IN.unpack_from(body)
        names = self.fs.listxattr(ino)
        return self._sized(b"".join(n + b"\0" for n in names), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return w.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return value

    def _removexattr(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self.fs.removexattr(ino, _cstr(body)[0])
        return _EMPTY

    # ------------------------------------------------------------------ directories
    def _opendir(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self.fs.opendir(ino)
        return w.OPEN_OUT.pack(ino, 0, 0)  # the directory handle is its inode number

    def _releasedir(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self.fs.releasedir(w.RELEASE_IN.unpack_from(body)[0])
        return _EMPTY

    def _readdir(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = w.READ_IN.unpack_from(body)
        out = bytearray()
        pack = w.DIRENT.pack
        for name, cookie, attrs in self.fs.readdir_from(fh, offset, False):
            assert not isinstance(attrs, Stat)  # (ino, type bits) without `plus`
            rec = w.align8(24 + len(name))
            if len(out) + rec > size:
                break
            out += pack(attrs[0], cookie, len(name), attrs[1] >> 12)
            out += name
            out += bytes(rec - 24 - len(name))
        return bytes(out)

    def _readdirplus(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = w.READ_IN.unpack_from(body)
        out = bytearray()
        pack = w.DIRENT.pack
        ev, evn = self._entry_valid
        av, avn = self._attr_valid
        generation = self.fs.generation
        zero_attr = bytes(w.ATTR.size)
        named: list[int] = []
        # Inodes the kernel already holds get no entry: their cached attributes are
        # valid, and refreshing them would make the kernel drop their cached ACLs (so
        # `ls -l` would ask for every file's ACL again on every listing).
        known = self._lookups
        for name, cookie, attrs in self.fs.readdir_from(fh, offset, True):
            rec = w.align8(w.ENTRY_OUT.size + w.ATTR.size + 24 + len(name))
            if len(out) + rec > size:
                break
            # (Stat is a NamedTuple: the test is for Stat, never for tuple.)
            if not isinstance(attrs, Stat) or name in (b".", b"..") or attrs.ino in known:
                # No entry (and no lookup count) for "." and "..": the kernel skips them.
                ino_, mode = (attrs.ino, attrs.mode) if isinstance(attrs, Stat) else (attrs[0], attrs[1])
                out += w.ENTRY_OUT.pack(0, 0, 0, 0, 0, 0)
                out += zero_attr
            else:
                ino_, mode = attrs.ino, attrs.mode
                out += w.ENTRY_OUT.pack(ino_, generation(ino_), ev, av, evn, avn)
                out += _attr(attrs)
                named.append(ino_)
            out += pack(ino_, cookie, len(name), (mode & 0o170000) >> 12)
            out += name
            out += bytes(rec - w.ENTRY_OUT.size - w.ATTR.size - 24 - len(name))
        if named:
            with self._state_lock:
                lookups = self._lookups
                for i in named:
                    lookups[i] = lookups.get(i, 0) + 1
        return bytes(out)

    # ------------------------------------------------------------------ file data
    def _low_on_room(self) -> bool:
        now = time.monotonic()
        if now - self._room_checked >= ROOM_CHECK_INTERVAL:
            self._room_checked = now
            try:
                self._room_low = self.fs.spare_room() < WRITEBACK_ROOM
            except OSError:
                self._room_low = True
        return self._room_low

    def _open_flags(self, fh: int, direct: bool) -> int:
        """The reply's open flags: cached pages are kept (every change comes through
        this mount); direct I/O when asked or when low on room, so that ENOSPC reaches
        write(2)."""
        if direct or (self.writeback and self._low_on_room()):
            with self._state_lock:
                self._direct.add(fh)
            return w.FOPEN_DIRECT_IO
        return w.FOPEN_KEEP_CACHE

    def _opened(self, ino: int, fh: int, writable: bool, racing_store: bool) -> None:
        """Note an open handle. `racing_store`: a page store of older data may be in
        flight (PageCacheFeed.opened), so the pages are dropped after it lands and the
        handle's writes bypass the page cache (see _open_flags)."""
        with self._state_lock:
            self._handles[fh] = (ino, writable)
            self._opens[ino] = self._opens.get(ino, 0) + 1
        if racing_store:
            self.feed.stale(ino, 0, 0)

    def _open(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        flags, open_flags = w.OPEN_IN.unpack_from(body)
        fs = self.fs
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        # Before the open, which may truncate (O_TRUNC): no older page store after it.
        direct = self.feed.opened(ino, writable)
        try:
            fh = fs.open(ino, flags, append_in_fs=not self.writeback)
        except BaseException:
            if writable:
                self.feed.released(ino)
            raise
        self._opened(ino, fh, writable, direct)
        if flags & os.O_TRUNC and open_flags & w.OPEN_KILL_SUIDGID:
            self._kill_suidgid(ino, gid, pid)
        return w.OPEN_OUT.pack(fh, self._open_flags(fh, direct), 0)

    def _create(self, parent: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        flags, mode, umask, _ = w.CREATE_IN.unpack_from(body)
        name, _ = _cstr(body, w.CREATE_IN.size)
        s, fh = self.fs.create(parent, name, mode, flags, uid, gid, umask=umask)
        if self.writeback:
            self.fs.set_append(fh, False)
        direct = self.feed.opened(s.ino, True)
        self._opened(s.ino, fh, True, direct)
        return self._entry(s) + w.OPEN_OUT.pack(fh, self._open_flags(fh, direct), 0)

    def _read(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes | memoryview:
        fh, offset, size, *_ = w.READ_IN.unpack_from(body)
        fs = self.fs
        try:
            # The version first: any change that reaches the vault after it (a write
            # back of a page the kernel holds, a truncate) makes this block's store stale.
            version = self.feed.version(ino)
            # Only a read inside one block is answered from that block: the kernel takes a
            # short reply as a hole and caches zeros for the rest of the request. Reads cross
            # a block boundary often (read-ahead windows start anywhere: an 8 KiB pread
            # 4 KiB before a boundary of a cold file read zeros in its second page).
            # A whole block has nothing left to store either.
            lo = offset % STORE_BLOCK
            crosses = lo + size > STORE_BLOCK
            if crosses or size >= STORE_BLOCK or fh in self._direct or not self.feed.wants(ino):
                out = self._reply_buffer(size)
                return out[: fs.read_into(fh, offset, out)]
            start = offset - lo
            block = fs.read(fh, start, STORE_BLOCK)
        except FsError as e:
            self._eio_log(ino, e)
            raise
        hi = min(len(block), lo + size)
        self.feed.offer(ino, version, start, block, lo, hi)
        return block[lo:hi]

    def _reply_buffer(self, size: int) -> memoryview:
        """`size` bytes of this request loop's own read buffer: the loop writes the reply
        before it takes its next request, so one buffer per loop serves every read, and
        the store decrypts into it (warm in the CPU cache for the reply's copy)."""
        buf: memoryview | None = getattr(self._loop_local, "read_buffer", None)
        if buf is None or len(buf) < size:
            buf = self._loop_local.read_buffer = memoryview(bytearray(max(size, READ_BUFFER)))
        return buf[:size]

    def _kill_suidgid(self, ino: int, gid: int, pid: int) -> None:
        """Clear set-uid/gid as the kernel asked (KILLPRIV_V2). Neither a write nor an
        open reply carries attributes, so the kernel's cached mode is dropped here (from
        this loop: an attribute-only invalidation takes no page or inode lock)."""
        if self.fs.kill_suidgid(ino, _member(gid, pid)):
            self._notify(w.NOTIFY_INVAL_INODE, [w.NOTIFY_INVAL_INODE_OUT.pack(ino, -1, 0)])

    def _write(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, write_flags, *_ = w.READ_IN.unpack_from(body)
        fs = self.fs
        # Before the data reaches the vault: no block read earlier may be stored from now
        # on; one in flight is dropped after it lands.
        if self.feed.content_changing(ino):
            self.feed.stale(ino, offset, size)
        if write_flags & w.WRITE_KILL_SUIDGID:
            self._kill_suidgid(ino, gid, pid)
        data = body[40 : 40 + size]
        try:
            n = fs.write(fh, offset, data)
        except FsError as e:
            self._eio_log(ino, e)
            raise
        finally:
            data.release()
        if fh in self._direct:
            self.feed.stale(ino, offset, n)
        return w.WRITE_OUT.pack(n, 0)

    def _fallocate(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, length, mode, _ = w.FALLOCATE_IN.unpack_from(body)
        racing_store = self.feed.content_changing(ino)
        self.fs.fallocate(fh, mode, offset, length)
        if racing_store:
            self.feed.stale(ino, offset, length)
        return _EMPTY

    def _release(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh = w.RELEASE_IN.unpack_from(body)[0]
        with self._state_lock:
            _ino, writable = self._handles.pop(fh, (ino, False))
            self._direct.discard(fh)
            _drop(self._opens, ino)
        if writable:
            self.feed.released(ino)
        self.fs.release(fh)
        return _EMPTY

    def _fsync(self, ino: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self.fs.fsync()
        return _EMPTY

    @staticmethod
    def _eio_log(ino: int, err: FsError) -> None:
        # The inode number, never a name: names are plaintext and the log outlives the mount.
        if err.errno == errno.EIO:
            log.error("kryptvault: I/O error on inode %d: %s", ino, err.strerror)
