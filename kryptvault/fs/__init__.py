"""Filesystem semantics over the ObjectStore (no FUSE here): see filesystem.py."""

from kryptvault.fs.commit import CommitScheduler
from kryptvault.fs.errors import FsError
from kryptvault.fs.filesystem import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    UTIME_NOW,
    UTIME_OMIT,
    Filesystem,
    Stat,
    StatFs,
)

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "UTIME_NOW",
    "UTIME_OMIT",
    "CommitScheduler",
    "Filesystem",
    "FsError",
    "Stat",
    "StatFs",
]
