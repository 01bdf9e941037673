"""A USB stick as a token: identified by VID/PID/serial, share files on its mounted filesystem."""

from __future__ import annotations

import os

from kryptvault.errors import TokenError
from kryptvault.token.base import TokenIdentity
from kryptvault.token.discover import UsbStick
from kryptvault.token.fstoken import MountedFilesystemToken
from kryptvault.token.mounts import Mount
from kryptvault.token.sysfs import BlockDevice, read_attr


class UsbToken(MountedFilesystemToken):
    """Built by `resolve_token` from a discovered stick and one of its mounted filesystems."""

    def __init__(self, stick: UsbStick, block: BlockDevice, mount: Mount) -> None:
        if not stick.serial:
            raise TokenError(
                f"{stick.describe()} reports no serial number, so it cannot be a token: "
                "use --token fs:UUID or --token PATH instead"
            )
        if stick.sysfs_path is None:
            raise TokenError(f"{stick.describe()} was not found in sysfs")
        identity = TokenIdentity(
            "usb",
            vendor_id=stick.vendor_id,
            product_id=stick.product_id,
            serial=stick.serial,
            fs_uuid=block.fs_uuid,
        )
        self.stick = stick
        self.block = block
        super().__init__(identity, mount, block.sysfs_path)

    def is_present(self) -> bool:
        # Two file reads and a few stats: cheap enough to poll every 200 ms.
        sysfs_path = self.stick.sysfs_path or ""
        if not os.path.isdir(sysfs_path):
            return False
        if read_attr(sysfs_path, "serial") != self.identity.serial:
            return False  # another device now sits at the same port
        return super().is_present()
