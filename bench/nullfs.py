"""The ceiling: a FUSE filesystem that does nothing, served by kryptvault's own adapter.

    .venv/bin/python bench/nullfs.py MOUNTPOINT     (serves until unmounted)

One regular file, `/data.bin` (64 MiB), whose writes are discarded and whose reads
return zeros; no crypto, no store, no filesystem layer. It is served by kryptvault's own
FUSE server (`kryptvault.fuseadapter.FuseServer`: the same negotiation, writeback cache,
timeouts and request loop as the vault), so its figures are what the FUSE round trips
alone cost a Python daemon here: no vault served by that layer can be faster. bench/run.py
measures it in the same run as the vault and gocryptfs (`--targets ...,ceiling`).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kryptvault.fs import Filesystem, FsError
from kryptvault.fs.filesystem import Stat
from kryptvault.fuseadapter.server import FuseServer, mount_options

SIZE = 64 << 20
ROOT_INO, FILE_INO = 1, 2
NAME = b"data.bin"


def _stat(ino: int, mode: int, size: int) -> Stat:
    now = time.time_ns()
    return Stat(ino, mode, 1, os.getuid(), os.getgid(), 0, size, size // 512, 4096, now, now, now, now)


class NullFilesystem:
    """Just enough of kryptvault.fs.Filesystem for open/pread/pwrite on one file."""

    sealed = False

    def __init__(self) -> None:
        self._root = _stat(ROOT_INO, stat.S_IFDIR | 0o755, 0)
        self._file = _stat(FILE_INO, stat.S_IFREG | 0o644, SIZE)
        self._zeros = bytes(1 << 20)

    def lookup(self, parent: int, name: bytes) -> int:
        if parent == ROOT_INO and name == NAME:
            return FILE_INO
        raise FsError(errno.ENOENT)

    def lookup_stat(self, parent: int, name: bytes) -> Stat:
        return self.getattr(self.lookup(parent, name))

    def getattr(self, ino: int) -> Stat:
        return self._root if ino == ROOT_INO else self._file

    def generation(self, ino: int) -> int:
        return 0

    def idle_work(self) -> bool:
        return False  # nothing is ever deferred here

    def xattr_namespace_used(self, name: bytes) -> bool:
        return False

    def open(self, ino: int, flags: int, *, append_in_fs: bool = True) -> int:
        if ino != FILE_INO:
            raise FsError(errno.EISDIR)
        return FILE_INO

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._zeros[: max(0, min(size, SIZE - offset))]

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        # The request loop's buffer starts zeroed and nothing here ever writes to it: the
        # reply carries zeros without a copy, the least a filesystem can do for a read.
        return max(0, min(len(out), SIZE - offset))

    def write(self, fh: int, offset: int, data: Any) -> int:
        return len(data)

    def kill_suidgid(self, ino: int, in_group: Any) -> bool:
        return False

    def utimens(self, ino: int, atime_ns: int, mtime_ns: int) -> Stat:
        return self.getattr(ino)  # the kernel's write-back of file times

    def spare_room(self) -> int:
        return 1 << 50  # never low on room: writes stay in the writeback cache

    def release(self, fh: int) -> None:
        pass

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
