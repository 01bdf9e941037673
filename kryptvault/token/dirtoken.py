"""`--token PATH`: a folder on any mounted drive holds the share files."""

from __future__ import annotations

import os
from pathlib import Path

from kryptvault.errors import TokenError
from kryptvault.token.base import Token, TokenIdentity
from kryptvault.token.mounts import MountWatch, block_sysfs_dir, mount_containing


class DirectoryToken(Token):
    """share_dir is the directory itself; it must exist (we never create it)."""

    def __init__(self, path: str | os.PathLike[str], *, sysfs_root: str = "/sys") -> None:
        given = Path(path).expanduser()
        if not given.exists():
            raise TokenError(f"token directory {given} does not exist")
        if not given.is_dir():
            raise TokenError(f"token directory {given} is not a directory")
        real = os.path.realpath(given)
        mount = mount_containing(real)
        if mount is None:
            raise TokenError(f"token directory {given} is not on a mounted filesystem")
        st_dev = os.stat(real).st_dev
        if os.stat(mount.mountpoint).st_dev != st_dev:
            # psutil's table and the kernel disagree (e.g. a mount in another namespace):
            # we could not tell later whether it was unmounted.
            raise TokenError(f"cannot tell which mounted filesystem holds {given}")
        self.identity = TokenIdentity("dir", path=real)
        self.share_dir = Path(real)
        self._watch = MountWatch.of(real, mount, block_sysfs_dir(st_dev, sysfs_root))

    def is_present(self) -> bool:
        return self._watch.still_mounted()
