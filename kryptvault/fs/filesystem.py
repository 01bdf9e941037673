"""POSIX filesystem semantics over the ObjectStore, addressed by inode number (= object id).

The FUSE adapter resolves paths with `resolve()`/`lookup()` and calls the inode-number API
below. Every method takes the one filesystem lock for its whole (short) duration; errors
are `FsError(errno)`. Changes go to the store at once (data) or to the in-memory inode
cache (attributes, flushed by `commit()`); `commit()` makes everything durable and atomic.

Objects: oid 1 is the root directory. A regular file keeps its bytes in stream 0, a
symlink its target, a directory its entries (directory.py); stream 1 holds the extended
attributes (xattr.py). Permission checks are the kernel's job (`default_permissions`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from kryptvault.errors import IntegrityError
from kryptvault.fs import acl as acls
from kryptvault.fs import xattr as xattrs
from kryptvault.fs.directory import MAGIC as DIR_MAGIC
from kryptvault.fs.directory import NAME_MAX, Directory
from kryptvault.fs.errors import FsError
from kryptvault.fs.inode import Inode
from kryptvault.fs.sealing import SealableLock

log = logging.getLogger("kryptvault.fs")
_T = TypeVar("_T")

ROOT_INO = 1
DATA = 0
AUX = 1

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

SYMLINK_MAX = 4095
LINK_MAX = 65000
MAX_FILE_SIZE = (1 << 63) - 1
BLKSIZE = 65536
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# Clean inodes/directories kept in memory beyond those in use.
CACHE_LIMIT = 20000
# Closed files waiting for idle_work before release seals the oldest itself: a bound on
# the dirty buffers (64 KiB each) that a long burst of small files can hold.
_SEAL_BACKLOG = 64
# Metadata read-ahead (idle_work): how many directories may wait to have their entries'
# inodes loaded, and how full the inode cache may get from it (a real look-up, never
# the read-ahead, is what makes the cache shed clean inodes).
_WARM_DIRS = 64
_WARM_ENTRIES = 4096  # per directory: what waits stays small (64 x 4096 numbers at most)
_WARM_CACHE_SHARE = CACHE_LIMIT * 3 // 4

_S_IFMT = 0o170000
_PERM = 0o7777


class StoreStatsLike(Protocol):
    block_size: int
    total_units: int
    free_units: int
    used_units: int
    objects: int


class StoreLike(Protocol):
    """The part of kryptvault.container.store.ObjectStore the filesystem uses."""

    def allocate_oid(self) -> int: ...
    def free_oid(self, oid: int) -> None: ...
    def oid_in_use(self, oid: int) -> bool: ...
    def iter_oids(self) -> Iterator[int]: ...
    def get_attrs(self, oid: int) -> bytes: ...
    def set_attrs(self, oid: int, attrs: bytes) -> None: ...
    def read(self, oid: int, stream: int, offset: int, size: int) -> bytes: ...
    def read_into(self, oid: int, stream: int, offset: int, out: memoryview) -> int: ...
    def write(
        self, oid: int, stream: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None: ...
    def truncate(self, oid: int, stream: int, size: int) -> None: ...
    def punch(self, oid: int, stream: int, offset: int, length: int) -> None: ...
    def stream_size(self, oid: int, stream: int) -> int: ...
    def stored_bytes(self, oid: int, stream: int) -> int: ...
    def size_and_stored(self, oid: int) -> tuple[int, int]: ...
    def stat_object(self, oid: int) -> tuple[bytes, int, int] | None: ...
    def advise_directory_readahead(self) -> int: ...
    def seal_data(self, oid: int) -> None: ...
    def mark_metadata(self, oid: int) -> None: ...
    def is_metadata(self, oid: int) -> bool: ...
    def commit(self) -> int: ...
    def dirty_bytes(self) -> int: ...
    def statfs(self) -> Any: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def save_problem(self) -> str | None: ...
    def check_room(
        self, data_bytes: int = 0, *, pending_entries: int = 0, freeing: bool = False
    ) -> bool: ...
    def room(self, *, freeing: bool = False) -> int: ...
    def commit_need(self, pending_entries: int = 0) -> int: ...


class Stat(NamedTuple):  # a tuple: a frozen dataclass's __init__ cost ~2 µs per stat
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int


@dataclass(frozen=True, slots=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


@dataclass(slots=True)
class Handle:
    ino: int
    append: bool


def check_name(name: bytes) -> None:
    if not name:
        raise FsError(errno.ENOENT)
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL)


# <linux/time.h>; Python names it only from 3.13 on.
_CLOCK_REALTIME_COARSE: int = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def file_time_ns() -> int:
    """Now, as Linux stamps file times: current_time() reads the coarse real-time clock
    (one tick, 1-4 ms), as local filesystems such as ext4 and tmpfs do. The same clock
    matters under the FUSE writeback cache: the kernel stamps a write itself and skips the
    stamp when the file's times already equal its clock; a file created and written within
    one tick then has no times to write back at close (one SETATTR round trip fewer).
    """
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)


class Filesystem:
    """The filesystem over one ObjectStore. Thread-safe (one lock)."""

    def __init__(
        self,
        store: StoreLike,
        *,
        host_dir: str | None = None,
        clock: Callable[[], int] = file_time_ns,
    ) -> None:
        self.store = store
        self.host_dir = host_dir
        self._now = clock
        self._lock = SealableLock()
        self.last_commit: float | None = None
        self._inodes: dict[int, Inode] = {}
        self._dirty: set[int] = set()
        self._dirs: dict[int, Directory] = {}
        self._handles: dict[int, Handle] = {}
        self._open_dirs: dict[int, int] = {}  # directory ino -> open readdir streams
        # Times each inode number was freed while this filesystem was open: a number the
        # store hands out again is a new file, and the FUSE kernel side must not take it
        # for the old one (its cached pages and attributes): see generation().
        self._freed: dict[int, int] = {}
        self._next_fh = 1
        # Closed files whose data is still in dirty block buffers, oldest first: sealed
        # when the request loops are idle (idle_work), or at once past _SEAL_BACKLOG.
        self._to_seal: dict[int, None] = {}
        # Directories a cold look-up went into, oldest first, each with the entries whose
        # inodes are still to be loaded while the request loops are idle (idle_work):
        # `ls -l`, `find`, `du`, a backup, stat their entries one by one.
        self._to_warm: dict[int, list[int]] = {}
        self._dirty_since: float | None = None
        self.commits = 0
        # Why the last commit failed (None once one succeeds): changes are refused meanwhile.
        self.save_failure: str | None = None
        with self._lock:
            root = self._load(ROOT_INO)
            if root is None or not root.is_dir:
                raise FsError(errno.EIO, "the vault has no root directory")
            self._free_orphans()
            # The first look-ups after a mount would each wait for the disk to bring one
            # directory's block; the kernel can fetch them all meanwhile.
            self.store.advise_directory_readahead()

    # ------------------------------------------------------------------ creation
    @classmethod
    def mkfs(cls, store: StoreLike, uid: int, gid: int, mode: int = 0o755) -> Filesystem:
        """Create the root directory (oid 1) in an empty store, commit, and open it."""
        oid = store.allocate_oid()
        if oid != ROOT_INO:
            raise FsError(errno.EEXIST, f"store is not empty (first free object is {oid})")
        root = Inode(oid, stat.S_IFDIR | (mode & _PERM), uid, gid, 2, file_time_ns(), parent=oid)
        root.flags = xattrs.NS_TRACKED
        store.mark_metadata(oid)  # directory blocks get a second copy (FORMAT.md §4.2)
        store.write(oid, DATA, 0, DIR_MAGIC)
        store.set_attrs(oid, root.pack())
        store.commit()
        return cls(store)

    # ------------------------------------------------------------------ internals
    def _mark(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def _touch(self, node: Inode) -> None:
        self._dirty.add(node.oid)
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def _load(self, oid: int) -> Inode | None:
        node = self._inodes.get(oid)
        if node is not None:
            return node
        if oid <= 0 or not self.store.oid_in_use(oid):
            return None
        try:
            attrs = self.store.get_attrs(oid)
        except IntegrityError as e:
            log.error("object %d: attributes fail to authenticate: %s", oid, e)
            raise FsError(errno.EIO, str(e)) from e
        return self._adopt(oid, attrs)

    def _adopt(self, oid: int, attrs: bytes) -> Inode | None:
        """Decode and cache the inode stored as `attrs`; None for a never-initialised one."""
        try:
            node = Inode.unpack(oid, attrs)
        except ValueError as e:
            log.error("object %d: %s", oid, e)
            raise FsError(errno.EIO, str(e)) from e
        if node is None:
            return None
        if len(self._inodes) >= CACHE_LIMIT:
            self._shrink()
        self._inodes[oid] = node
        return node

    def _stat_of(self, ino: int) -> Stat:
        """`_stat(_get(ino))`; an inode not cached yet comes with its sizes in one store
        call (a cold `stat` of many files is per-call overhead)."""
        node = self._inodes.get(ino)
        if node is not None:
            return self._stat(node)
        if ino <= 0:
            raise FsError(errno.ENOENT)
        try:
            found = self.store.stat_object(ino)
        except IntegrityError as e:
            log.error("object %d: its table entry fails to authenticate: %s", ino, e)
            raise FsError(errno.EIO, str(e)) from e
        if found is None:
            raise FsError(errno.ENOENT)
        attrs, size, stored = found
        node = self._adopt(ino, attrs)
        if node is None:
            raise FsError(errno.ENOENT)
        return self._stat_numbers(node, size, stored)

    def _shrink(self) -> None:
        """Drop clean, unused inodes and directories from the caches."""
        keep = self._dirty.union(self._open_dirs, (ROOT_INO,))
        for oid in [o for o, n in self._inodes.items() if n.opens == 0 and o not in keep]:
            del self._inodes[oid]
        if len(self._dirs) >= CACHE_LIMIT // 4:
            root = self._dirs.get(ROOT_INO)
            self._dirs.clear()
            if root is not None:
                self._dirs[ROOT_INO] = root

    def _get(self, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is None:
            node = self._load(ino)
            if node is None:
                raise FsError(errno.ENOENT)
        return node

    def _dir(self, node: Inode) -> Directory:
        d = self._dirs.get(node.oid)
        if d is not None:
            return d
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        try:
            size = self.store.stream_size(node.oid, DATA)
            data = self.store.read(node.oid, DATA, 0, size) if size else b""
            d = Directory.load(data)
        except IntegrityError as e:
            log.error("directory object %d fails to authenticate: %s", node.oid, e)
            raise FsError(errno.EIO, str(e)) from e
        except ValueError as e:
            log.error("directory object %d is damaged: %s", node.oid, e)
            raise FsError(errno.EIO, str(e)) from e
        if len(self._dirs) >= CACHE_LIMIT // 4:
            self._shrink()
        self._dirs[node.oid] = d
        return d

    def _dir_apply(self, node: Inode, d: Directory, write: tuple[int, bytes]) -> None:
        if not self.store.is_metadata(node.oid):
            self.store.mark_metadata(node.oid)  # made by an older version
        self.store.write(node.oid, DATA, write[0], write[1])
        if d.needs_compaction() and node.oid not in self._open_dirs:
            data = d.compact()
            self.store.write(node.oid, DATA, 0, data)
            self.store.truncate(node.oid, DATA, len(data))

    def _dirnode(self, ino: int) -> tuple[Inode, Directory]:
        node = self._get(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node, self._dir(node)

    def _new(
        self, mode: int, uid: int, gid: int, parent: Inode, rdev: int = 0, umask: int | None = None
    ) -> Inode:
        """A new object, not yet named. `umask` None (symlinks) skips the ACL step;
        otherwise the parent's default ACL, or else the umask, shapes the mode."""
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        acl_attrs: dict[bytes, bytes] = {}
        if umask is not None:
            mode, acl_attrs = self._initial_mode(parent, mode, umask)
        try:
            oid = self.store.allocate_oid()
        except OSError as e:
            raise FsError(e.errno or errno.ENOSPC, str(e)) from e
        if acl_attrs:
            try:
                data = xattrs.dump(acl_attrs)
                self.store.write(oid, AUX, 0, data)
            except OSError as e:
                self.store.free_oid(oid)
                raise FsError(e.errno or errno.EIO, str(e)) from e
        is_dir = stat.S_ISDIR(mode)
        node = Inode(
            oid,
            mode,
            uid,
            gid,
            2 if is_dir else 1,
            self._now(),
            rdev,
            parent.oid if is_dir else 0,
        )
        if acl_attrs:
            node.xattrs = acl_attrs
        self._inodes[oid] = node
        self._touch(node)
        return node

    def _acl_possible(self) -> bool:
        """False while no object of the vault has ever had a system.* attribute (the
        root's sticky namespace bit), so the usual vault pays nothing for ACLs."""
        root = self._inodes.get(ROOT_INO)
        if root is None:
            return True
        return not root.flags & xattrs.NS_TRACKED or bool(root.flags & xattrs.NS_SYSTEM)

    def _stored_acl(self, node: Inode, value: bytes) -> list[acls.Entry]:
        try:
            return acls.parse(value)
        except FsError as e:
            # Only valid ACLs are stored, and the stream is authenticated: a bad one is damage.
            log.error("object %d: stored POSIX ACL is invalid", node.oid)
            raise FsError(errno.EIO, "stored POSIX ACL is invalid") from e

    def _initial_mode(self, parent: Inode, mode: int, umask: int) -> tuple[int, dict[bytes, bytes]]:
        """A new entry's mode and ACL attributes (posix_acl_create): with a default ACL on
        the parent the entry's access ACL is that ACL limited by the requested mode, a new
        directory inherits the default ACL too, and the umask does not apply; without one
        only the umask does (the kernel leaves it to us once FUSE_DONT_MASK is agreed)."""
        if self._acl_possible():
            default = self._xattrs(parent).get(acls.DEFAULT)
            if default is not None:
                access, mode, equivalent = acls.create(self._stored_acl(parent, default), mode)
                attrs: dict[bytes, bytes] = {}
                if not equivalent:
                    attrs[acls.ACCESS] = acls.dump(access)
                if stat.S_ISDIR(mode):
                    attrs[acls.DEFAULT] = default
                return mode, attrs
        return mode & ~(umask & 0o777), {}

    def _link_into(self, parent: Inode, d: Directory, name: bytes, node: Inode) -> None:
        self._dir_apply(parent, d, d.add(name, node.oid, node.dtype))
        now = self._now()
        parent.mtime_ns = parent.ctime_ns = now
        if node.is_dir:
            parent.nlink += 1
        self._touch(parent)

    def _drop_link(self, node: Inode) -> None:
        """One name of `node` is gone: lower nlink, free the object if nothing uses it."""
        if node.is_dir:
            node.nlink = 0
        else:
            node.nlink = max(0, node.nlink - 1)
        node.ctime_ns = self._now()
        self._touch(node)
        if node.nlink == 0 and node.opens == 0 and node.oid not in self._open_dirs:
            self._free(node)  # (a removed directory still open is freed by releasedir)

    def _free(self, node: Inode) -> None:
        oid = node.oid
        self._freed[oid] = self._freed.get(oid, 0) + 1
        self._inodes.pop(oid, None)
        self._dirs.pop(oid, None)
        self._dirty.discard(oid)
        self.store.free_oid(oid)
        self._mark()

    def _free_orphans(self) -> None:
        """Free objects a crash left without a name (nlink 0) or half-created."""
        if self.store.read_only:
            return  # a damaged (read-only) store: fsck's business
        freed = 0
        for oid in list(self.store.iter_oids()):
            if oid == ROOT_INO:
                continue
            try:
                node = Inode.unpack(oid, self.store.get_attrs(oid))
            except (IntegrityError, ValueError) as e:
                log.error("object %d: attributes unreadable (%s); left in place", oid, e)
                continue
            if node is None or node.nlink == 0:
                self.store.free_oid(oid)
                freed += 1
        if freed:
            log.info("freed %d orphaned objects left by an unclean shutdown", freed)
            self.store.commit()

    def _size(self, node: Inode) -> int:
        return self.store.stream_size(node.oid, DATA)

    def _stat(self, node: Inode) -> Stat:
        # What is really stored (holes and stripped zero tails cost nothing), so that
        # `du` of a sparse file shows what the container grew by, not its size.
        size, stored = self.store.size_and_stored(node.oid)
        return self._stat_numbers(node, size, stored)

    @staticmethod
    def _stat_numbers(node: Inode, size: int, stored: int) -> Stat:
        return Stat(
            node.oid,
            node.mode,
            node.nlink,
            node.uid,
            node.gid,
            node.rdev,
            size,
            (stored + 511) >> 9,
            BLKSIZE,
            node.atime_ns,
            node.mtime_ns,
            node.ctime_ns,
            node.btime_ns,
        )

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True if directory `ancestor` is `ino` or one of its ancestors."""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO:
                return False
            node = self._get(ino)
            ino = node.parent
            seen += 1
            if seen > 1 << 16 or ino == 0:
                raise FsError(errno.EIO, "directory parent chain is broken")

    # ------------------------------------------------------------------ commit
    def commit(self) -> int:
        """Flush cached attributes and commit the store (atomic + durable)."""
        with self._lock:
            return self._commit()

    def _commit(self) -> int:
        store = self.store
        try:
            for oid in self._dirty:
                node = self._inodes.get(oid)
                if node is not None:
                    store.set_attrs(oid, node.pack())
            self._dirty.clear()
            self._dirty_since = None
            self.commits += 1
            generation = store.commit()
        except Exception as e:
            raise self._save_failed(e) from e
        if self.save_failure is not None:
            log.warning("a commit succeeded again: everything is saved, the vault is writable")
            self.save_failure = None
        self.last_commit = time.monotonic()
        return generation

    def _save_failed(self, e: Exception) -> FsError:
        """A commit failed: from now on the vault refuses changes (EROFS, see _allow)
        until one succeeds; what it has accepted stays readable. Logged once."""
        problem = self.store.save_problem or f"{type(e).__name__}: {e}"
        self._note_save_failure(problem)
        no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        return FsError(errno.ENOSPC if no_space else errno.EIO, problem)

    def _note_save_failure(self, problem: str) -> None:
        if self.save_failure is None:
            log.error(
                "cannot save the vault's changes: %s; %d bytes accepted since the last commit "
                "are not saved; the vault is read-only until a commit succeeds",
                problem, self.store.dirty_bytes(),
            )
        self.save_failure = problem

    def _allow(self, data_bytes: int = 0, *, freeing: bool = False) -> None:
        """Refuse a change the vault could not save: EROFS once saving failed (until a
        commit succeeds again); ENOSPC if committing everything accepted plus this change
        might not fit. Before ENOSPC one commit is tried: it makes the space freed since
        the last commit reusable and replaces estimates by what was really written."""
        problem = self.save_failure or self.store.save_problem
        if problem is not None:
            self._note_save_failure(problem)  # e.g. a flush at the dirty limit failed
            raise FsError(errno.EROFS, f"the vault cannot save changes ({problem})")
        check = self.store.check_room
        if check(data_bytes, pending_entries=len(self._dirty), freeing=freeing):
            return
        if self.has_unsaved_changes():
            self._commit()
            if check(data_bytes, freeing=freeing):
                return
        raise FsError(errno.ENOSPC)

    def dirty_since(self) -> float | None:
        """time.monotonic() of the first change not yet committed, or None."""
        since = self._dirty_since
        if since is None and (self._dirty or self.store.dirty_bytes() > 0):
            with self._lock:
                if self._dirty_since is None:
                    self._dirty_since = time.monotonic()
                since = self._dirty_since
        return since

    # ------------------------------------------------------------------ lookup
    def lookup(self, parent: int, name: bytes) -> int:
        with self._lock:
            return self._child(parent, name)

    def lookup_stat(self, parent: int, name: bytes) -> Stat:
        """`getattr(lookup(parent, name))` under one lock: the kernel's LOOKUP wants both."""
        with self._lock:
            ino = self._child(parent, name)
            if ino not in self._inodes and parent not in self._to_warm:
                self._queue_warm(parent)
            return self._stat_of(ino)

    def _child(self, parent: int, name: bytes) -> int:
        node, d = self._dirnode(parent)
        if name == b".":
            return parent
        if name == b"..":
            return node.parent or ROOT_INO
        entry = d.get(name)
        if entry is None:
            if len(name) > NAME_MAX:
                raise FsError(errno.ENAMETOOLONG)
            raise FsError(errno.ENOENT)
        return entry[0]

    def resolve(self, path: bytes) -> int:
        """The inode of an absolute path inside the vault ("/" is the root); no symlinks."""
        with self._lock:
            ino = ROOT_INO
            for name in path.split(b"/"):
                if not name:
                    continue
                d = self._dirs.get(ino)
                if d is None:
                    d = self._dirnode(ino)[1]
                entry = d.entries.get(name)
                if entry is None:
                    if name == b".":
                        continue
                    if name == b"..":
                        ino = self._get(ino).parent or ROOT_INO
                        continue
                    raise FsError(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
                ino = entry[0]
            return ino

    def resolve_parent(self, path: bytes) -> tuple[int, bytes]:
        """(inode of the parent directory, last name) of an absolute path."""
        head, _, name = path.rstrip(b"/").rpartition(b"/")
        if not name:
            raise FsError(errno.EBUSY)  # the root itself
        return self.resolve(head), name

    def getattr(self, ino: int) -> Stat:
        with self._lock:
            return self._stat_of(ino)

    def generation(self, ino: int) -> int:
        """How often `ino` was freed since this filesystem opened: (ino, generation) names
        one file for the whole session even when the store reuses the number."""
        return self._freed.get(ino, 0)

    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        """[(name, ino, S_IFMT bits)] including "." and ".."."""
        with self._lock:
            node, d = self._dirnode(ino)
            out = [(b".", ino, stat.S_IFDIR), (b"..", node.parent or ROOT_INO, stat.S_IFDIR)]
            out.extend((name, oid, typ << 12) for name, oid, typ in d.items())
            return out

    def opendir(self, ino: int) -> None:
        """Note an open directory stream: no compaction (which renumbers the readdir
        cookies) while one is open. Pair with releasedir()."""
        with self._lock:
            node = self._get(ino)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            self._open_dirs[ino] = self._open_dirs.get(ino, 0) + 1

    def releasedir(self, ino: int) -> None:
        with self._lock:
            n = self._open_dirs.get(ino, 0) - 1
            if n > 0:
                self._open_dirs[ino] = n
                return
            self._open_dirs.pop(ino, None)
            node = self._inodes.get(ino)
            if node is not None and node.nlink == 0:
                self._free(node)  # removed while open: keep its number until now
                return
            d = self._dirs.get(ino)
            if node is not None and d is not None and node.nlink and d.needs_compaction():
                data = d.compact()
                self.store.write(ino, DATA, 0, data)
                self.store.truncate(ino, DATA, len(data))
                self._mark()

    def readdir_from(
        self, ino: int, cookie: int, plus: bool
    ) -> list[tuple[bytes, int, Stat | tuple[int, int]]]:
        """Entries after readdir cookie `cookie` (0 = from the start) as
        (name, cookie, Stat if `plus` else (ino, S_IFMT bits)); "." and ".." have
        cookies 1 and 2, other entries their record offset (stable while the directory
        is open, see opendir()). Entries whose inode cannot be read are skipped with
        `plus`. Removed directories list nothing."""
        with self._lock:
            node = self._get(ino)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.nlink == 0:
                return []
            d = self._dir(node)
            out: list[tuple[bytes, int, Stat | tuple[int, int]]] = []
            if cookie < 1:
                out.append((b".", 1, self._stat(node) if plus else (ino, stat.S_IFDIR)))
            if cookie < 2:
                parent = node.parent or ROOT_INO
                pst: Stat | tuple[int, int] = (parent, stat.S_IFDIR)
                out.append((b"..", 2, pst))
            entries = d.entries.items()
            if cookie > 2:
                it = iter(entries)
                for name, (oid, typ, off) in it:
                    if off > cookie:
                        self._readdir_add(out, name, oid, typ, off, plus)
                        break
                for name, (oid, typ, off) in it:
                    self._readdir_add(out, name, oid, typ, off, plus)
            else:
                for name, (oid, typ, off) in entries:
                    self._readdir_add(out, name, oid, typ, off, plus)
            return out

    def _readdir_add(
        self,
        out: list[tuple[bytes, int, Stat | tuple[int, int]]],
        name: bytes,
        oid: int,
        typ: int,
        off: int,
        plus: bool,
    ) -> None:
        if not plus:
            out.append((name, off, (oid, typ << 12)))
            return
        try:
            out.append((name, off, self._stat(self._get(oid))))
        except FsError:
            log.error("a directory entry names unreadable object %d", oid)  # no plaintext name

    def readdir_plus(self, ino: int) -> list[tuple[bytes, Stat | None]]:
        """[(name, Stat)] of every entry except "." and ".."; Stat is None if unreadable."""
        with self._lock:
            _, d = self._dirnode(ino)
            out: list[tuple[bytes, Stat | None]] = []
            for name, oid, _typ in d.items():
                try:
                    out.append((name, self._stat(self._get(oid))))
                except FsError:
                    out.append((name, None))
            return out

    # ------------------------------------------------------------------ create
    def _prepare_create(self, parent: int, name: bytes) -> tuple[Inode, Directory]:
        check_name(name)
        pnode, d = self._dirnode(parent)
        if name in (b".", b"..") or name in d.entries:
            raise FsError(errno.EEXIST)
        if pnode.nlink == 0:
            raise FsError(errno.ENOENT)
        return pnode, d

    def mkdir(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, umask: int = 0
    ) -> Stat:
        """`umask` is the creator's (applied unless the parent has a default ACL)."""
        with self._lock:
            pnode, d = self._prepare_create(parent, name)
            self._allow(1)
            if pnode.nlink >= LINK_MAX:
                raise FsError(errno.EMLINK)
            node = self._new(stat.S_IFDIR | (mode & _PERM), uid, gid, pnode, umask=umask)
            self.store.mark_metadata(node.oid)  # names get a second copy (FORMAT.md §4.2)
            self.store.write(node.oid, DATA, 0, DIR_MAGIC)
            self._dirs[node.oid] = Directory()
            self._link_into(pnode, d, name, node)
            return self._stat(node)

    def mknod(
        self,
        parent: int,
        name: bytes,
        mode: int,
        rdev: int,
        uid: int,
        gid: int,
        *,
        umask: int = 0,
    ) -> Stat:
        with self._lock:
            fmt = mode & _S_IFMT
            if fmt == 0:
                fmt = stat.S_IFREG
            if fmt in (stat.S_IFCHR, stat.S_IFBLK):
                if uid != 0:
                    raise FsError(errno.EPERM)
            elif fmt in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
                rdev = 0
            else:
                raise FsError(errno.EINVAL)
            pnode, d = self._prepare_create(parent, name)
            self._allow(1)
            node = self._new(fmt | (mode & _PERM), uid, gid, pnode, rdev, umask=umask)
            self._link_into(pnode, d, name, node)
            return self._stat(node)

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        uid: int,
        gid: int,
        *,
        umask: int = 0,
    ) -> tuple[Stat, int]:
        """Create a regular file (EEXIST if the name exists) and open it; (stat, fh)."""
        with self._lock:
            pnode, d = self._prepare_create(parent, name)
            self._allow(1)
            node = self._new(stat.S_IFREG | (mode & _PERM), uid, gid, pnode, umask=umask)
            self._link_into(pnode, d, name, node)
            # O_TRUNC has nothing to do on a new file (empty, times just set), and its
            # room check and store call cost as much as the rest of a create.
            fh = self._open(node, flags & ~os.O_TRUNC)
            return self._stat(node), fh

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Stat:
        with self._lock:
            if not target:
                raise FsError(errno.ENOENT)
            if len(target) > SYMLINK_MAX:
                raise FsError(errno.ENAMETOOLONG)
            if b"\0" in target:
                raise FsError(errno.EINVAL)
            pnode, d = self._prepare_create(parent, name)
            self._allow(len(target))
            node = self._new(stat.S_IFLNK | 0o777, uid, gid, pnode)
            self.store.write(node.oid, DATA, 0, target)
            self._link_into(pnode, d, name, node)
            return self._stat(node)

    def readlink(self, ino: int) -> bytes:
        with self._lock:
            node = self._get(ino)
            if not node.is_lnk:
                raise FsError(errno.EINVAL)
            return self._read(node, 0, self._size(node))

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Stat:
        with self._lock:
            node = self._get(ino)
            if node.is_dir:
                raise FsError(errno.EPERM)
            pnode, d = self._prepare_create(new_parent, new_name)
            self._allow(1)
            if node.nlink == 0:
                raise FsError(errno.ENOENT)
            if node.nlink >= LINK_MAX:
                raise FsError(errno.EMLINK)
            self._dir_apply(pnode, d, d.add(new_name, node.oid, node.dtype))
            now = self._now()
            pnode.mtime_ns = pnode.ctime_ns = now
            self._touch(pnode)
            node.nlink += 1
            node.ctime_ns = now
            self._touch(node)
            return self._stat(node)

    # ------------------------------------------------------------------ remove
    def unlink(self, parent: int, name: bytes) -> None:
        with self._lock:
            self._allow(1, freeing=True)
            pnode, d = self._dirnode(parent)
            entry = d.get(name)
            if entry is None:
                check_name(name)
                raise FsError(errno.ENOENT)
            self._drop_name(pnode, d, name, entry[0])

    def _drop_name(self, pnode: Inode, d: Directory, name: bytes, oid: int) -> Inode:
        """Remove a non-directory's entry and one of its links (unlink and hide)."""
        node = self._get(oid)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._dir_apply(pnode, d, d.remove(name))
        pnode.mtime_ns = pnode.ctime_ns = self._now()
        self._touch(pnode)
        self._drop_link(node)
        return node

    def rmdir(self, parent: int, name: bytes) -> None:
        with self._lock:
            self._allow(1, freeing=True)
            pnode, d = self._dirnode(parent)
            if name == b".":
                raise FsError(errno.EINVAL)
            if name == b"..":
                raise FsError(errno.ENOTEMPTY)
            entry = d.get(name)
            if entry is None:
                check_name(name)
                raise FsError(errno.ENOENT)
            node = self._get(entry[0])
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.oid == ROOT_INO:
                raise FsError(errno.EBUSY)
            if len(self._dir(node)):
                raise FsError(errno.ENOTEMPTY)
            self._dir_apply(pnode, d, d.remove(name))
            pnode.mtime_ns = pnode.ctime_ns = self._now()
            pnode.nlink -= 1
            self._touch(pnode)
            self._drop_link(node)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        with self._lock:
            self._allow(1)
            if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
                raise FsError(errno.EINVAL)
            if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
                raise FsError(errno.EINVAL)
            opnode, od = self._dirnode(old_parent)
            npnode, nd = self._dirnode(new_parent)
            for nm in (old_name, new_name):
                if nm in (b".", b".."):
                    raise FsError(errno.EBUSY if nm == b"." else errno.ENOTEMPTY)
            src = od.get(old_name)
            if src is None:
                check_name(old_name)
                raise FsError(errno.ENOENT)
            check_name(new_name)
            snode = self._get(src[0])
            dst = nd.get(new_name)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError(errno.ENOENT)
                self._exchange(opnode, od, old_name, snode, npnode, nd, new_name, self._get(dst[0]))
                return
            dnode: Inode | None = None
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if dst[0] == snode.oid:
                    return  # the same file under both names: POSIX says do nothing
                dnode = self._get(dst[0])
                if snode.is_dir:
                    if not dnode.is_dir:
                        raise FsError(errno.ENOTDIR)
                    if len(self._dir(dnode)):
                        raise FsError(errno.ENOTEMPTY)
                elif dnode.is_dir:
                    raise FsError(errno.EISDIR)
            moving_dir = snode.is_dir and old_parent != new_parent
            if moving_dir:
                if self._is_ancestor(snode.oid, new_parent):
                    raise FsError(errno.EINVAL)
                if npnode.nlink >= LINK_MAX and dnode is None:
                    raise FsError(errno.EMLINK)
            if npnode.nlink == 0:
                raise FsError(errno.ENOENT)
            # Perform: the new name first, then drop the old one.
            if dnode is not None:
                self._dir_apply(npnode, nd, nd.replace(new_name, snode.oid, snode.dtype))
            else:
                self._dir_apply(npnode, nd, nd.add(new_name, snode.oid, snode.dtype))
            self._dir_apply(opnode, od, od.remove(old_name))
            now = self._now()
            if moving_dir:
                snode.parent = new_parent
                opnode.nlink -= 1
                npnode.nlink += 1
            if dnode is not None and dnode.is_dir:
                npnode.nlink -= 1
            snode.ctime_ns = now
            opnode.mtime_ns = opnode.ctime_ns = now
            npnode.mtime_ns = npnode.ctime_ns = now
            self._touch(snode)
            self._touch(opnode)
            self._touch(npnode)
            if dnode is not None:
                self._drop_link(dnode)

    def _exchange(
        self,
        opnode: Inode,
        od: Directory,
        old_name: bytes,
        a: Inode,
        npnode: Inode,
        nd: Directory,
        new_name: bytes,
        b: Inode,
    ) -> None:
        if a.oid == b.oid:
            return
        if opnode.oid != npnode.oid:
            if a.is_dir and self._is_ancestor(a.oid, npnode.oid):
                raise FsError(errno.EINVAL)
            if b.is_dir and self._is_ancestor(b.oid, opnode.oid):
                raise FsError(errno.EINVAL)
        self._dir_apply(opnode, od, od.replace(old_name, b.oid, b.dtype))
        self._dir_apply(npnode, nd, nd.replace(new_name, a.oid, a.dtype))
        if opnode.oid != npnode.oid:
            if a.is_dir:
                a.parent = npnode.oid
                opnode.nlink -= 1
                npnode.nlink += 1
            if b.is_dir:
                b.parent = opnode.oid
                npnode.nlink -= 1
                opnode.nlink += 1
        now = self._now()
        for n in (a, b):
            n.ctime_ns = now
            self._touch(n)
        for p in (opnode, npnode):
            p.mtime_ns = p.ctime_ns = now
            self._touch(p)

    # ------------------------------------------------------------------ file data
    def _open(self, node: Inode, flags: int, append_in_fs: bool = True) -> int:
        if node.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg and flags & os.O_ACCMODE != os.O_RDONLY:
            self._truncate(node, 0)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node.oid, bool(flags & os.O_APPEND) and append_in_fs)
        node.opens += 1
        return fh

    def open(self, ino: int, flags: int, *, append_in_fs: bool = True) -> int:
        """Open `ino`; returns a handle. `append_in_fs=False` leaves O_APPEND to the kernel
        (writeback-cache mounts, where the kernel computes the append offset)."""
        with self._lock:
            node = self._get(ino)
            if node.nlink == 0 and node.opens == 0:
                raise FsError(errno.ENOENT)
            return self._open(node, flags, append_in_fs)

    def set_append(self, fh: int, append: bool) -> None:
        with self._lock:
            self._handle(fh).append = append

    def handle_ino(self, fh: int) -> int:
        return self._handle(fh).ino

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return
            node = self._inodes.get(h.ino)
            if node is None:
                return
            node.opens -= 1
            if node.opens <= 0 and node.nlink == 0:
                node.opens = 0
                self._free(node)
            elif node.opens <= 0:
                # Not now: RELEASE is asynchronous for the program that closed the file, but
                # the next request (its next open, say) would wait for the encryption.
                self._to_seal[node.oid] = None
                if len(self._to_seal) > _SEAL_BACKLOG:
                    self._seal_oldest()

    def idle_work(self) -> bool:
        """Background work for a request loop that found no request waiting; one short
        step per call, so a request arriving meanwhile waits for at most one. First,
        encrypt one closed file's dirty data into free units (ObjectStore.seal_data), so
        its block buffer is reused by the next file instead of a fresh one per small file;
        then load one inode of a directory a cold look-up went into (its siblings are
        likely next). Never blocks on the lock (a commit may hold it). True if more is
        waiting."""
        if not (self._to_seal or self._to_warm) or not self._lock.try_enter():
            return False
        try:
            if self._to_seal:
                self._seal_oldest()
            else:
                self._warm_next()
            return bool(self._to_seal or self._to_warm)
        finally:
            self._lock.leave()

    def _queue_warm(self, parent: int) -> None:
        d = self._dirs.get(parent)
        if d is None or len(self._inodes) >= _WARM_CACHE_SHARE:
            return
        pending = list(itertools.islice(
            (oid for oid, _typ, _pos in d.entries.values() if oid not in self._inodes), _WARM_ENTRIES
        ))
        if not pending:
            return
        pending.reverse()  # popped from the end: directory order
        if len(self._to_warm) >= _WARM_DIRS:
            del self._to_warm[next(iter(self._to_warm))]
        self._to_warm[parent] = pending

    def _warm_next(self) -> None:
        """Load the next inode of the directory first in line, then put it last: several
        directories walked at once (`find`, parallel jobs) are each served in turn."""
        parent = next(iter(self._to_warm))
        pending = self._to_warm.pop(parent)
        if len(self._inodes) >= _WARM_CACHE_SHARE:
            self._to_warm.clear()
            return
        while pending:
            oid = pending.pop()
            if oid in self._inodes:
                continue
            try:
                self._stat_of(oid)
            except FsError:
                pass  # a damaged or vanished entry: its own look-up reports it
            except Exception:
                # The store failed (closed, I/O): background work, so never raised into
                # the request loop; the look-up that needs the inode meets the error.
                log.debug("metadata read-ahead stopped", exc_info=True)
                self._to_warm.clear()
                return
            break
        if pending:
            self._to_warm[parent] = pending

    def _seal_oldest(self) -> None:
        oid = next(iter(self._to_seal))
        del self._to_seal[oid]
        node = self._inodes.get(oid)
        if node is None or node.opens or node.nlink == 0:
            return
        try:
            self.store.seal_data(oid)
        except Exception:
            # Background work: nobody waits for it, so it must not end the request loop or
            # fail a close. The store took note (save_problem): the next change is refused
            # and the next commit, fsync or lock reports it.
            log.exception("object %d: encrypting a closed file's data failed", oid)

    def _read(self, node: Inode, offset: int, size: int) -> bytes:
        try:
            return self.store.read(node.oid, DATA, offset, size)
        except IntegrityError as e:
            log.error("object %d: data fails to authenticate: %s", node.oid, e)
            raise FsError(errno.EIO, str(e)) from e

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._read_data(fh, offset, lambda ino: self.store.read(ino, DATA, offset, size))

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        """`read` into the caller's buffer (at most len(out) bytes); the count."""
        return self._read_data(fh, offset, lambda ino: self.store.read_into(ino, DATA, offset, out))

    def _read_data(self, fh: int, offset: int, read: Callable[[int], _T]) -> _T:
        """`read(inode of fh)` under the lock; data failing to authenticate is EIO."""
        with self._lock:
            h = self._handles.get(fh)
            if h is None:
                raise FsError(errno.EBADF)
            if offset < 0:
                raise FsError(errno.EINVAL)
            try:
                return read(h.ino)
            except IntegrityError as e:
                log.error("object %d: data fails to authenticate: %s", h.ino, e)
                raise FsError(errno.EIO, str(e)) from e

    def write(self, fh: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write `data` (not kept: the store copies it) at `offset`, or at the end of
        the file for O_APPEND handles."""
        with self._lock:
            h = self._handles.get(fh)
            if h is None:
                raise FsError(errno.EBADF)
            node = self._inodes[h.ino]
            store = self.store
            if h.append:
                offset = store.stream_size(h.ino, DATA)
            if offset < 0:
                raise FsError(errno.EINVAL)
            if offset + len(data) > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            self._allow(len(data))
            try:
                store.write(h.ino, DATA, offset, data)
            except IntegrityError as e:
                log.error("object %d: data fails to authenticate: %s", h.ino, e)
                raise FsError(errno.EIO, str(e)) from e
            except OSError as e:
                problem = store.save_problem
                if problem is not None:  # a flush at the dirty limit found no space
                    self._note_save_failure(problem)
                raise FsError(e.errno or errno.EIO, str(e)) from e
            node.mtime_ns = node.ctime_ns = self._now()
            self._dirty.add(h.ino)
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            return len(data)

    def _truncate(self, node: Inode, size: int) -> None:
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not node.is_reg:
            raise FsError(errno.EINVAL)
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        # Shrinking frees space (it may use the reserve); the new last block is rewritten.
        self._allow(1, freeing=size < self.store.stream_size(node.oid, DATA))
        try:
            self.store.truncate(node.oid, DATA, size)
        except IntegrityError as e:
            log.error("object %d: data fails to authenticate: %s", node.oid, e)
            raise FsError(errno.EIO, str(e)) from e
        node.mtime_ns = node.ctime_ns = self._now()
        self._touch(node)

    def truncate(self, ino: int, size: int) -> None:
        with self._lock:
            self._truncate(self._get(ino), size)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file. Mode 0 extends the size to offset+length,
        FALLOC_FL_KEEP_SIZE does not; both only check that committing everything accepted
        plus the whole range would fit now (ENOSPC otherwise): nothing is reserved, so a
        later write may still fail with ENOSPC if other changes use the space first.
        PUNCH_HOLE|KEEP_SIZE makes the range read as zeros (whole blocks freed, may use
        the reserve). Every other mode: EOPNOTSUPP."""
        with self._lock:
            h = self._handle(fh)
            node = self._get(h.ino)
            if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) or mode == FALLOC_FL_PUNCH_HOLE:
                raise FsError(errno.EOPNOTSUPP)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_reg:
                raise FsError(errno.ENODEV)
            if offset < 0 or length <= 0:
                raise FsError(errno.EINVAL)
            if offset + length > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            store = self.store
            if store.read_only:
                # A damaged store opened read-only: even a KEEP_SIZE call, which writes
                # nothing here, must not promise space.
                raise FsError(errno.EROFS)
            size = store.stream_size(node.oid, DATA)
            try:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    if offset >= size:
                        return
                    # At most the two edge blocks are rewritten; the rest is freed.
                    self._allow(min(length, BLKSIZE), freeing=True)
                    store.punch(node.oid, DATA, offset, length)
                else:
                    # Copy-on-write: even a block already stored takes fresh units when
                    # rewritten, so the whole range is counted.
                    self._allow(length)
                    if not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
                        store.truncate(node.oid, DATA, offset + length)
            except IntegrityError as e:
                log.error("object %d: data fails to authenticate: %s", node.oid, e)
                raise FsError(errno.EIO, str(e)) from e
            node.mtime_ns = node.ctime_ns = self._now()
            self._touch(node)

    def fsync(self, ino: int | None = None) -> None:
        """Make everything durable (the store commits the whole vault atomically)."""
        with self._lock:
            if self._dirty or self._dirty_since is not None or self.store.dirty_bytes() > 0:
                self._commit()

    # ------------------------------------------------------------------ attributes
    def chmod(self, ino: int, mode: int) -> Stat:
        """Set the permission bits; an extended access ACL follows (posix_acl_chmod:
        owner and other entries, and the mask, take the new bits)."""
        with self._lock:
            node = self._get(ino)
            self._allow()
            if self._acl_possible() and not node.is_lnk:
                attrs = self._xattrs(node)
                value = attrs.get(acls.ACCESS)
                if value is not None:
                    entries = acls.chmod(self._stored_acl(node, value), mode)
                    self._store_xattrs(node, {**attrs, acls.ACCESS: acls.dump(entries)})
            node.mode = (node.mode & _S_IFMT) | (mode & _PERM)
            node.ctime_ns = self._now()
            self._touch(node)
            return self._stat(node)

    def chown(
        self,
        ino: int,
        uid: int,
        gid: int,
        *,
        caller_uid: int | None = None,
        caller_groups: tuple[int, ...] = (),
    ) -> Stat:
        """Change owner/group (-1 keeps one). With `caller_uid` given, enforce the Linux
        rules (only root changes the owner; the owner may pick one of its groups)."""
        with self._lock:
            node = self._get(ino)
            self._allow()
            if caller_uid is not None and caller_uid != 0:
                if uid not in (-1, node.uid):
                    raise FsError(errno.EPERM)
                if gid not in (-1, node.gid) and (
                    caller_uid != node.uid or gid not in caller_groups
                ):
                    raise FsError(errno.EPERM)
            if uid == -1 and gid == -1:
                return self._stat(node)
            if uid != -1:
                node.uid = uid
            if gid != -1:
                node.gid = gid
            if not node.is_dir:
                kill = stat.S_ISUID
                if node.mode & stat.S_IXGRP:
                    kill |= stat.S_ISGID
                node.mode &= ~kill
            node.ctime_ns = self._now()
            self._touch(node)
            return self._stat(node)

    def kill_suidgid(self, ino: int, in_group: Callable[[int], bool]) -> bool:
        """What a write or truncate by a caller without CAP_FSETID does to a regular file,
        as the VFS does (setattr_should_drop_suidgid; the FUSE layer negotiates
        HANDLE_KILLPRIV_V2, so the kernel leaves this to the filesystem): clear set-uid;
        clear set-gid when group-execute is set or the caller is not in the file's group
        (`in_group(gid)`, asked only then). True if the mode changed."""
        with self._lock:
            node = self._get(ino)
            if not node.is_reg:
                return False
            kill = stat.S_ISUID
            if node.mode & stat.S_ISGID and (
                node.mode & stat.S_IXGRP or not in_group(node.gid)
            ):
                kill |= stat.S_ISGID
            if node.mode & kill:
                node.mode &= ~kill
                node.ctime_ns = self._now()
                self._touch(node)
                return True
            return False

    def utimens(self, ino: int, atime_ns: int = UTIME_NOW, mtime_ns: int = UTIME_NOW) -> Stat:
        """Set times in ns; UTIME_NOW / UTIME_OMIT as in utimensat(2)."""
        with self._lock:
            node = self._get(ino)
            self._allow()
            if atime_ns == UTIME_OMIT and mtime_ns == UTIME_OMIT:
                return self._stat(node)
            now = self._now()
            if atime_ns != UTIME_OMIT:
                node.atime_ns = now if atime_ns == UTIME_NOW else atime_ns
            if mtime_ns != UTIME_OMIT:
                node.mtime_ns = now if mtime_ns == UTIME_NOW else mtime_ns
            node.ctime_ns = now
            self._touch(node)
            return self._stat(node)

    # ------------------------------------------------------------------ xattrs
    def _xattrs(self, node: Inode) -> dict[bytes, bytes]:
        if node.xattrs is None:
            size = self.store.stream_size(node.oid, AUX)
            if size == 0:
                node.xattrs = {}
            else:
                try:
                    node.xattrs = xattrs.load(self.store.read(node.oid, AUX, 0, size))
                except IntegrityError as e:
                    log.error("object %d: xattrs fail to authenticate: %s", node.oid, e)
                    raise FsError(errno.EIO, str(e)) from e
                except ValueError as e:
                    log.error("object %d: xattrs damaged: %s", node.oid, e)
                    raise FsError(errno.EIO, str(e)) from e
        return node.xattrs

    def _store_xattrs(self, node: Inode, attrs: dict[bytes, bytes]) -> None:
        data = xattrs.dump(attrs)
        if data:
            self.store.write(node.oid, AUX, 0, data)
        self.store.truncate(node.oid, AUX, len(data))
        node.xattrs = attrs
        node.ctime_ns = self._now()
        self._touch(node)

    def setxattr(
        self,
        ino: int,
        name: bytes,
        value: bytes,
        flags: int = 0,
        *,
        caller_uid: int | None = None,
        caller_groups: tuple[int, ...] = (),
    ) -> None:
        """Set an attribute. POSIX ACLs (system.posix_acl_*) are validated and kept in
        step with the mode (see _set_acl); `caller_uid`/`caller_groups` decide, as in
        the kernel, whether setting an access ACL clears the set-gid bit."""
        with self._lock:
            node = self._get(ino)
            self._allow(len(name) + len(value))
            attrs = self._xattrs(node)
            if name in acls.NAMES:
                if flags & ~(xattrs.XATTR_CREATE | xattrs.XATTR_REPLACE):
                    raise FsError(errno.EINVAL)
                stored = self._set_acl(node, attrs, name, bytes(value), caller_uid, caller_groups)
                if not stored:
                    return
            else:
                xattrs.check_set(attrs, name, value, flags)
                self._store_xattrs(node, {**attrs, name: bytes(value)})
            bit = xattrs.namespace_bit(name)
            root = self._get(ROOT_INO)
            if not root.flags & bit:
                root.flags |= bit
                self._touch(root)

    def _set_acl(
        self,
        node: Inode,
        attrs: dict[bytes, bytes],
        name: bytes,
        value: bytes,
        caller_uid: int | None,
        caller_groups: tuple[int, ...],
    ) -> bool:
        """Set (or, for a bare header, drop) a POSIX ACL as the kernel's set_acl does for
        a local filesystem; True if an attribute is now stored. An access ACL sets the
        mode's permission bits (group bits from the mask when there is one) and is kept
        only if it says more than the mode. XATTR_CREATE/REPLACE do not apply to ACLs."""
        if node.is_lnk:
            raise FsError(errno.EOPNOTSUPP)
        entries = acls.parse(value)
        if name == acls.DEFAULT and not node.is_dir:
            if entries:
                raise FsError(errno.EACCES)
            return False
        mode = node.mode
        keep = bool(entries)
        if entries and name == acls.ACCESS:
            perms, equivalent = acls.mode_of(entries)
            mode = (mode & ~0o777) | perms
            if caller_uid not in (None, 0) and node.gid not in caller_groups:
                mode &= ~stat.S_ISGID
            keep = not equivalent
        new = {k: v for k, v in attrs.items() if k != name}
        if keep:
            new[name] = acls.dump(entries)
            xattrs.check_set(attrs, name, new[name], 0)
        if new != attrs:
            self._store_xattrs(node, new)
        node.mode = mode
        node.ctime_ns = self._now()
        self._touch(node)
        return keep

    def xattr_namespace_used(self, name: bytes) -> bool:
        """False if no object of the vault ever had an attribute in `name`'s namespace
        (a sticky per-vault bit in the root's inode flags): the kernel asks for
        security.capability before every write and `ls -l` for ACLs and SELinux labels
        of every file, and this answers ENODATA without a lookup."""
        root = self._inodes.get(ROOT_INO)
        if root is None:
            return True
        flags = root.flags
        if flags == xattrs.NS_TRACKED:  # the usual case: no attribute was ever set
            return False
        return not flags & xattrs.NS_TRACKED or bool(flags & xattrs.namespace_bit(name))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self._lock:
            node = self._get(ino)
            xattrs.check_name(name)
            value = self._xattrs(node).get(name)
            if value is None:
                raise FsError(errno.ENODATA)
            return value

    def listxattr(self, ino: int) -> list[bytes]:
        with self._lock:
            return list(self._xattrs(self._get(ino)))

    def removexattr(self, ino: int, name: bytes) -> None:
        with self._lock:
            node = self._get(ino)
            self._allow(freeing=True)
            xattrs.check_name(name)
            attrs = self._xattrs(node)
            if name not in attrs:
                if name in acls.NAMES:
                    return  # as on ext4 and tmpfs: removing an absent ACL is no error
                raise FsError(errno.ENODATA)
            self._store_xattrs(node, {k: v for k, v in attrs.items() if k != name})

    # ------------------------------------------------------------------ whole fs
    def statfs(self) -> StatFs:
        """Units of the container's data area, plus what the container can still grow
        into on the host filesystem (when `host_dir` was given): the container file
        grows on demand, so the host's free space is the vault's free space too."""
        with self._lock:
            s = self.store.statfs()
        unit = int(getattr(s, "unit_size", s.block_size))
        total = int(s.total_units)
        free = int(s.free_units)
        avail = free
        if self.host_dir is not None:
            try:
                host = os.statvfs(self.host_dir)
                grow = host.f_bavail * host.f_frsize // unit
                growf = host.f_bfree * host.f_frsize // unit
            except OSError:
                grow = growf = 0
            total += growf
            free += growf
            avail += grow
            # What writes can still get: less the reserve and what a commit of the
            # changes accepted so far needs (see _allow), so df agrees with ENOSPC.
            with self._lock:
                need = self.store.commit_need(len(self._dirty))
            avail = min(avail, max(0, (self.store.room() - need) // unit))
        return StatFs(
            bsize=int(s.block_size),
            frsize=unit,
            blocks=total,
            bfree=free,
            bavail=avail,
            files=int(s.objects) + avail,
            ffree=avail,
            favail=avail,
            namemax=NAME_MAX,
        )

    def open_handles(self) -> int:
        return len(self._handles)

    def spare_room(self) -> int:
        """Bytes later changes could still take before ENOSPC: the room for commits less
        what committing everything accepted so far needs."""
        with self._lock:
            return self.store.room() - self.store.commit_need(len(self._dirty))

    # ------------------------------------------------------------------ locking the vault
    def seal(self) -> None:
        """Refuse every later operation with EIO (the first step of a lock)."""
        self._lock.seal()

    @property
    def sealed(self) -> bool:
        """True once `seal()` ran: a lock owns the rest of this filesystem's life."""
        return self._lock.sealed

    def has_unsaved_changes(self) -> bool:
        """Whether a commit would write anything (lock-free: used after `seal()`)."""
        return bool(self._dirty) or self._dirty_since is not None or self.store.dirty_bytes() > 0

    def commit_sealed(self) -> int:
        """The lock sequence's final commit, allowed after `seal()`."""
        with self._lock.held():
            return self._commit()

    @property
    def last_activity(self) -> float:
        """time.monotonic() of the last operation (for --idle-lock)."""
        return self._lock.last_entered

    def close(self) -> None:
        """Commit what is pending; the store itself belongs to the caller."""
        with self._lock:
            if self._dirty or self._dirty_since is not None or self.store.dirty_bytes() > 0:
                self._commit()
