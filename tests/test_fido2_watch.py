"""Lock on removal of a FIDO2 key: which kernel devices stand for it, and the poll route.

The host kernel has no uhid (no real /dev/hidrawN can be made here), so the key's sysfs
entry is a tree under tmp_path, laid out as the kernel lays out a USB key and a UHID one,
and its node a real character device made with mknod (we are root). Pulling the key is
removing both, as the kernel does.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from kryptvault.errors import TokenError
from kryptvault.token.fido2token import Fido2Token
from kryptvault.token.resolve import resolve_token
from kryptvault.watcher.devices import watched_devices
from kryptvault.watcher.watcher import TokenWatcher

USB_KEY = "devices/pci0000:00/0000:00:14.0/usb1/1-2"
USB_HID = f"{USB_KEY}/1-2:1.0/0003:1050:0407.0003"
UHID_HID = "devices/virtual/misc/uhid/0003:1209:4B56.0001"


def _plug(root: Path, hid: str, name: str, minor: int, *, usb: str | None = None) -> tuple[Path, Path]:
    sysfs = root / "sys"
    entry = sysfs / hid / "hidraw" / name
    entry.mkdir(parents=True)
    if usb is not None:
        (sysfs / usb / "idVendor").write_text("1050\n")
        (sysfs / usb / "busnum").write_text("1\n")
    link = sysfs / "class" / "hidraw" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(entry, link.parent))
    node = root / "dev" / name
    node.parent.mkdir(exist_ok=True)
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(240, minor))
    return sysfs, node


def _unplug(sysfs: Path, node: Path, hid: str) -> None:
    node.unlink()
    (sysfs / "class" / "hidraw" / node.name).unlink()
    shutil.rmtree(sysfs / hid)


def test_a_usb_key_is_gone_with_its_hidraw_node_hid_device_or_anything_below_its_usb_device(
    tmp_path: Path,
) -> None:
    sysfs, node = _plug(tmp_path, USB_HID, "hidraw3", 3, usb=USB_KEY)
    token = Fido2Token(str(node), sysfs_root=str(sysfs), records_dir=tmp_path)
    devices = watched_devices(token, sysfs_root=str(sysfs))
    assert devices.block == f"/{USB_HID}/hidraw/hidraw3"
    assert devices.usb == f"/{USB_KEY}"
    for gone in (f"/{USB_HID}/hidraw/hidraw3", f"/{USB_HID}", f"/{USB_KEY}/1-2:1.1", f"/{USB_KEY}"):
        assert devices.removal_means_gone(gone), gone
    for beside in ("/devices/pci0000:00/0000:00:14.0/usb1/1-20", f"/{USB_KEY[:-4]}/1-3/1-3:1.0"):
        assert not devices.removal_means_gone(beside), beside


def test_a_uhid_key_is_gone_with_its_hid_device_and_not_with_another(tmp_path: Path) -> None:
    sysfs, node = _plug(tmp_path, UHID_HID, "hidraw0", 0)
    token = Fido2Token(str(node), sysfs_root=str(sysfs), records_dir=tmp_path)
    devices = watched_devices(token, sysfs_root=str(sysfs))
    assert devices.usb is None
    assert devices.removal_means_gone(f"/{UHID_HID}")
    assert not devices.removal_means_gone("/devices/virtual/misc/uhid/0003:1209:4B56.0002")


def test_presence_is_the_same_node_and_the_same_device_behind_it(tmp_path: Path) -> None:
    sysfs, node = _plug(tmp_path, UHID_HID, "hidraw0", 0)
    token = Fido2Token(str(node), sysfs_root=str(sysfs), records_dir=tmp_path)
    assert token.is_present()
    assert token.identity.describe() == f"FIDO2 security key at {node}"
    # Pulled, and another key plugged in under the same name: another HID instance.
    _unplug(sysfs, node, UHID_HID)
    assert not token.is_present()
    _plug(tmp_path, UHID_HID[:-1] + "2", "hidraw0", 0)
    assert not token.is_present()


def test_the_poll_route_locks_when_the_key_is_pulled(tmp_path: Path) -> None:
    sysfs, node = _plug(tmp_path, UHID_HID, "hidraw0", 0)
    token = Fido2Token(str(node), sysfs_root=str(sysfs), records_dir=tmp_path)
    fired = threading.Event()
    routes: list[str] = []

    def on_removed(route: str) -> None:
        routes.append(route)
        fired.set()

    with TokenWatcher(token, on_removed, 0.1, routes=("poll",)):
        time.sleep(0.3)
        assert not fired.is_set()
        pulled = time.monotonic()
        _unplug(sysfs, node, UHID_HID)
        assert fired.wait(2.0)
        assert time.monotonic() - pulled < 1.0
    assert routes == ["poll"]


def test_the_daemon_spec_names_the_key_node_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="is not there"):
        resolve_token(f"fido2:{tmp_path}/hidraw9")
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(TokenError, match="not a hidraw device"):
        resolve_token(f"fido2:{plain}")
    sysfs, node = _plug(tmp_path, UHID_HID, "hidraw1", 1)
    token = resolve_token(f"fido2:{node}", sysfs_root=str(sysfs))
    assert isinstance(token, Fido2Token) and token.is_present()


def test_udev_rules_give_the_seat_user_fido2_keys_only_when_a_vault_has_one() -> None:
    from kryptvault.token.udev import render_rules

    line = 'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{ID_SECURITY_TOKEN}=="1", TAG+="uaccess"'
    assert line in render_rules([], fido2=True).splitlines()
    assert "hidraw" not in render_rules([])
