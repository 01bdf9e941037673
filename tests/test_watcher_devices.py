"""Which devpaths the watcher resolves for each kind of token.

The host has no USB stack, so the USB cases use a sysfs tree laid out like the guest's
(the token layer's `sysfs_root` extension point); the loop case uses the real /sys.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kryptvault.token.dirtoken import DirectoryToken
from kryptvault.token.discover import UsbStick
from kryptvault.token.mounts import Mount
from kryptvault.token.sysfs import BlockDevice
from kryptvault.token.usbtoken import UsbToken
from kryptvault.watcher.devices import watched_devices

STICK = "devices/pci0000:00/0000:00:02.0/usb2/2-1"
DISK = STICK + "/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda"


def fake_sysfs(root: Path, st_dev: int | None = None) -> Path:
    """A guest-like /sys: the stick (with idVendor/busnum/serial), its interface and disk."""
    stick = root / STICK
    stick.mkdir(parents=True)
    for name, value in (
        ("idVendor", "46f4"),
        ("idProduct", "0001"),
        ("busnum", "2"),
        ("serial", "TOKEN-1234"),
    ):
        (stick / name).write_text(value + "\n")
    (stick / "2-1:1.0").mkdir()
    (stick / "2-1:1.0" / "bInterfaceClass").write_text("08\n")
    (root / DISK / "sda1").mkdir(parents=True)
    (root / DISK / "sda1" / "partition").write_text("1\n")
    (root / "bus" / "usb" / "devices").mkdir(parents=True)
    (root / "bus" / "usb" / "devices" / "2-1").symlink_to(root / STICK)
    if st_dev is not None:  # /sys/dev/block/MAJ:MIN of the filesystem under test -> sda1
        (root / "dev" / "block").mkdir(parents=True)
        (root / "dev" / "block" / f"{os.major(st_dev)}:{os.minor(st_dev)}").symlink_to(root / DISK / "sda1")
    return root


def test_usb_token_watches_its_stick_and_its_partition(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    mountpoint = tmp_path / "stick"
    mountpoint.mkdir()
    stick = UsbStick(0x46F4, 0x0001, "TOKEN-1234", "QEMU", "QEMU USB HARDDRIVE", 2, (1,), str(sysfs / STICK))
    block = BlockDevice("/dev/sda1", "1234-ABCD", "vfat", [str(mountpoint)], str(sysfs / DISK / "sda1"))
    token = UsbToken(stick, block, Mount("/dev/sda1", str(mountpoint), "vfat", False))
    devices = watched_devices(token, sysfs_root=str(sysfs))
    assert devices.usb == "/" + STICK
    assert devices.block == "/" + DISK + "/sda1"


@pytest.mark.skipif(os.major(os.stat("/tmp").st_dev) == 0, reason="needs /tmp on a block device")
def test_directory_token_on_a_usb_partition_also_watches_the_stick(tmp_path: Path) -> None:
    folder = tmp_path / "token"
    folder.mkdir()
    sysfs = fake_sysfs(tmp_path / "sys", st_dev=os.stat(folder).st_dev)
    token = DirectoryToken(folder, sysfs_root=str(sysfs))
    devices = watched_devices(token, sysfs_root=str(sysfs))
    assert devices.block == "/" + DISK + "/sda1"
    assert devices.usb == "/" + STICK  # the nearest ancestor with idVendor and busnum
    assert devices.removal_means_gone("/" + STICK + "/2-1:1.0")


def test_directory_token_on_tmpfs_has_no_device_to_watch(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.major(os.stat(shm).st_dev) != 0:
        pytest.skip("no tmpfs at /dev/shm")
    devices = watched_devices(DirectoryToken(shm))
    assert not devices.any


@pytest.mark.skipif(not os.path.isdir("/sys/dev/block"), reason="needs sysfs")
def test_directory_token_on_the_root_disk_watches_that_disk(tmp_path: Path) -> None:
    st_dev = os.stat(tmp_path).st_dev
    if os.major(st_dev) == 0:
        pytest.skip("tmp_path is not on a block device")
    devices = watched_devices(DirectoryToken(tmp_path))
    real = os.path.realpath(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    assert devices.block == real.removeprefix("/sys")
