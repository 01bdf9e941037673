"""Tokens that are a whole mounted filesystem: share files live in `<mountpoint>/.kryptvault`.

`FsUuidToken` (`--token fs:UUID`) is any mounted filesystem with that UUID, e.g. an SD
card in a built-in reader that is not a USB device.
"""

from __future__ import annotations

import os
from pathlib import Path

from kryptvault.errors import TokenError
from kryptvault.token.base import Token, TokenIdentity, printable
from kryptvault.token.fsprobe import device_by_uuid, probe_filesystem
from kryptvault.token.mounts import Mount, MountWatch, block_sysfs_dir, mount_table
from kryptvault.token.share import SHARE_DIR_NAME, create_share_dir


class MountedFilesystemToken(Token):
    """Common part of the kinds whose share_dir is `.kryptvault` at a filesystem's root."""

    def __init__(self, identity: TokenIdentity, mount: Mount, block_sysfs: str | None) -> None:
        self.identity = identity
        self.mountpoint = Path(mount.mountpoint)
        self.share_dir = self.mountpoint / SHARE_DIR_NAME
        self._watch = MountWatch.of(mount.mountpoint, mount, block_sysfs)

    def _prepare_share_dir(self) -> None:
        create_share_dir(self.mountpoint)

    def is_present(self) -> bool:
        return self._watch.still_mounted()


def _pick_mount(mounts: list[Mount]) -> Mount:
    # A writable mount first: the share file must be writable at registration.
    return sorted(mounts, key=lambda m: m.read_only)[0]


class FsUuidToken(MountedFilesystemToken):
    def __init__(self, fs_uuid: str, *, sysfs_root: str = "/sys", dev_root: str = "/dev") -> None:
        wanted = fs_uuid.strip()
        if not wanted:
            raise TokenError("--token fs:UUID needs a filesystem UUID after 'fs:'")
        self._dev_root = dev_root
        candidates: dict[str, list[Mount]] = {}
        for mount in mount_table():
            if mount.device.startswith("/dev/"):
                candidates.setdefault(os.path.realpath(mount.device), []).append(mount)
        known = device_by_uuid(wanted, dev_root)
        for dev, mounts in candidates.items():
            if known is not None and dev != known:
                continue  # udev told us which device has it: skip probing the others
            info = probe_filesystem(dev, dev_root, known_type=mounts[0].fstype)
            if info.uuid is not None and info.uuid.casefold() == wanted.casefold():
                mount = _pick_mount(mounts)
                # Record the device's own spelling, so the binding is the same every time.
                identity = TokenIdentity("fs", fs_uuid=info.uuid)
                self._dev = dev
                st_dev = os.stat(mount.mountpoint).st_dev
                super().__init__(identity, mount, block_sysfs_dir(st_dev, sysfs_root))
                return
        shown = printable(wanted)
        if known is not None:
            raise TokenError(f"the filesystem with UUID {shown} ({known}) is not mounted: mount it first")
        raise TokenError(f"no mounted filesystem has UUID {shown}")

    def is_present(self) -> bool:
        if not super().is_present():
            return False
        # Where udev keeps by-uuid links, also make sure the UUID still names our device.
        fs_uuid = self.identity.fs_uuid or ""
        link = os.path.join(self._dev_root, "disk", "by-uuid", fs_uuid)
        if os.path.isdir(os.path.dirname(link)):
            return os.path.realpath(link) == self._dev
        return True
