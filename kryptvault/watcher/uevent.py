"""Kernel uevents over NETLINK_KOBJECT_UEVENT: the fastest news that a device left.

A datagram from the kernel is ``ACTION@DEVPATH\\0KEY=VALUE\\0...``. udevd re-sends its own,
enriched copies ("libudev" magic plus a binary header) to group 2; we join only the
kernel's group 1, need no udevd, and drop anything that looks like udevd's format anyway.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from kryptvault.errors import KryptvaultError

NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h; the socket module has no name for it
KERNEL_GROUP = 1
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; lets root exceed rmem_max
RECEIVE_BUFFER = 4 << 20  # a plug storm (hub with many devices) must not overflow it
MAX_DATAGRAM = 16384  # the kernel's UEVENT_BUFFER_SIZE is 2048; udevd's copies are larger
_MAX_DRAIN = 512  # datagrams handled per wake-up, so a storm cannot starve stop()


class NetlinkUnavailableError(KryptvaultError):
    """This process cannot receive kernel uevents (e.g. EPERM inside a container)."""


class UeventOverflowError(KryptvaultError):
    """The socket's buffer overflowed (ENOBUFS): some uevents were lost."""


@dataclass(frozen=True)
class Uevent:
    action: str  # add, remove, change, move, online, offline, bind, unbind
    devpath: str  # below /sys, e.g. /devices/pci0000:00/.../usb2/2-1
    subsystem: str  # "" when the kernel sent none
    properties: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def devtype(self) -> str | None:
        return self.properties.get("DEVTYPE")


def parse_uevent(data: bytes) -> Uevent | None:
    """The uevent in a kernel datagram; None for udevd's packets and anything malformed."""
    if data.startswith(b"libudev\0"):
        return None
    head, _, rest = data.partition(b"\0")
    action_raw, at, devpath_raw = head.partition(b"@")
    if not at or not action_raw or not devpath_raw.startswith(b"/"):
        return None
    properties: dict[str, str] = {}
    for item in rest.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq and key:
            properties[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    action = action_raw.decode("utf-8", "replace")
    devpath = devpath_raw.decode("utf-8", "replace")
    # The header and the properties are written together by the kernel; a mismatch means
    # the datagram is not what it claims to be.
    if properties.get("ACTION", action) != action or properties.get("DEVPATH", devpath) != devpath:
        return None
    return Uevent(action, devpath, properties.get("SUBSYSTEM", ""), properties)


class UeventListener:
    """A non-blocking receiver of kernel uevents; `fileno()` is for poll()."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._netlink = sock.family == socket.AF_NETLINK

    @classmethod
    def open(cls) -> UeventListener:
        """Join the kernel's uevent group; NetlinkUnavailableError where that is not allowed."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        except (OSError, AttributeError) as exc:
            raise NetlinkUnavailableError(f"kernel uevents are not available here: {_reason(exc)}")
        try:
            _grow_buffer(sock)
            sock.bind((0, KERNEL_GROUP))
        except OSError as exc:
            sock.close()
            raise NetlinkUnavailableError(f"kernel uevents are not available here: {_reason(exc)}")
        return cls(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> Uevent | None:
        """The next pending valid uevent; None when nothing (valid) is pending.

        Raises UeventOverflowError when the kernel dropped events for lack of buffer space.
        """
        for _ in range(_MAX_DRAIN):
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise UeventOverflowError("uevents were lost (receive buffer overflow)")
                raise
            # Any local process may unicast to our port; only the kernel sends with port
            # id 0. A forged "remove" could only lock the vault, but it may not even do that.
            if self._netlink and (not isinstance(sender, tuple) or sender[0] != 0):
                continue
            event = parse_uevent(data)
            if event is not None:
                return event
        return None

    def drain(self) -> Iterator[Uevent]:
        """Every valid uevent pending now (bounded per call, so a storm cannot starve stop())."""
        for _ in range(_MAX_DRAIN):
            event = self.receive()
            if event is None:
                return
            yield event

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> UeventListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _grow_buffer(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:  # not root: the ordinary option, capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return "this Python has no AF_NETLINK"
