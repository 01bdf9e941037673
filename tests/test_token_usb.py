"""USB discovery through pyusb's backend interface, mapped onto a fake /sys and /dev tree."""

from __future__ import annotations

import array
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import usb.backend
import usb.core
from needs import require_tool

from kryptvault.errors import TokenError
from kryptvault.token import (
    Share,
    TokenIdentity,
    UsbToken,
    discover_usb_sticks,
    list_registrations,
    resolve_token,
)
from kryptvault.token.fsprobe import parse_superblock, probe_filesystem
from kryptvault.token.sysfs import block_devices_of

# --- a pyusb backend double (pyusb's documented extension point) -------------------------


@dataclass
class FakeUsbDevice:
    vendor: int
    product: int
    bus: int
    ports: tuple[int, ...]
    interface_class: int = 8
    strings: dict[int, str] = field(default_factory=dict)  # 1 manufacturer, 2 product, 3 serial
    denied: bool = False  # opening fails, as for a user without access to /dev/bus/usb


class FakeBackend(usb.backend.IBackend):  # type: ignore[misc]
    def __init__(self, devices: list[FakeUsbDevice]) -> None:
        super().__init__()
        self.devices = devices

    def enumerate_devices(self) -> Iterator[FakeUsbDevice]:
        yield from self.devices

    def get_device_descriptor(self, dev: FakeUsbDevice) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x200,
            bDeviceClass=0,  # class given per interface, as real sticks do
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=64,
            idVendor=dev.vendor,
            idProduct=dev.product,
            bcdDevice=0x100,
            iManufacturer=1 if 1 in dev.strings else 0,
            iProduct=2 if 2 in dev.strings else 0,
            iSerialNumber=3 if 3 in dev.strings else 0,
            bNumConfigurations=1,
            address=len(dev.ports) + 1,
            bus=dev.bus,
            port_number=dev.ports[-1],
            port_numbers=dev.ports,
            speed=3,
        )

    def get_configuration_descriptor(self, dev: FakeUsbDevice, config: int) -> SimpleNamespace:
        if config != 0:
            raise IndexError(config)
        return SimpleNamespace(
            bLength=9,
            bDescriptorType=2,
            wTotalLength=32,
            bNumInterfaces=1,
            bConfigurationValue=1,
            iConfiguration=0,
            bmAttributes=0x80,
            bMaxPower=50,
            extra_descriptors=[],
        )

    def get_interface_descriptor(
        self, dev: FakeUsbDevice, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        if (intf, alt, config) != (0, 0, 0):
            raise IndexError((intf, alt, config))
        return SimpleNamespace(
            bLength=9,
            bDescriptorType=4,
            bInterfaceNumber=0,
            bAlternateSetting=0,
            bNumEndpoints=0,
            bInterfaceClass=dev.interface_class,
            bInterfaceSubClass=6,
            bInterfaceProtocol=0x50,
            iInterface=0,
            extra_descriptors=[],
        )

    def open_device(self, dev: FakeUsbDevice) -> FakeUsbDevice:
        if dev.denied:
            raise usb.core.USBError("Access denied (insufficient permissions)", errno=13)
        return dev

    def close_device(self, dev_handle: FakeUsbDevice) -> None:
        pass

    def ctrl_transfer(
        self,
        dev_handle: FakeUsbDevice,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array.array[int],
        timeout: int,
    ) -> int:
        # Only GET_DESCRIPTOR(STRING) is ever asked for by discovery.
        assert (bmRequestType, bRequest, wValue >> 8) == (0x80, 6, 3)
        index = wValue & 0xFF
        if index == 0:
            payload = bytes([4, 3]) + struct.pack("<H", 0x0409)
        else:
            text = dev_handle.strings[index].encode("utf-16-le")
            payload = bytes([2 + len(text), 3]) + text
        n = min(len(data), len(payload))
        data[:n] = array.array("B", payload[:n])
        return n


def stick(serial: str, ports: tuple[int, ...] = (1,), bus: int = 2, **kw: Any) -> FakeUsbDevice:
    return FakeUsbDevice(
        0x46F4, 0x0001, bus, ports, strings={1: "QEMU", 2: "QEMU USB HARDDRIVE", 3: serial}, **kw
    )


KEYBOARD = FakeUsbDevice(0x046D, 0xC31C, 1, (2,), interface_class=3, strings={1: "Logitech", 2: "Keyboard"})

# --- a fake sysfs + /dev tree -----------------------------------------------------------

FAT32_UUID = "1234-ABCD"


def fat32_boot_sector(volume_id: int) -> bytes:
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x58\x90"
    sector[3:11] = b"MSWIN4.1"
    sector[0x42] = 0x29
    struct.pack_into("<I", sector, 0x43, volume_id)
    sector[0x47:0x52] = b"NO NAME    "
    sector[0x52:0x5A] = b"FAT32   "
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def fat16_boot_sector(volume_id: int) -> bytes:
    sector = bytearray(512)
    sector[0x26] = 0x29
    struct.pack_into("<I", sector, 0x27, volume_id)
    sector[0x36:0x3E] = b"FAT16   "
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


@dataclass
class FakeTree:
    sys: Path
    dev: Path

    def add_usb(
        self,
        name: str,
        serial: str | None,
        disk: str | None = None,
        partitions: dict[str, str | None] | None = None,
        content: bytes | None = None,
        interface_class: str = "08",
    ) -> Path:
        """A USB device `name` (e.g. "2-1") with an optional disk and partitions.

        partitions maps a partition name to its filesystem UUID (recorded in by-uuid).
        """
        hub = self.sys / "devices" / "pci0000:00" / "0000:00:04.0" / f"usb{name.split('-')[0]}"
        usb_dir = hub / name
        usb_dir.mkdir(parents=True)
        if serial is not None:
            (usb_dir / "serial").write_text(serial + "\n")
        (usb_dir / "idVendor").write_text("46f4\n")
        (usb_dir / "idProduct").write_text("0001\n")
        (usb_dir / "manufacturer").write_text("QEMU\n")
        interface = usb_dir / f"{name}:1.0"
        interface.mkdir()
        (interface / "bInterfaceClass").write_text(interface_class + "\n")
        (usb_dir / "product").write_text("QEMU USB HARDDRIVE\n")
        (usb_dir / "busnum").write_text(name.split("-")[0] + "\n")
        (usb_dir / "devpath").write_text(name.split("-")[1] + "\n")
        links = self.sys / "bus" / "usb" / "devices"
        links.mkdir(parents=True, exist_ok=True)
        (links / name).symlink_to(os.path.relpath(usb_dir, links))
        if disk is not None:
            scsi = interface / "host0" / "target0:0:0" / "0:0:0:0"
            scsi.mkdir(parents=True)
            disk_dir = self.sys / "block" / disk
            disk_dir.mkdir(parents=True)
            (disk_dir / "device").symlink_to(os.path.relpath(scsi, disk_dir))
            (self.dev / disk).write_bytes(content or bytes(4096))
            for number, (part, fs_uuid) in enumerate((partitions or {}).items(), start=1):
                (disk_dir / part).mkdir()
                (disk_dir / part / "partition").write_text(f"{number}\n")
                (self.dev / part).write_bytes(content or bytes(4096))
                if fs_uuid is not None:
                    by_uuid = self.dev / "disk" / "by-uuid"
                    by_uuid.mkdir(parents=True, exist_ok=True)
                    (by_uuid / fs_uuid).symlink_to(f"../../{part}")
        return usb_dir

    def resolve(self, spec: str | None, backend: FakeBackend, **kw: Any) -> Any:
        return resolve_token(spec, backend=backend, sysfs_root=str(self.sys), dev_root=str(self.dev), **kw)

    def discover(self, backend: FakeBackend) -> Any:
        return discover_usb_sticks(backend=backend, sysfs_root=str(self.sys), dev_root=str(self.dev))


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    (tmp_path / "sys" / "block").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    return FakeTree(tmp_path / "sys", tmp_path / "dev")


# --- discovery --------------------------------------------------------------------------


def test_a_mass_storage_stick_is_listed_with_its_ids_and_strings(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": FAT32_UUID})
    (found,) = tree.discover(FakeBackend([stick("TOKEN-1234")]))
    assert (found.vendor_id, found.product_id, found.serial) == (0x46F4, 1, "TOKEN-1234")
    assert (found.manufacturer, found.product) == ("QEMU", "QEMU USB HARDDRIVE")
    assert (found.bus, found.ports) == (2, (1,))
    assert found.sysfs_path == str(tree.sys / "bus/usb/devices/2-1")
    (block,) = found.block_devices
    assert block.dev == str(tree.dev / "sda1")
    assert block.fs_uuid == FAT32_UUID
    assert block.mountpoints == []


def test_a_keyboard_is_not_a_stick(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": FAT32_UUID})
    found = tree.discover(FakeBackend([KEYBOARD, stick("TOKEN-1234")]))
    assert [s.serial for s in found] == ["TOKEN-1234"]


def test_strings_that_cannot_be_read_over_usb_come_from_sysfs(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": FAT32_UUID})
    (found,) = tree.discover(FakeBackend([stick("TOKEN-1234", denied=True)]))
    assert (found.serial, found.manufacturer) == ("TOKEN-1234", "QEMU")
    assert found.block_devices


def test_without_sysfs_unreadable_strings_stay_none(tmp_path: Path) -> None:
    found = discover_usb_sticks(
        backend=FakeBackend([stick("X", denied=True)]),
        sysfs_root=str(tmp_path / "nosys"),
        dev_root=str(tmp_path),
    )
    assert [(s.serial, s.manufacturer, s.product, s.sysfs_path) for s in found] == [(None, None, None, None)]


def test_a_device_that_left_sysfs_is_not_listed(tree: FakeTree) -> None:
    # libusb's list can lag behind an unplug; the kernel's cannot.
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": FAT32_UUID})
    found = tree.discover(FakeBackend([stick("TOKEN-1234"), stick("GHOST", ports=(7,))]))
    assert [s.serial for s in found] == ["TOKEN-1234"]


def test_a_stick_libusb_missed_is_found_through_sysfs(tree: FakeTree) -> None:
    # Where no udevd runs, libusb never hears of sticks plugged in after its first use.
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": FAT32_UUID})
    tree.add_usb("1-3", "KEYBOARD", interface_class="03")
    (found,) = tree.discover(FakeBackend([]))
    assert (found.vendor_id, found.product_id, found.serial) == (0x46F4, 1, "TOKEN-1234")
    assert (found.bus, found.ports, found.product) == (2, (1,), "QEMU USB HARDDRIVE")
    assert [b.fs_uuid for b in found.block_devices] == [FAT32_UUID]


def test_when_libusb_and_sysfs_disagree_on_the_serial_sysfs_wins(tree: FakeTree) -> None:
    tree.add_usb("2-1", "SOMEONE-ELSE", "sda", {"sda1": FAT32_UUID})
    (found,) = tree.discover(FakeBackend([stick("TOKEN-1234")]))
    assert found.serial == "SOMEONE-ELSE"


def test_a_stick_behind_a_hub_maps_by_its_port_chain(tree: FakeTree) -> None:
    tree.add_usb("2-1", "OTHER", "sda", {"sda1": "AAAA-0001"})
    tree.add_usb("2-1.4", "TOKEN-1234", "sdb", {"sdb1": "BBBB-0002"})
    found = tree.discover(FakeBackend([stick("TOKEN-1234", ports=(1, 4))]))
    by_serial = {s.serial: s for s in found}
    assert by_serial["TOKEN-1234"].ports == (1, 4)
    assert [b.fs_uuid for b in by_serial["TOKEN-1234"].block_devices] == ["BBBB-0002"]
    assert [b.fs_uuid for b in by_serial["OTHER"].block_devices] == ["AAAA-0001"]


def test_the_disks_of_port_10_do_not_belong_to_port_1(tree: FakeTree) -> None:
    tree.add_usb("2-1", "A", "sda", {"sda1": "AAAA-0001"})
    usb10 = tree.add_usb("2-10", "B", "sdb", {"sdb1": "BBBB-0002"})
    assert [
        b.dev for b in block_devices_of(str(usb10), sysfs_root=str(tree.sys), dev_root=str(tree.dev))
    ] == [str(tree.dev / "sdb1")]


def test_partitions_are_listed_in_partition_number_order(tree: FakeTree) -> None:
    parts: dict[str, str | None] = {f"sda{i}": f"AAAA-{i:04d}" for i in range(1, 12)}
    tree.add_usb("2-1", "TOKEN-1234", "sda", parts)
    (found,) = tree.discover(FakeBackend([stick("TOKEN-1234")]))
    assert [b.dev.rsplit("/", 1)[1] for b in found.block_devices] == list(parts)


def test_an_unpartitioned_stick_lists_its_whole_disk_with_the_superblock_uuid(
    tree: FakeTree,
) -> None:
    # No by-uuid links (no udev): the UUID comes from blkid or our own superblock reading.
    tree.add_usb("2-1", "TOKEN-1234", "sda", content=fat32_boot_sector(0x1234ABCD) + bytes(3584))
    (found,) = tree.discover(FakeBackend([stick("TOKEN-1234")]))
    (block,) = found.block_devices
    assert (block.dev, block.fs_uuid, block.fs_type) == (str(tree.dev / "sda"), "1234-ABCD", "vfat")


# --- superblocks ------------------------------------------------------------------------


def test_superblocks_of_fat32_fat16_and_exfat_give_the_volume_id() -> None:
    fat32 = parse_superblock(fat32_boot_sector(0x0A0B0C0D))
    assert fat32 is not None and (fat32.uuid, fat32.fs_type) == ("0A0B-0C0D", "vfat")
    fat16 = parse_superblock(fat16_boot_sector(0xDEADBEEF))
    assert fat16 is not None and (fat16.uuid, fat16.fs_type) == ("DEAD-BEEF", "vfat")
    exfat = bytearray(512)
    exfat[3:11] = b"EXFAT   "
    struct.pack_into("<I", exfat, 0x64, 0x00C0FFEE)
    exfat[510:512] = b"\x55\xaa"
    info = parse_superblock(bytes(exfat))
    assert info is not None and (info.uuid, info.fs_type) == ("00C0-FFEE", "exfat")
    assert parse_superblock(bytes(2048)) is None
    assert parse_superblock(b"") is None


def test_an_ext4_superblock_gives_the_same_uuid_as_mkfs_was_told(tmp_path: Path) -> None:
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    img = tmp_path / "ext4.img"
    fs_uuid = str(uuid.uuid4())
    subprocess.run([mkfs, "-q", "-F", "-U", fs_uuid, str(img), "8M"], check=True, capture_output=True)
    info = parse_superblock(img.read_bytes()[:2048])
    assert info is not None and (info.uuid, info.fs_type) == (fs_uuid, "ext4")
    assert probe_filesystem(str(img), str(tmp_path)).uuid == fs_uuid


# --- resolving a spec -------------------------------------------------------------------


def test_auto_refuses_to_choose_between_two_sticks_and_lists_them(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": "AAAA-0001"})
    tree.add_usb("2-2", "TOKEN-5678", "sdb", {"sdb1": "BBBB-0002"})
    backend = FakeBackend([stick("TOKEN-1234"), stick("TOKEN-5678", ports=(2,)), KEYBOARD])
    with pytest.raises(TokenError, match="several sticks are plugged") as err:
        tree.resolve("auto", backend)
    assert "TOKEN-1234" in str(err.value) and "TOKEN-5678" in str(err.value)
    assert "--token SERIAL" in str(err.value)
    assert "\n" not in str(err.value)


def test_auto_with_no_stick_says_none_is_plugged(tree: FakeTree) -> None:
    with pytest.raises(TokenError, match="no USB stick is plugged in"):
        tree.resolve(None, FakeBackend([KEYBOARD]))


def test_a_plugged_but_unmounted_stick_explains_how_to_mount_it(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": "AAAA-0001"})
    with pytest.raises(TokenError, match="plugged in but not mounted") as err:
        tree.resolve("TOKEN-1234", FakeBackend([stick("TOKEN-1234")]))
    assert f"{tree.dev}/sda1" in str(err.value)
    assert "mount" in str(err.value).split(":", 1)[1]


def test_the_keyslot_identity_picks_its_stick_among_several(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": "AAAA-0001"})
    tree.add_usb("2-2", "TOKEN-5678", "sdb", {"sdb1": "BBBB-0002"})
    backend = FakeBackend([stick("TOKEN-1234"), stick("TOKEN-5678", ports=(2,))])
    ident = TokenIdentity("usb", vendor_id=0x46F4, product_id=1, serial="TOKEN-5678")
    # Unmounted in the fake tree, so resolution stops at the mount hint for the right disk.
    with pytest.raises(TokenError, match="sdb1"):
        tree.resolve("auto", backend, identity=ident)
    gone = TokenIdentity("usb", vendor_id=0x46F4, product_id=1, serial="LOST")
    with pytest.raises(TokenError, match="not plugged in: USB 46f4:0001 serial LOST"):
        tree.resolve(None, backend, identity=gone)


def test_an_unknown_serial_lists_the_plugged_sticks(tree: FakeTree) -> None:
    tree.add_usb("2-1", "TOKEN-1234", "sda", {"sda1": "AAAA-0001"})
    with pytest.raises(TokenError, match=r"no plugged USB stick has serial NOPE .*TOKEN-1234"):
        tree.resolve("NOPE", FakeBackend([stick("TOKEN-1234")]))


def test_a_stick_without_a_serial_cannot_be_a_token(tree: FakeTree) -> None:
    tree.add_usb("2-1", None, "sda", {"sda1": "AAAA-0001"})
    nameless = FakeUsbDevice(0x1234, 0x5678, 2, (1,), strings={2: "Cheap stick"})
    (found,) = tree.discover(FakeBackend([nameless]))
    assert found.serial is None
    with pytest.raises(TokenError, match="no serial"):
        UsbToken(found, found.block_devices[0], None)  # type: ignore[arg-type]


def test_specs_with_a_slash_are_directories_and_fs_prefix_is_a_filesystem(
    tree: FakeTree, tmp_path: Path
) -> None:
    token = tree.resolve(str(tmp_path), FakeBackend([]))
    assert token.identity.kind == "dir"
    with pytest.raises(TokenError, match="no mounted filesystem has UUID 0000-DEAD"):
        tree.resolve("fs:0000-DEAD", FakeBackend([]))
    with pytest.raises(TokenError, match="directory"):
        tree.resolve(None, FakeBackend([]), identity=TokenIdentity("dir"))


# --- a real mounted filesystem standing in for the stick's partition (root only) --------


@pytest.fixture
def loop_mount(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """An ext4 image on a loop device, mounted: (device, mountpoint, fs UUID)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mount)")
    img, mnt = tmp_path / "stick.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "8M"], check=True, capture_output=True)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        fs_uuid = subprocess.run(
            ["blkid", "-o", "value", "-s", "UUID", dev], check=True, capture_output=True, text=True
        ).stdout.strip()
        yield dev, mnt, fs_uuid
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.mark.root
def test_a_mounted_stick_is_a_usb_token_until_it_is_pulled(
    tree: FakeTree, loop_mount: tuple[str, Path, str]
) -> None:
    dev, mnt, fs_uuid = loop_mount
    name = os.path.basename(dev)
    # The fake sysfs says the loop device is the stick's disk; /dev is the real one.
    usb_dir = tree.add_usb("2-1", "TOKEN-1234")
    scsi = usb_dir / "2-1:1.0" / "host0" / "target0:0:0" / "0:0:0:0"
    scsi.mkdir(parents=True)
    (tree.sys / "block" / name).mkdir()
    (tree.sys / "block" / name / "device").symlink_to(scsi)
    backend = FakeBackend([stick("TOKEN-1234")])
    token = resolve_token(None, backend=backend, sysfs_root=str(tree.sys), dev_root="/dev")
    assert isinstance(token, UsbToken)
    assert token.identity == TokenIdentity(
        "usb", vendor_id=0x46F4, product_id=1, serial="TOKEN-1234", fs_uuid=fs_uuid
    )
    assert token.share_dir == mnt / ".kryptvault"
    assert token.is_present()
    vault = uuid.uuid4()
    token.write_share(Share.generate(vault, generation=3))
    assert list_registrations(token) == [vault]
    assert token.read_share(vault).generation == 3
    # Another stick appears at the same port: not our token any more.
    (usb_dir / "serial").write_text("IMPOSTOR\n")
    assert not token.is_present()
    (usb_dir / "serial").write_text("TOKEN-1234\n")
    assert token.is_present()
    # Pulled while still mounted: the kernel drops the sysfs entries first.
    shutil.rmtree(tree.sys / "block" / name)
    assert not token.is_present()
    with pytest.raises(TokenError, match="not present"):
        token.read_share(vault)
