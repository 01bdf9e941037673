"""Where filesystems are mounted (psutil's view of the mount table) and whether one still is."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Mount:
    device: str
    mountpoint: str
    fstype: str
    read_only: bool


def mount_table() -> list[Mount]:
    """Every mount, in mount order (a later entry on the same mountpoint hides an earlier)."""
    return [
        Mount(p.device, p.mountpoint, p.fstype, "ro" in p.opts.split(","))
        for p in psutil.disk_partitions(all=True)
    ]


def _is_under(path: str, mountpoint: str) -> bool:
    return mountpoint == "/" or path == mountpoint or path.startswith(mountpoint + "/")


def mount_containing(path: str, table: list[Mount] | None = None) -> Mount | None:
    """The mount that serves `path` (already resolved with realpath).

    The deepest mountpoint above the path wins; among entries on the same mountpoint, the
    last one mounted (the one on top) wins.
    """
    best: Mount | None = None
    for mount in table if table is not None else mount_table():
        if _is_under(path, mount.mountpoint) and (
            best is None or len(mount.mountpoint) >= len(best.mountpoint)
        ):
            best = mount
    return best


def mounts_of_device(dev: str, table: list[Mount] | None = None) -> list[Mount]:
    """The mounts whose source is block device `dev` (compared after resolving symlinks)."""
    real = os.path.realpath(dev)
    return [
        m
        for m in (table if table is not None else mount_table())
        if m.device.startswith("/") and os.path.realpath(m.device) == real
    ]


def block_sysfs_dir(st_dev: int, sysfs_root: str = "/sys") -> str | None:
    """`/sys/dev/block/MAJ:MIN` for a filesystem's st_dev; None for virtual filesystems."""
    major, minor = os.major(st_dev), os.minor(st_dev)
    if major == 0:  # tmpfs, btrfs subvolumes, FUSE...: no block device to watch
        return None
    return os.path.join(sysfs_root, "dev", "block", f"{major}:{minor}")


@dataclass(frozen=True)
class MountWatch:
    """Remembers a mount at resolve time, to tell cheaply (~0.1 ms) whether it is still there.

    A mount of a stick that was pulled out stays in the mount table and keeps answering
    stat() from cache, so the block device's sysfs directory is checked as well: the kernel
    removes it as soon as the device goes away.
    """

    path: str  # the share directory (or the directory it will be created in)
    mountpoint: str
    st_dev: int
    fsid: int
    block_sysfs: str | None

    @classmethod
    def of(cls, path: str, mount: Mount, block_sysfs: str | None) -> MountWatch:
        st_dev = os.stat(mount.mountpoint).st_dev
        return cls(path, mount.mountpoint, st_dev, os.statvfs(path).f_fsid, block_sysfs)

    def still_mounted(self) -> bool:
        try:
            if os.stat(self.mountpoint).st_dev != self.st_dev:
                return False  # unmounted: the mountpoint now shows the parent filesystem
            if os.stat(self.path).st_dev != self.st_dev:
                return False
            # ext4, xfs and btrfs derive f_fsid from the filesystem UUID: this tells apart
            # another filesystem that got the same device number and mountpoint.
            if os.statvfs(self.path).f_fsid != self.fsid:
                return False
        except OSError:
            return False
        if self.block_sysfs is not None and not os.path.isdir(self.block_sysfs):
            return False
        mount = mount_containing(self.path)
        return mount is not None and mount.mountpoint == self.mountpoint
