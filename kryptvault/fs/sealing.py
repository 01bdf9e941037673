"""The filesystem's one lock, which can be sealed: after `seal()` every operation fails
with EIO at once, while the lock sequence itself can still commit (`held()`)."""

from __future__ import annotations

import errno
import threading
import time
from types import TracebackType

from kryptvault.fs.errors import FsError


class SealableLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sealed = False
        self.last_entered = time.monotonic()

    def __enter__(self) -> None:
        self._lock.acquire()
        if self.sealed:
            self._lock.release()
            raise FsError(errno.EIO, "the vault is locking")
        self.last_entered = time.monotonic()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()

    def try_enter(self) -> bool:
        """Take the lock if it is free and the filesystem not sealed; `leave()` after."""
        if not self._lock.acquire(blocking=False):
            return False
        if self.sealed:
            self._lock.release()
            return False
        return True  # (not `last_entered`: background work is no sign of use)

    def leave(self) -> None:
        self._lock.release()

    def seal(self) -> None:
        """Wait for the operation in progress, then refuse all later ones."""
        with self._lock:
            self.sealed = True

    def held(self) -> threading.Lock:
        """The raw lock, for the lock sequence's own final commit after sealing."""
        return self._lock
