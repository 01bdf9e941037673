"""Kernel uevent datagrams: parsing, the listener's sender check, and which devices count."""

from __future__ import annotations

import os
import select
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kryptvault.watcher.devices import WatchedDevices, is_at_or_below
from kryptvault.watcher.uevent import (
    NETLINK_KOBJECT_UEVENT,
    Uevent,
    UeventListener,
    parse_uevent,
)

# The stick as the guest shows it (QEMU xHCI at 0000:00:04.0, bus 2 port 1, disk sda).
STICK = "/devices/pci0000:00/0000:00:04.0/usb2/2-1"
INTERFACE = STICK + "/2-1:1.0"
SCSI_DEVICE = INTERFACE + "/host0/target0:0:0/0:0:0:0"
DISK = SCSI_DEVICE + "/block/sda"


def datagram(action: str, devpath: str, **props: str) -> bytes:
    """A datagram in the kernel's own layout (lib/kobject_uevent.c)."""
    fields = [f"{action}@{devpath}", f"ACTION={action}", f"DEVPATH={devpath}"]
    fields += [f"{k}={v}" for k, v in props.items()]
    return "\0".join(fields).encode() + b"\0"


# What the guest's netlink socket received on `device_del`, in this order (recorded with
# tests/usbrig/uevent_stamp.py; the SCSI host's own removes are left out for brevity).
UNPLUG = [
    datagram("remove", SCSI_DEVICE + "/bsg/0:0:0:0", SUBSYSTEM="bsg", MAJOR="247", MINOR="0",
             DEVNAME="bsg/0:0:0:0", SEQNUM="716"),
    datagram("remove", SCSI_DEVICE + "/scsi_device/0:0:0:0", SUBSYSTEM="scsi_device", SEQNUM="717"),
    datagram("remove", SCSI_DEVICE + "/scsi_disk/0:0:0:0", SUBSYSTEM="scsi_disk", SEQNUM="718"),
    datagram("remove", "/devices/virtual/bdi/8:0", SUBSYSTEM="bdi", SEQNUM="719"),
    datagram("remove", DISK, SUBSYSTEM="block", MAJOR="8", MINOR="0", DEVNAME="sda", DEVTYPE="disk",
             DISKSEQ="9", SEQNUM="720"),
    datagram("unbind", INTERFACE, SUBSYSTEM="usb", DEVTYPE="usb_interface", DRIVER="usb-storage",
             PRODUCT="46f4/1/0", TYPE="0/0/0", INTERFACE="8/6/80", SEQNUM="726"),
    datagram("remove", INTERFACE, SUBSYSTEM="usb", DEVTYPE="usb_interface", PRODUCT="46f4/1/0",
             TYPE="0/0/0", INTERFACE="8/6/80", MODALIAS="usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00",
             SEQNUM="727"),
    datagram("unbind", STICK, SUBSYSTEM="usb", DEVTYPE="usb_device", DRIVER="usb", PRODUCT="46f4/1/0",
             TYPE="0/0/0", BUSNUM="002", DEVNUM="002", SEQNUM="728"),
    datagram("remove", STICK, SUBSYSTEM="usb", MAJOR="189", MINOR="129", DEVNAME="bus/usb/002/002",
             DEVTYPE="usb_device", PRODUCT="46f4/1/0", TYPE="0/0/0", BUSNUM="002", DEVNUM="002",
             SEQNUM="729"),
]  # fmt: skip


def test_block_remove_datagram_gives_action_devpath_subsystem_and_properties() -> None:
    event = parse_uevent(UNPLUG[4])
    assert event == Uevent(
        "remove",
        DISK,
        "block",
        {
            "ACTION": "remove",
            "DEVPATH": DISK,
            "SUBSYSTEM": "block",
            "MAJOR": "8",
            "MINOR": "0",
            "DEVNAME": "sda",
            "DEVTYPE": "disk",
            "DISKSEQ": "9",
            "SEQNUM": "720",
        },
    )
    assert event is not None and event.devtype == "disk"


def test_guest_unplug_sequence_parses_in_kernel_order_and_its_first_event_already_means_gone() -> None:
    events = [parse_uevent(d) for d in UNPLUG]
    assert [(e.action, e.subsystem) for e in events if e] == [
        ("remove", "bsg"),
        ("remove", "scsi_device"),
        ("remove", "scsi_disk"),
        ("remove", "bdi"),
        ("remove", "block"),
        ("unbind", "usb"),
        ("remove", "usb"),
        ("unbind", "usb"),
        ("remove", "usb"),
    ]
    usb_token = WatchedDevices(block=DISK, usb=STICK)
    first = events[0]
    assert first is not None and usb_token.removal_means_gone(first.devpath)
    # Every remove except the bdi's (a virtual device, not below the stick) means gone.
    gone = [
        e.subsystem for e in events if e and e.action == "remove" and usb_token.removal_means_gone(e.devpath)
    ]
    assert gone == ["bsg", "scsi_device", "scsi_disk", "block", "usb", "usb"]
    # Without the USB device (a token whose stick could not be found), the disk still counts.
    block_only = WatchedDevices(block=DISK, usb=None)
    removes = [e for e in events if e and e.action == "remove"]
    assert [e.subsystem for e in removes if block_only.removal_means_gone(e.devpath)] == [
        "block",
        "usb",
        "usb",
    ]


def test_removal_of_a_sibling_device_or_a_neighbouring_port_does_not_count() -> None:
    partition = WatchedDevices(block=DISK + "/sda1", usb=None)
    assert partition.removal_means_gone(DISK + "/sda1")
    assert partition.removal_means_gone(DISK)  # the whole disk went
    assert partition.removal_means_gone(STICK)  # an ancestor went
    assert not partition.removal_means_gone(DISK + "/sda2")  # parted deleted another partition
    assert not partition.removal_means_gone("/devices/virtual/bdi/8:0")
    stick = WatchedDevices(block=None, usb=STICK)
    assert not stick.removal_means_gone("/devices/pci0000:00/0000:00:04.0/usb2/2-10")
    assert not is_at_or_below("/devices/pci0000:00/0000:00:04.0/usb2/2-10", STICK)


def test_loop_device_events_seen_on_the_host_parse() -> None:
    # Recorded on the host: `losetup -d` sends only change events; LOOP_CTL_REMOVE sends remove.
    change = datagram(
        "change",
        "/devices/virtual/block/loop0",
        SUBSYSTEM="block",
        DISK_MEDIA_CHANGE="1",
        MAJOR="7",
        MINOR="0",
        DEVNAME="loop0",
        DEVTYPE="disk",
        DISKSEQ="113",
        SEQNUM="4089",
    )
    event = parse_uevent(change)
    assert event is not None and event.properties["DISK_MEDIA_CHANGE"] == "1"
    loop = WatchedDevices(block="/devices/virtual/block/loop0", usb=None)
    assert loop.concerns(event.devpath) and loop.removal_means_gone(event.devpath)
    assert not loop.concerns("/devices/virtual/block/loop1")


def test_udevd_monitor_packets_are_ignored() -> None:
    # libudev's monitor format: magic, then a binary header, then the properties.
    header = b"libudev\0" + bytes.fromhex("feedcafe") + bytes(32)
    assert parse_uevent(header + b"ACTION=remove\0DEVPATH=" + DISK.encode() + b"\0") is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0",
        b"remove\0ACTION=remove\0",  # no @devpath
        b"@/devices/x\0",  # no action
        b"remove@devices/x\0",  # devpath not absolute
        datagram("remove", "/devices/a").replace(b"ACTION=remove", b"ACTION=add"),  # header lies
        datagram("remove", "/devices/a").replace(b"DEVPATH=/devices/a", b"DEVPATH=/devices/b"),
    ],
)
def test_malformed_datagrams_give_none(data: bytes) -> None:
    assert parse_uevent(data) is None


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    event = parse_uevent(data)
    assert event is None or event.devpath.startswith("/")


def test_listener_reads_crafted_datagrams_in_order_and_skips_udevd_ones() -> None:
    # A socketpair stands in for the kernel end; the listener code is the real one.
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with UeventListener(ours) as listener, kernel:
        assert listener.receive() is None  # nothing pending: does not block
        kernel.send(b"libudev\0" + bytes(40))
        for data in UNPLUG:
            kernel.send(data)
        received = list(listener.drain())
        assert [e.properties["SEQNUM"] for e in received] == ["716", "717", "718", "719", "720", "726",
                                                               "727", "728", "729"]  # fmt: skip


def test_netlink_listener_drops_a_forged_remove_unicast_by_a_local_process() -> None:
    try:
        listener = UeventListener.open()
    except Exception as exc:
        pytest.skip(f"no netlink here: {exc}")
    with listener:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT) as forger:
            # Our socket's port id is what getsockname() reports; a process can unicast to it.
            sock = socket.socket(fileno=os.dup(listener.fileno()))
            port = sock.getsockname()[0]
            sock.detach()
            try:
                forger.sendto(datagram("remove", DISK, SUBSYSTEM="block"), (port, 0))
            except PermissionError:
                pytest.skip("this kernel refuses unicast on the uevent family")
        # It was delivered (the socket is readable), and the listener still does not report it.
        assert select.select([listener.fileno()], [], [], 2.0)[0]
        for event in listener.drain():
            assert event.devpath != DISK
