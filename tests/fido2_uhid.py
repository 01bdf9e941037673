"""The software key as a real /dev/hidrawN, through the kernel's uhid driver.

Writes UHID_CREATE2 with a FIDO report descriptor (usage page 0xF1D0), passes every
UHID_OUTPUT report to `SoftHid` and every report it answers back as UHID_INPUT2;
`destroy()` is UHID_DESTROY, which the kernel sees as an unplug (remove uevents for the
hidraw node and the HID device). Needs /dev/uhid (`modprobe uhid`; the QEMU guest's
kernel has it, the project's host kernel does not).
"""

from __future__ import annotations

import glob
import os
import struct
import threading
import time

from fido2_hid import REPORT_SIZE, SoftHid
from fido2_soft import SoftAuthenticator

UHID = "/dev/uhid"
UHID_DESTROY, UHID_OUTPUT, UHID_CREATE2, UHID_INPUT2 = 1, 6, 11, 12
UHID_DATA_MAX = 4096
EVENT_SIZE = 4 + 4372  # sizeof(struct uhid_event): the largest member is uhid_create2_req
BUS_USB = 0x03
FIDO_REPORT_DESCRIPTOR = bytes(
    [
        0x06, 0xD0, 0xF1,  # usage page FIDO Alliance
        0x09, 0x01,  # usage CTAPHID
        0xA1, 0x01,  # collection application
        0x09, 0x20, 0x15, 0x00, 0x26, 0xFF, 0x00, 0x75, 0x08, 0x95, REPORT_SIZE, 0x81, 0x02,  # input
        0x09, 0x21, 0x15, 0x00, 0x26, 0xFF, 0x00, 0x75, 0x08, 0x95, REPORT_SIZE, 0x91, 0x02,  # output
        0xC0,  # end collection
    ]
)


def available() -> bool:
    return os.path.exists(UHID) and os.access(UHID, os.R_OK | os.W_OK)


class UhidKey:
    def __init__(self, auth: SoftAuthenticator, name: str = "kryptvault soft key") -> None:
        self.hid = SoftHid(auth)
        self.uniq = os.urandom(8).hex()
        self._fd = os.open(UHID, os.O_RDWR | os.O_CLOEXEC)
        d = auth.descriptor
        create = struct.pack(
            "<I128s64s64sHHIIII",
            UHID_CREATE2,
            name.encode(),
            b"kryptvault-test",
            self.uniq.encode(),
            len(FIDO_REPORT_DESCRIPTOR),
            BUS_USB,
            d.vid,
            d.pid,
            0x0100,
            0,
        ) + FIDO_REPORT_DESCRIPTOR.ljust(UHID_DATA_MAX, b"\0")
        os.write(self._fd, create.ljust(EVENT_SIZE, b"\0"))
        self._closed = threading.Event()
        threading.Thread(target=self._reader, daemon=True).start()
        threading.Thread(target=self._writer, daemon=True).start()

    def _reader(self) -> None:
        while not self._closed.is_set():
            try:
                event = os.read(self._fd, EVENT_SIZE + 64)
            except OSError:
                return
            if len(event) < 4:
                continue
            (kind,) = struct.unpack_from("<I", event)
            if kind != UHID_OUTPUT:
                continue
            size = struct.unpack_from("<H", event, 4 + UHID_DATA_MAX)[0]
            data = event[4 : 4 + size]
            # hidraw writes carry the report number first (0: the descriptor has none).
            if size == REPORT_SIZE + 1:
                data = data[1:]
            self.hid.receive_report(data.ljust(REPORT_SIZE, b"\0"))

    def _writer(self) -> None:
        import queue

        while not self._closed.is_set():
            try:
                report = self.hid.next_report(timeout=0.1)
            except queue.Empty:
                continue
            event = struct.pack("<IH", UHID_INPUT2, len(report)) + report.ljust(UHID_DATA_MAX, b"\0")
            try:
                os.write(self._fd, event.ljust(EVENT_SIZE, b"\0"))
            except OSError:
                return

    def hidraw(self, timeout: float = 5.0) -> str:
        """The /dev/hidrawN the kernel made for this key."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in glob.glob("/sys/class/hidraw/hidraw*"):
                try:
                    with open(os.path.join(entry, "device", "uevent")) as f:
                        if f"HID_UNIQ={self.uniq}" in f.read().split("\n"):
                            node = "/dev/" + os.path.basename(entry)
                            if os.path.exists(node):
                                return node
                except OSError:
                    continue
            time.sleep(0.05)
        raise TimeoutError("the kernel made no hidraw node for the uhid key")

    def destroy(self) -> None:
        """Unplug: the kernel removes the hidraw node and the HID device."""
        if self._closed.is_set():
            return
        self._closed.set()
        os.write(self._fd, struct.pack("<I", UHID_DESTROY).ljust(EVENT_SIZE, b"\0"))
        os.close(self._fd)
