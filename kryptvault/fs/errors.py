"""The one exception the filesystem layer raises: an OSError carrying a POSIX errno."""

from __future__ import annotations

import os


class FsError(OSError):
    """A filesystem operation failed with `errno`; the FUSE adapter returns -errno to the kernel.

    It is an OSError so that the FUSE server answers any OSError the same way (its errno);
    `detail` is for logs and never contains file contents or keys.
    """

    def __init__(self, err: int, detail: str | None = None) -> None:
        super().__init__(err, detail or os.strerror(err))
