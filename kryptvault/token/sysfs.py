"""From a USB device in sysfs to its block devices, their filesystems and mountpoints.

sysfs lays the tree out by physical path: a stick at bus 2, port 1 is
`/sys/bus/usb/devices/2-1` (a link into /sys/devices/...), and its disk `/sys/block/sda`
has a `device` link whose target lies below that USB device's directory. Partitions are
the subdirectories of /sys/block/sda that hold a `partition` file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kryptvault.token.fsprobe import probe_filesystem
from kryptvault.token.mounts import Mount, mount_table, mounts_of_device


@dataclass
class BlockDevice:
    dev: str  # the device node, e.g. /dev/sda1
    fs_uuid: str | None
    fs_type: str | None
    mountpoints: list[str] = field(default_factory=list)
    sysfs_path: str | None = None  # vanishes when the device is unplugged


def usb_device_dir(bus: int, ports: tuple[int, ...], sysfs_root: str = "/sys") -> str:
    """sysfs directory of the USB device at `bus` and port chain `ports` (e.g. 2-1.4)."""
    name = f"{bus}-{'.'.join(str(p) for p in ports)}"
    return os.path.join(sysfs_root, "bus", "usb", "devices", name)


def read_attr(directory: str, name: str) -> str | None:
    """A sysfs attribute's text without the trailing newline; None if absent or unreadable."""
    try:
        with open(os.path.join(directory, name), "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    return raw.decode("utf-8", "replace").rstrip("\n")


def _partitions(disk_dir: str) -> list[str]:
    """Partition names of a disk, in partition-number order (sda2 before sda10)."""
    found: list[tuple[int, str]] = []
    try:
        names = os.listdir(disk_dir)
    except OSError:
        return []
    for name in names:
        number = read_attr(os.path.join(disk_dir, name), "partition")
        if number is not None and number.strip().isdigit():
            found.append((int(number), name))
    return [name for _, name in sorted(found)]


def block_devices_of(
    usb_dir: str,
    *,
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
    table: list[Mount] | None = None,
) -> list[BlockDevice]:
    """The disks (or, when partitioned, the partitions) that belong to a USB device.

    A disk without a partition table ("superfloppy", common on sticks) is itself listed.
    """
    usb_real = os.path.realpath(usb_dir)
    block_root = os.path.join(sysfs_root, "block")
    try:
        disks = sorted(os.listdir(block_root))
    except OSError:
        return []
    mounts = table if table is not None else mount_table()
    result: list[BlockDevice] = []
    for disk in disks:
        disk_dir = os.path.join(block_root, disk)
        target = os.path.realpath(os.path.join(disk_dir, "device"))
        # The separator matters: 2-1 must not claim the disks of 2-10.
        if not target.startswith(usb_real + os.sep):
            continue
        parts = _partitions(disk_dir)
        for name, sys_dir in [(p, os.path.join(disk_dir, p)) for p in parts] if parts else [(disk, disk_dir)]:
            dev = os.path.join(dev_root, name)
            on = mounts_of_device(dev, mounts)
            info = probe_filesystem(dev, dev_root, known_type=on[0].fstype if on else None)
            result.append(BlockDevice(dev, info.uuid, info.fs_type, [m.mountpoint for m in on], sys_dir))
    return result
