"""CTAPHID framing in front of the software authenticator (fido2_soft.py).

`SoftHid` is the key's USB-HID side: 64-byte output reports in (init and continuation
packets, channels, CANCEL), input reports out (responses split into packets, KEEPALIVE
every 100 ms while a command waits, as real keys send them). It can be driven two ways:

- `SoftHidConnection`, python-fido2's `CtapHidConnection` extension point, so the
  library's own `CtapHidDevice` (CTAPHID INIT, fragmentation, keep-alive, cancel) talks
  to it in-process;
- `fido2_uhid.UhidKey`, which moves the same reports through /dev/uhid, so the kernel
  makes a real /dev/hidrawN (where the kernel has uhid).
"""

from __future__ import annotations

import queue
import struct
import threading

from fido2.ctap import STATUS, CtapError
from fido2.hid import CAPABILITY, CTAPHID
from fido2.hid.base import CtapHidConnection, HidDescriptor
from fido2_soft import SoftAuthenticator

REPORT_SIZE = 64
TYPE_INIT = 0x80
BROADCAST = 0xFFFFFFFF
KEEPALIVE_INTERVAL = 0.1
ERR_INVALID_CMD = 0x01
ERR_INVALID_SEQ = 0x04
ERR_CHANNEL_BUSY = 0x06


class SoftHid:
    """One key's CTAPHID state machine. Thread-safe: reports may come from any thread."""

    def __init__(self, auth: SoftAuthenticator) -> None:
        self.auth = auth
        self._out: queue.Queue[bytes] = queue.Queue()
        self._lock = threading.Lock()
        self._next_cid = 1
        # channel -> (cmd, total length, data so far, next sequence number)
        self._assembling: dict[int, tuple[int, int, bytearray, int]] = {}
        self._busy: tuple[int, threading.Event] | None = None

    # ------------------------------------------------------------- reports
    def receive_report(self, report: bytes) -> None:
        """An output report from the host (64 bytes, no report id)."""
        cid = struct.unpack_from(">I", report)[0]
        if report[4] & TYPE_INIT:
            cmd = report[4] & 0x7F
            (length,) = struct.unpack_from(">H", report, 5)
            if cmd == CTAPHID.CANCEL:
                with self._lock:
                    if self._busy is not None and self._busy[0] == cid:
                        self._busy[1].set()
                return
            data = bytearray(report[7 : 7 + min(length, REPORT_SIZE - 7)])
            self._assembling[cid] = (cmd, length, data, 0)
        else:
            if cid not in self._assembling:
                return  # a stray continuation: ignored, as keys do
            cmd, length, data, seq = self._assembling[cid]
            if report[4] != seq:
                del self._assembling[cid]
                self._send(cid, CTAPHID.ERROR, bytes([ERR_INVALID_SEQ]))
                return
            data += report[5 : 5 + min(length - len(data), REPORT_SIZE - 5)]
            self._assembling[cid] = (cmd, length, data, seq + 1)
        cmd, length, data, _ = self._assembling[cid]
        if len(data) >= length:
            del self._assembling[cid]
            self._dispatch(cid, cmd, bytes(data))

    def next_report(self, timeout: float | None = None) -> bytes:
        """The next input report for the host (blocks; queue.Empty after `timeout`)."""
        return self._out.get(timeout=timeout)

    def _send(self, cid: int, cmd: int, data: bytes) -> None:
        header = struct.pack(">IBH", cid, TYPE_INIT | cmd, len(data))
        body, seq = data, 0
        chunk, body = body[: REPORT_SIZE - 7], body[REPORT_SIZE - 7 :]
        self._out.put((header + chunk).ljust(REPORT_SIZE, b"\0"))
        while body:
            chunk, body = body[: REPORT_SIZE - 5], body[REPORT_SIZE - 5 :]
            self._out.put((struct.pack(">IB", cid, seq) + chunk).ljust(REPORT_SIZE, b"\0"))
            seq += 1

    # ------------------------------------------------------------- commands
    def _dispatch(self, cid: int, cmd: int, data: bytes) -> None:
        if cmd == CTAPHID.INIT:
            with self._lock:
                new_cid = self._next_cid if cid == BROADCAST else cid
                if cid == BROADCAST:
                    self._next_cid += 1
            caps = CAPABILITY.CBOR | CAPABILITY.NMSG | CAPABILITY.WINK
            self._send(cid, CTAPHID.INIT, data[:8] + struct.pack(">IBBBBB", new_cid, 2, 1, 0, 0, caps))
        elif cmd == CTAPHID.PING:
            self._send(cid, CTAPHID.PING, data)
        elif cmd == CTAPHID.WINK:
            self._send(cid, CTAPHID.WINK, b"")
        elif cmd == CTAPHID.CBOR:
            with self._lock:
                if self._busy is not None:
                    self._send(cid, CTAPHID.ERROR, bytes([ERR_CHANNEL_BUSY]))
                    return
                cancel = threading.Event()
                self._busy = (cid, cancel)
            threading.Thread(target=self._run_cbor, args=(cid, data, cancel), daemon=True).start()
        else:
            self._send(cid, CTAPHID.ERROR, bytes([ERR_INVALID_CMD]))

    def _run_cbor(self, cid: int, data: bytes, cancel: threading.Event) -> None:
        status = [STATUS.PROCESSING]
        done = threading.Event()

        def keepalive() -> None:
            while not done.wait(KEEPALIVE_INTERVAL):
                self._send(cid, CTAPHID.KEEPALIVE, bytes([status[0]]))

        def on_keepalive(value: STATUS) -> None:
            status[0] = value

        ticker = threading.Thread(target=keepalive, daemon=True)
        ticker.start()
        try:
            answer = self.auth.call(CTAPHID.CBOR, data, cancel, on_keepalive)
        except CtapError as exc:
            answer = bytes([exc.code])
        finally:
            done.set()
            ticker.join()
            with self._lock:
                self._busy = None
        self._send(cid, CTAPHID.CBOR, answer)


class SoftHidConnection(CtapHidConnection):
    """python-fido2's connection interface onto a `SoftHid`."""

    def __init__(self, hid: SoftHid) -> None:
        self.hid = hid

    def write_packet(self, data: bytes) -> None:
        self.hid.receive_report(bytes(data))

    def read_packet(self) -> bytes:
        return self.hid.next_report(timeout=30)

    def close(self) -> None:
        pass


def descriptor_for(auth: SoftAuthenticator, path: str | None = None) -> HidDescriptor:
    d = auth.descriptor
    return HidDescriptor(path or str(d.path), d.vid, d.pid, REPORT_SIZE, REPORT_SIZE, d.product_name, None)

