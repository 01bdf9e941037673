"""Find the USB mass-storage sticks that are plugged in (pyusb), and map each to sysfs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import usb.core

from kryptvault.errors import TokenError
from kryptvault.token.base import printable
from kryptvault.token.mounts import Mount, mount_table
from kryptvault.token.sysfs import BlockDevice, block_devices_of, read_attr, usb_device_dir

MASS_STORAGE = 0x08

# What a string read can raise: no permission (USBError), no language ids (ValueError),
# a backend without control transfers (NotImplementedError), garbage UTF-16 (ValueError).
_STRING_ERRORS = (usb.core.USBError, ValueError, NotImplementedError)


@dataclass
class UsbStick:
    vendor_id: int
    product_id: int
    serial: str | None
    manufacturer: str | None
    product: str | None
    bus: int | None
    ports: tuple[int, ...]
    sysfs_path: str | None  # None when the device could not be matched to sysfs
    block_devices: list[BlockDevice] = field(default_factory=list)

    def describe(self) -> str:
        text = f"USB {self.vendor_id:04x}:{self.product_id:04x} serial {self.serial or '(none)'}"
        label = " ".join(s for s in (self.manufacturer, self.product) if s)
        return printable(f"{text} ({label})" if label else text)


def _is_mass_storage(dev: Any) -> bool:
    if dev.bDeviceClass == MASS_STORAGE:
        return True
    try:
        return any(intf.bInterfaceClass == MASS_STORAGE for cfg in dev for intf in cfg)
    except (usb.core.USBError, NotImplementedError):
        return False


def _string(dev: Any, attr: str) -> str | None:
    try:
        value = getattr(dev, attr)
    except _STRING_ERRORS:
        return None
    return value if isinstance(value, str) and value else None


def _usb_devices_dir(sysfs_root: str) -> str:
    return os.path.join(sysfs_root, "bus", "usb", "devices")


def _from_sysfs(
    usb_dir: str,
    bus: int,
    ports: tuple[int, ...],
    sysfs_root: str,
    dev_root: str,
    table: list[Mount],
    *,
    vendor_id: int | None = None,
    product_id: int | None = None,
    strings: tuple[str | None, str | None, str | None] = (None, None, None),
) -> UsbStick:
    """A stick described by sysfs, completed by what pyusb read (if anything)."""
    serial, manufacturer, product = strings
    return UsbStick(
        vendor_id=vendor_id if vendor_id is not None else _hex_attr(usb_dir, "idVendor"),
        product_id=product_id if product_id is not None else _hex_attr(usb_dir, "idProduct"),
        serial=serial or read_attr(usb_dir, "serial") or None,
        manufacturer=manufacturer or read_attr(usb_dir, "manufacturer") or None,
        product=product or read_attr(usb_dir, "product") or None,
        bus=bus,
        ports=ports,
        sysfs_path=usb_dir,
        block_devices=block_devices_of(usb_dir, sysfs_root=sysfs_root, dev_root=dev_root, table=table),
    )


def _hex_attr(usb_dir: str, name: str) -> int:
    try:
        return int(read_attr(usb_dir, name) or "", 16) & 0xFFFF
    except ValueError:
        return 0


def _stick_from(dev: Any, sysfs_root: str, dev_root: str, table: list[Mount]) -> UsbStick | None:
    """The stick for a pyusb device; None if the kernel no longer has it."""
    strings = (
        _string(dev, "serial_number"),
        _string(dev, "manufacturer"),
        _string(dev, "product"),
    )
    bus: int | None = dev.bus
    ports = tuple(int(p) for p in (dev.port_numbers or ()))
    vendor_id, product_id = int(dev.idVendor), int(dev.idProduct)
    if bus is not None and ports:
        candidate = usb_device_dir(bus, ports, sysfs_root)
        if os.path.isdir(candidate):
            # Reading strings over USB needs write access to the device node; sysfs has
            # them world-readable. A different serial there means libusb's list is stale
            # and another device now sits at that port: the sysfs scan reports that one.
            if strings[0] is not None and read_attr(candidate, "serial") != strings[0]:
                return None
            return _from_sysfs(
                candidate,
                bus,
                ports,
                sysfs_root,
                dev_root,
                table,
                vendor_id=vendor_id,
                product_id=product_id,
                strings=strings,
            )
        if os.path.isdir(_usb_devices_dir(sysfs_root)):
            return None  # sysfs is there but the device is not: it was unplugged
    serial, manufacturer, product = strings
    return UsbStick(vendor_id, product_id, serial, manufacturer, product, bus, ports, None)


_SYSFS_NAME = re.compile(r"(\d+)-(\d+(?:\.\d+)*)")


def _sysfs_mass_storage(sysfs_root: str) -> list[tuple[str, int, tuple[int, ...]]]:
    """(dir, bus, ports) of every USB device that the kernel sees with a class-8 interface."""
    root = _usb_devices_dir(sysfs_root)
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = []
    for name in names:
        match = _SYSFS_NAME.fullmatch(name)
        if match is None:
            continue  # root hubs ("usb2") and interfaces ("2-1:1.0")
        usb_dir = os.path.join(root, name)
        try:
            children = os.listdir(usb_dir)
        except OSError:
            continue
        if any(
            c.startswith(name + ":") and read_attr(os.path.join(usb_dir, c), "bInterfaceClass") == "08"
            for c in children
        ):
            ports = tuple(int(p) for p in match.group(2).split("."))
            found.append((usb_dir, int(match.group(1)), ports))
    return found


def discover_usb_sticks(
    *, backend: Any = None, sysfs_root: str = "/sys", dev_root: str = "/dev"
) -> list[UsbStick]:
    """Every plugged USB mass-storage device, with its block devices and mountpoints.

    `backend` is a pyusb backend (`usb.backend.IBackend`); None lets pyusb pick libusb.
    The kernel's own list in sysfs completes pyusb's: libusb keeps one device list per
    process and, where no udevd runs, misses sticks plugged in after its first use.
    """
    try:
        devices = list(usb.core.find(find_all=True, backend=backend, custom_match=_is_mass_storage))
    except usb.core.NoBackendError:
        devices = []  # no libusb: sysfs alone still finds the sticks
    except usb.core.USBError as exc:
        raise TokenError(f"cannot list USB devices: {exc}")
    table = mount_table()
    sticks = [s for s in (_stick_from(d, sysfs_root, dev_root, table) for d in devices) if s]
    known = {s.sysfs_path for s in sticks}
    for usb_dir, bus, ports in _sysfs_mass_storage(sysfs_root):
        if usb_dir not in known:
            sticks.append(_from_sysfs(usb_dir, bus, ports, sysfs_root, dev_root, table))
    return sorted(sticks, key=lambda s: (s.bus or 0, s.ports))
