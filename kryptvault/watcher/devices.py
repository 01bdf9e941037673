"""Which kernel devices stand for a token, in uevent terms (devpaths below /sys).

A stick leaving shows up as a series of `remove` uevents. Measured in the guest: bsg,
scsi_device and scsi_disk below the stick first, then block sda (30-60 ms later under
TCG), then the SCSI host, the USB interface 2-1:1.0 and the USB device 2-1. A token is
gone when a removed device is its block device or lies above it (the disk of a
partition, the USB interface, the stick itself), or lies anywhere below the USB device
the token's block device hangs off, so the first of those events already counts.
Devices beside ours (another partition of the same disk, deleted with parted) do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kryptvault.token.base import Token
from kryptvault.token.fido2token import Fido2Token
from kryptvault.token.fstoken import MountedFilesystemToken
from kryptvault.token.mounts import block_sysfs_dir
from kryptvault.token.usbtoken import UsbToken


def is_at_or_below(devpath: str, ancestor: str) -> bool:
    # The separator matters: /devices/.../2-1 must not claim /devices/.../2-10.
    return devpath == ancestor or devpath.startswith(ancestor + "/")


@dataclass(frozen=True)
class WatchedDevices:
    """The devpaths of a token's block device and (if any) its USB device."""

    block: str | None  # e.g. /devices/virtual/block/loop0, /devices/.../block/sda/sda1
    usb: str | None  # e.g. /devices/pci0000:00/0000:00:04.0/usb2/2-1

    @property
    def any(self) -> bool:
        return self.block is not None or self.usb is not None

    def removal_means_gone(self, devpath: str) -> bool:
        """Whether removing `devpath` takes the token away."""
        if self.usb is not None and is_at_or_below(devpath, self.usb):
            return True
        return self.block is not None and is_at_or_below(self.block, devpath)

    def concerns(self, devpath: str) -> bool:
        """Whether a uevent about `devpath` (any action) may be about our token."""
        if self.removal_means_gone(devpath):
            return True
        return self.block is not None and is_at_or_below(devpath, self.block)


def _devpath(sysfs_dir: str | None, sysfs_root: str) -> str | None:
    if sysfs_dir is None:
        return None
    real = os.path.realpath(sysfs_dir)
    root = os.path.realpath(sysfs_root)
    if not os.path.isdir(real) or not real.startswith(root + "/devices/"):
        return None
    return real[len(root) :]


def _usb_ancestor(devpath: str, sysfs_root: str) -> str | None:
    """The USB device (the one with idVendor and busnum) a block device hangs off, if any."""
    parts = devpath.split("/")
    for end in range(len(parts), 2, -1):
        candidate = "/".join(parts[:end])
        base = os.path.join(sysfs_root, candidate.lstrip("/"))
        if os.path.isfile(os.path.join(base, "idVendor")) and os.path.isfile(os.path.join(base, "busnum")):
            return candidate
    return None


def _holding_path(token: Token) -> Path:
    """An existing path on the token's filesystem (the share dir may not exist yet)."""
    path = token.mountpoint if isinstance(token, MountedFilesystemToken) else token.share_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def watched_devices(token: Token, sysfs_root: str = "/sys") -> WatchedDevices:
    """Resolve now, while the token is present: after removal sysfs no longer knows."""
    usb: str | None = None
    block: str | None = None
    if isinstance(token, UsbToken):
        usb = _devpath(token.stick.sysfs_path, sysfs_root)
        block = _devpath(token.block.sysfs_path, sysfs_root)
    if isinstance(token, Fido2Token):
        # The hidraw node stands where a block device would: its removal, or that of the
        # HID device or USB interface above it, or of anything below the USB device, is
        # the key leaving. (A UHID key has no USB device: the hidraw and HID removals.)
        block = _devpath(token.sysfs_path, sysfs_root)
        usb = _usb_ancestor(block, sysfs_root) if block is not None else None
        return WatchedDevices(block, usb)
    if block is None:
        try:
            st_dev = os.stat(_holding_path(token)).st_dev
        except OSError:
            st_dev = 0
        if st_dev:
            block = _devpath(block_sysfs_dir(st_dev, sysfs_root), sysfs_root)
    if usb is None and block is not None:
        # An fs: or directory token on a stick: the stick's own removal events come first.
        usb = _usb_ancestor(block, sysfs_root)
    return WatchedDevices(block, usb)
