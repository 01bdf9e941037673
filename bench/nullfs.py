"""The ceiling: a FUSE filesystem that does nothing, served by kryptvault's own adapter.

    .venv/bin/python bench/nullfs.py MOUNTPOINT     (serves until unmounted)

A namespace kept in memory (names, modes, owners, times, sizes, links) whose file
contents are discarded: reads return zeros up to a file's size. No crypto, no store, no
vault filesystem layer. It is served by kryptvault's own FUSE server
(`kryptvault.fuseadapter.FuseServer`: the same negotiation, writeback cache, timeouts and
request loop as the vault), so its figures are what the FUSE round trips alone cost a
Python daemon here: no vault served by that layer can be faster. bench/run.py measures it
in the same run as the vault and gocryptfs (`--targets ...,ceiling`); its "cold" keeps the
daemon (the namespace lives only in its memory) and drops the kernel's caches, so every
name is looked up again, as after a remount.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kryptvault.fs import Filesystem, FsError
from kryptvault.fs.filesystem import UTIME_NOW, UTIME_OMIT, Stat, StatFs, file_time_ns
from kryptvault.fuseadapter.server import FuseServer, mount_options

ROOT_INO = 1
_PERM = 0o7777
_FIRST_COOKIE = 3  # 1 and 2 are "." and ".."


@dataclass(slots=True)
class Node:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int = 0
    nlink: int = 1
    rdev: int = 0
    # a, m, c, birth; from the clock the kernel stamps files with (as the vault's): a file
    # created and written within one tick then has no times to write back at close.
    times: list[int] = field(default_factory=lambda: [file_time_ns()] * 4)
    parent: int = ROOT_INO
    opens: int = 0  # open handles: an unlinked file lives on until the last is released
    entries: dict[bytes, tuple[int, int]] | None = None  # directories: name -> (ino, cookie)
    target: bytes = b""  # symbolic links

    def stat(self) -> Stat:
        a, m, c, b = self.times
        return Stat(self.ino, self.mode, self.nlink, self.uid, self.gid, self.rdev,
                    self.size, (self.size + 511) // 512, 4096, a, m, c, b)  # fmt: skip


class NullFilesystem:
    """The part of kryptvault.fs.Filesystem the FUSE server calls, on a namespace in
    memory: POSIX answers for names (ENOENT, EEXIST, ENOTEMPTY, ...), no data kept."""

    sealed = False

    def __init__(self) -> None:
        uid, gid = os.getuid(), os.getgid()
        root = Node(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, nlink=2, entries={})
        self._nodes: dict[int, Node] = {ROOT_INO: root}
        self._inos = itertools.count(ROOT_INO + 1)
        self._cookies = itertools.count(_FIRST_COOKIE)
        self._handles: dict[int, Node] = {}
        self._fhs = itertools.count(1)

    # ------------------------------------------------------------------ helpers
    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> tuple[Node, dict[bytes, tuple[int, int]]]:
        node = self._node(ino)
        if node.entries is None:
            raise FsError(errno.ENOTDIR)
        return node, node.entries

    def _make(self, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
        assert parent.entries is not None
        if name in parent.entries or name in (b".", b".."):
            raise FsError(errno.EEXIST)
        node = Node(next(self._inos), mode, uid, gid, parent=parent.ino)
        if stat.S_ISDIR(mode):
            node.entries, node.nlink = {}, 2
            parent.nlink += 1
        self._nodes[node.ino] = node
        self._link(parent, name, node.ino)
        return node

    def _link(self, parent: Node, name: bytes, ino: int) -> None:
        assert parent.entries is not None
        parent.entries[name] = (ino, next(self._cookies))
        self._touch(parent)

    @staticmethod
    def _touch(node: Node, ctime_only: bool = False) -> None:
        now = file_time_ns()
        node.times[2] = now
        if not ctime_only:
            node.times[1] = now

    def _drop(self, node: Node) -> None:
        """One name of a non-directory is gone."""
        node.nlink -= 1
        self._touch(node, ctime_only=True)
        if node.nlink <= 0 and node.opens == 0:
            del self._nodes[node.ino]

    # ------------------------------------------------------------------ names
    def lookup_stat(self, parent: int, name: bytes) -> Stat:
        _, entries = self._dir(parent)
        found = entries.get(name)
        if found is None:
            raise FsError(errno.ENOENT)
        return self._nodes[found[0]].stat()

    def getattr(self, ino: int) -> Stat:
        return self._node(ino).stat()

    def generation(self, ino: int) -> int:
        return 0  # numbers are never reused

    def opendir(self, ino: int) -> None:
        self._dir(ino)

    def releasedir(self, ino: int) -> None:
        pass

    def readdir_from(
        self, ino: int, cookie: int, plus: bool
    ) -> list[tuple[bytes, int, Stat | tuple[int, int]]]:
        node, entries = self._dir(ino)
        out: list[tuple[bytes, int, Stat | tuple[int, int]]] = []
        if cookie < 1:
            out.append((b".", 1, node.stat() if plus else (ino, stat.S_IFDIR)))
        if cookie < 2:
            out.append((b"..", 2, (node.parent, stat.S_IFDIR)))
        nodes = self._nodes
        for name, (child, at) in list(entries.items()):
            if at > cookie:
                n = nodes[child]
                out.append((name, at, n.stat() if plus else (child, n.mode & 0o170000)))
        return out

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, umask: int = 0) -> Stat:
        pnode, _ = self._dir(parent)
        return self._make(pnode, name, stat.S_IFDIR | (mode & ~umask & _PERM), uid, gid).stat()

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, *, umask: int = 0
    ) -> Stat:
        pnode, _ = self._dir(parent)
        node = self._make(pnode, name, (mode & 0o170000) | (mode & ~umask & _PERM), uid, gid)
        node.rdev = rdev
        return node.stat()

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int, *, umask: int = 0
    ) -> tuple[Stat, int]:
        pnode, _ = self._dir(parent)
        node = self._make(pnode, name, stat.S_IFREG | (mode & ~umask & _PERM), uid, gid)
        return node.stat(), self._open(node)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Stat:
        pnode, _ = self._dir(parent)
        node = self._make(pnode, name, stat.S_IFLNK | 0o777, uid, gid)
        node.target, node.size = target, len(target)
        return node.stat()

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return node.target

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Stat:
        node = self._node(ino)
        if node.entries is not None:
            raise FsError(errno.EPERM)
        pnode, entries = self._dir(new_parent)
        if new_name in entries:
            raise FsError(errno.EEXIST)
        self._link(pnode, new_name, ino)
        node.nlink += 1
        self._touch(node, ctime_only=True)
        return node.stat()

    def _unlinked(self, parent: int, name: bytes, want_dir: bool) -> Node:
        pnode, entries = self._dir(parent)
        found = entries.get(name)
        if found is None:
            raise FsError(errno.ENOENT)
        node = self._nodes[found[0]]
        if want_dir and node.entries is None:
            raise FsError(errno.ENOTDIR)
        if not want_dir and node.entries is not None:
            raise FsError(errno.EISDIR)
        if want_dir and node.entries:
            raise FsError(errno.ENOTEMPTY)
        del entries[name]
        self._touch(pnode)
        if want_dir:
            pnode.nlink -= 1
        return node

    def unlink(self, parent: int, name: bytes) -> None:
        self._drop(self._unlinked(parent, name, False))

    def rmdir(self, parent: int, name: bytes) -> None:
        node = self._unlinked(parent, name, True)
        node.nlink = 0
        del self._nodes[node.ino]

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        if flags:
            raise FsError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not needed by the benchmark
        opnode, old_entries = self._dir(old_parent)
        npnode, new_entries = self._dir(new_parent)
        found = old_entries.get(old_name)
        if found is None:
            raise FsError(errno.ENOENT)
        node = self._nodes[found[0]]
        if node.entries is not None:
            up = npnode
            while up.ino != ROOT_INO:  # not into its own subtree
                if up.ino == node.ino:
                    raise FsError(errno.EINVAL)
                up = self._nodes[up.parent]
        if new_name in new_entries:
            if new_entries[new_name][0] == node.ino:
                return
            victim = self._nodes[new_entries[new_name][0]]
            if (victim.entries is None) != (node.entries is None):
                raise FsError(errno.EISDIR if victim.entries is not None else errno.ENOTDIR)
            self._unlinked(new_parent, new_name, victim.entries is not None)
            if victim.entries is None:
                self._drop(victim)
            else:
                del self._nodes[victim.ino]
        del old_entries[old_name]
        self._touch(opnode)
        self._link(npnode, new_name, node.ino)
        if node.entries is not None and opnode is not npnode:
            opnode.nlink -= 1
            npnode.nlink += 1
            node.parent = npnode.ino
        self._touch(node, ctime_only=True)

    # ------------------------------------------------------------------ attributes
    def chmod(self, ino: int, mode: int) -> Stat:
        node = self._node(ino)
        node.mode = (node.mode & ~_PERM) | (mode & _PERM)
        self._touch(node, ctime_only=True)
        return node.stat()

    def chown(
        self, ino: int, uid: int, gid: int, *, caller_uid: int | None = None, caller_groups: Any = ()
    ) -> Stat:
        node = self._node(ino)
        if uid != -1:
            node.uid = uid
        if gid != -1:
            node.gid = gid
        self._touch(node, ctime_only=True)
        return node.stat()

    def truncate(self, ino: int, size: int) -> None:
        node = self._node(ino)
        node.size = size
        self._touch(node)

    def utimens(self, ino: int, atime_ns: int = UTIME_NOW, mtime_ns: int = UTIME_NOW) -> Stat:
        node = self._node(ino)
        now = file_time_ns()
        for i, value in ((0, atime_ns), (1, mtime_ns)):
            if value != UTIME_OMIT:
                node.times[i] = now if value == UTIME_NOW else value
        node.times[2] = now
        return node.stat()

    def kill_suidgid(self, ino: int, in_group: Callable[[int], bool]) -> bool:
        node = self._node(ino)
        if not node.mode & (stat.S_ISUID | stat.S_ISGID):
            return False
        node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return True

    def xattr_namespace_used(self, name: bytes) -> bool:
        return False  # no extended attributes: every getxattr is ENODATA at once

    def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FsError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return []

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, **_caller: Any) -> None:
        raise FsError(errno.EOPNOTSUPP)

    def removexattr(self, ino: int, name: bytes) -> None:
        raise FsError(errno.ENODATA)

    def statfs(self) -> StatFs:
        return StatFs(4096, 4096, 1 << 30, 1 << 30, 1 << 30, 1 << 20, 1 << 20, 1 << 20, 255)

    # ------------------------------------------------------------------ file data
    def _open(self, node: Node) -> int:
        fh = next(self._fhs)
        self._handles[fh] = node
        node.opens += 1
        return fh

    def open(self, ino: int, flags: int, *, append_in_fs: bool = True) -> int:
        node = self._node(ino)
        if node.entries is not None:
            raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC:
            node.size = 0
            self._touch(node)
        return self._open(node)

    def set_append(self, fh: int, append: bool) -> None:
        pass  # the kernel places appends itself under the writeback cache

    def _file(self, fh: int) -> Node:
        node = self._handles.get(fh)
        if node is None:
            raise FsError(errno.EBADF)
        return node

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return bytes(max(0, min(size, self._file(fh).size - offset)))

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        # The request loop's buffer starts zeroed and nothing here ever writes to it: the
        # reply carries zeros without a copy, the least a filesystem can do for a read.
        return max(0, min(len(out), self._file(fh).size - offset))

    def write(self, fh: int, offset: int, data: Any) -> int:
        node = self._file(fh)
        n = len(data)
        node.size = max(node.size, offset + n)
        self._touch(node)
        return n

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        if mode:
            raise FsError(errno.EOPNOTSUPP)
        node = self._file(fh)
        node.size = max(node.size, offset + length)

    def spare_room(self) -> int:
        return 1 << 50  # never low on room: writes stay in the writeback cache

    def release(self, fh: int) -> None:
        node = self._handles.pop(fh, None)
        if node is not None:
            node.opens -= 1
            if node.nlink <= 0 and node.opens == 0:
                self._nodes.pop(node.ino, None)

    def idle_work(self) -> bool:
        return False  # nothing is ever deferred here

    def fsync(self, ino: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> int:
    mountpoint = sys.argv[1]
    fs = cast(Filesystem, NullFilesystem())
    options = mount_options("ceiling", allow_other=False, extra=None)
    FuseServer(fs, mountpoint, options=options, commit_delay=None).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
