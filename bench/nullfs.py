"""The ceiling: a FUSE filesystem that does nothing, served by kryptvault's own adapter.

    .venv/bin/python bench/nullfs.py MOUNTPOINT     (serves until unmounted)

One regular file, `/data.bin` (64 MiB), whose writes are discarded and whose reads
return zeros; no crypto, no store, no filesystem layer. It is served through
`kryptvault.fuseadapter` (KvFUSE, the same mount options, one thread, the same cheap
`getxattr` path), so its random 4 KiB figures are what the FUSE round trip alone costs a
Python daemon here: no vault served by mfusepy can be faster. bench/run.py measures it
in the same run as the vault and gocryptfs (`--targets ...,ceiling`).

Each write(2) costs two round trips through it: the kernel asks `getxattr
security.capability` before every write to decide whether to drop privileges (libfuse
3.14 cannot negotiate FUSE_HANDLE_KILLPRIV_V2, the only thing that lets the kernel
skip that question), then sends the write.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kryptvault.fs.filesystem import Stat
from kryptvault.fuseadapter._mfusepy import FuseOSError, KvFUSE, Operations

SIZE = 64 << 20
ROOT_INO, FILE_INO = 1, 2
NAME = "/data.bin"


def _stat(ino: int, mode: int, size: int) -> Stat:
    now = time.time_ns()
    return Stat(ino, mode, 1, os.getuid(), os.getgid(), 0, size, size // 512, 4096, now, now, now, now)


class NullOperations(Operations):  # type: ignore[misc]
    """Just enough for open/pread/pwrite on one file."""

    def __init__(self) -> None:
        self._root = _stat(ROOT_INO, stat.S_IFDIR | 0o755, 0)
        self._file = _stat(FILE_INO, stat.S_IFREG | 0o644, SIZE)
        self._zeros = bytes(1 << 20)

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:  # the vault's own settings (kryptvault/fuseadapter/operations.py)
            config.use_ino = 1
            config.attr_timeout = config.entry_timeout = config.negative_timeout = 1.0

    def stat(self, path: str | None, fh: Any) -> tuple[Stat, bool]:
        if path == "/":
            return self._root, False
        if path == NAME:
            return self._file, False
        raise FuseOSError(errno.ENOENT)

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:  # registered; KvFUSE calls stat
        raise FuseOSError(errno.ENOSYS)

    def getxattr_raw(self, path: str | None, name: bytes) -> bytes | None:
        return None

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:  # registered only
        raise FuseOSError(errno.ENODATA)

    def open(self, path: str, fi: Any) -> int:
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        fi.fh = FILE_INO
        fi.keep_cache = 1
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        return self._zeros[: max(0, min(size, SIZE - offset))]

    def write(self, path: str | None, data: Any, offset: int, fi: Any) -> int:
        return len(data)

    def flush(self, path: str | None, fi: Any) -> int:
        return 0

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        return 0


def main() -> int:
    mountpoint = sys.argv[1]
    options = {"fsname": "kryptvault:ceiling", "subtype": "kryptvault", "default_permissions": True}
    options.update(use_ino=True, nothreads=True)
    KvFUSE(NullOperations(), mountpoint, raw_fi=True, foreground=True, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
