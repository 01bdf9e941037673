"""Durability helpers every layer needs (like kryptvault.errors, importable from anywhere)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make a rename or create in `path` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(final: Path, data: bytes | bytearray, *, mode: int = 0o600) -> None:
    """Atomically create or replace `final` with `data`: temp file, fsync, rename, fsync,
    fsync dir. Whatever fails, `final` holds either the old complete file or the new one
    and no temp file is left behind; the OSError goes to the caller, which words it."""
    directory = final.parent
    tmp = directory / f"{final.name}.tmp-{secrets.token_hex(8)}"
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        created = True
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.replace(tmp, final)
            created = False
            # vfat writes a renamed file's new directory entry with size 0 and fills in
            # the size only when the file's inode is written back; fsync on the directory
            # does not do that. Measured: without this second fsync, a stick pulled a few
            # seconds after the write held an empty share file under the final name.
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
    except OSError:
        if created:
            # If the device is gone or read-only, there is nothing more we can do.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
