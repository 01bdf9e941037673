"""An flock on a lock file whose holder unlinks the name when it is done.

Unlinking at release keeps the runtime directory clean, but a process that opened the old
name just before the unlink would lock a dead inode that guards nothing; `take_flock`
sees that and tries the name again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def take_flock(path: Path) -> int | None:
    """The descriptor holding an exclusive flock on the file at `path` (created if
    missing; keep the descriptor open for as long as the lock is to be held), or None
    when another process holds it. Any other failure raises the OSError."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        # The previous holder unlinks the name while still holding it: if ours is no
        # longer the file at that name, we locked a dead inode and must try again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        except OSError:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)
