"""One writer per history: a writable mount holds a lock on its (vault, lineage).

Copies of a container share the vault UUID, and a plain `cp` also shares the lineage
(docs/FORMAT.md §4.6). Two writable mounts of one lineage would be two writers of one line
of commits: each raises the same rollback record, and whichever has fewer commits later
looks rolled back. Read-only mounts and forks (a lineage of their own) take no part.

The lock is an flock on `<uuid>.<lineage>.writer` in the runtime directory, held until the
daemon exits (the kernel drops it even when the daemon is killed; a lock removes the name). The file holds the
holder's mount point and container, so a refusal can say where the other writer is.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from kryptvault.errors import KryptvaultError
from kryptvault.session.flockfile import take_flock
from kryptvault.session.paths import runtime_dir


class WriterLock:
    """Held from take_writer_lock() until the process exits."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def remove_name(self) -> None:
        """At the lock, still holding it: the file goes with the mount (a successor that
        opened the old name finds it unlinked and tries again, see take_writer_lock)."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)


def take_writer_lock(vault_uuid: uuid.UUID, lineage: bytes, describe: str,
                     mountpoint: str, container: str) -> WriterLock:
    """The held lock (keep it for the mount's lifetime), or KryptvaultError naming the
    mount that already writes this lineage."""
    path = runtime_dir() / f"{vault_uuid}.{lineage.hex()}.writer"
    try:
        fd = take_flock(path)
    except OSError as exc:
        raise KryptvaultError(f"cannot take the writer lock {path}: {exc.strerror}")
    if fd is None:
        holder = _holder(path)
        where = (f" on {holder.get('mountpoint')} (from {holder.get('container')})"
                 if holder else "")
        raise KryptvaultError(
            f"vault {vault_uuid} ({describe} lineage) is already mounted writable{where}; "
            "two writable mounts of one history are refused: mount this copy --read-only"
        )
    with contextlib.suppress(OSError):
        record = json.dumps({"mountpoint": mountpoint, "container": container,
                             "pid": os.getpid()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    return WriterLock(fd, path)


def _holder(path: Path) -> dict[str, object]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        found = json.loads(data)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
