"""A block device's filesystem UUID and type.

Three sources, cheapest and least privileged first: the /dev/disk/by-uuid symlinks that
udev keeps (absent where no udev runs), `blkid` (may need read access to the device, but
can answer from its cache), and our own reading of the vfat/exfat/ext2-4 superblock.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass

_PROBE_BYTES = 2048  # enough for the FAT boot sector and the ext superblock (1024 + 0x78)


@dataclass(frozen=True)
class FsInfo:
    uuid: str | None
    fs_type: str | None


def _vfat_serial(value: int) -> str:
    # Shown the way blkid and /dev/disk/by-uuid show it: XXXX-XXXX, upper-case hex.
    return f"{value >> 16:04X}-{value & 0xFFFF:04X}"


def parse_superblock(head: bytes) -> FsInfo | None:
    """Recognise vfat, exfat and ext2/3/4 from the first 2 KiB of a device."""
    if len(head) >= 1024 + 0x78 and head[1024 + 0x38 : 1024 + 0x3A] == b"\x53\xef":
        sb = head[1024:]
        compat, incompat = struct.unpack_from("<II", sb, 0x5C)
        if incompat & 0x2C0:  # extents | 64bit | flex_bg: only ext4 sets these
            fs_type = "ext4"
        elif compat & 0x4:  # has_journal
            fs_type = "ext3"
        else:
            fs_type = "ext2"
        return FsInfo(str(uuid.UUID(bytes=bytes(sb[0x68:0x78]))), fs_type)
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return None
    if head[3:11] == b"EXFAT   ":
        (serial,) = struct.unpack_from("<I", head, 0x64)
        return FsInfo(_vfat_serial(serial), "exfat")
    # FAT32 keeps its extended BPB further out than FAT12/16; 0x29 marks a valid volume id.
    if head[0x52:0x5A] == b"FAT32   " and head[0x42] == 0x29:
        (serial,) = struct.unpack_from("<I", head, 0x43)
        return FsInfo(_vfat_serial(serial), "vfat")
    if head[0x36:0x39] == b"FAT" and head[0x26] == 0x29:
        (serial,) = struct.unpack_from("<I", head, 0x27)
        return FsInfo(_vfat_serial(serial), "vfat")
    return None


def uuid_from_by_uuid(dev: str, dev_root: str = "/dev") -> str | None:
    """The UUID whose /dev/disk/by-uuid link points at `dev`, if udev made one."""
    links = os.path.join(dev_root, "disk", "by-uuid")
    try:
        names = sorted(os.listdir(links))
    except OSError:
        return None
    real = os.path.realpath(dev)
    for name in names:
        if os.path.realpath(os.path.join(links, name)) == real:
            return name
    return None


def device_by_uuid(fs_uuid: str, dev_root: str = "/dev") -> str | None:
    """The device node for a filesystem UUID, from the by-uuid links (case-insensitive)."""
    links = os.path.join(dev_root, "disk", "by-uuid")
    try:
        names = os.listdir(links)
    except OSError:
        return None
    for name in names:
        if name.casefold() == fs_uuid.casefold():
            return os.path.realpath(os.path.join(links, name))
    return None


def _blkid(dev: str) -> FsInfo | None:
    exe = shutil.which("blkid") or next(
        (p for p in ("/usr/sbin/blkid", "/sbin/blkid") if os.access(p, os.X_OK)), None
    )
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "-o", "export", dev], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if "UUID" not in values and "TYPE" not in values:
        return None
    return FsInfo(values.get("UUID"), values.get("TYPE"))


def _read_superblock(dev: str) -> FsInfo | None:
    try:
        with open(dev, "rb", buffering=0) as f:
            head = f.read(_PROBE_BYTES)
    except OSError:
        return None
    return parse_superblock(head)


def probe_filesystem(dev: str, dev_root: str = "/dev", known_type: str | None = None) -> FsInfo:
    """UUID and type of the filesystem on `dev`; fields stay None when nothing could tell.

    `known_type` (from the mount table, when mounted) saves a probe.
    """
    fs_uuid = uuid_from_by_uuid(dev, dev_root)
    fs_type = known_type
    for source in (_blkid, _read_superblock):
        if fs_uuid is not None and fs_type is not None:
            break
        info = source(dev)
        if info is not None:
            fs_uuid = fs_uuid or info.uuid
            fs_type = fs_type or info.fs_type
    return FsInfo(fs_uuid, fs_type)
