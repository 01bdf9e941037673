#!/usr/bin/env python3
"""Print kernel uevents with CLOCK_MONOTONIC stamps; meant to run inside the rig's guest.

One line per uevent::

    <monotonic_ns> <action> <subsystem> <devpath> [KEY=VALUE ...]

plus comment lines starting with ``#`` (``# ready <ns>`` once the socket listens). The
stamps use ``time.monotonic_ns()``, the same clock other guest processes read, so a
lock-latency probe can subtract them directly. Standalone on purpose (stdlib only): it
must start fast under TCG and must not import the code it is measuring.

It listens on the kernel's own multicast group (1), so it needs no udevd; udev-only
properties such as ID_SERIAL_SHORT appear only if a udevd rebroadcast carries them, and
for ``add`` of a USB device the serial is read from sysfs instead (as ``SERIAL=``).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import time

NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h; the socket module has no name for it
KERNEL_GROUP = 1
SHOWN_KEYS = (
    "DEVNAME",
    "DEVTYPE",
    "PRODUCT",
    "ID_SERIAL_SHORT",
    "ID_SERIAL",
    "ID_FS_UUID",
    "SEQNUM",
)


def parse(msg: bytes) -> dict[str, str] | None:
    # Kernel format: "action@devpath\0KEY=VALUE\0...". udevd's rebroadcasts start with
    # "libudev\0" and a binary header; they are on group 2, which we do not join.
    if msg.startswith(b"libudev"):
        return None
    fields = msg.split(b"\0")
    env: dict[str, str] = {}
    for f in fields[1:]:
        key, sep, value = f.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env if "ACTION" in env else None


def sysfs_serial(devpath: str) -> str | None:
    try:
        with open(f"/sys{devpath}/serial") as f:
            return f.read().strip()
    except OSError:
        return None


def format_event(ns: int, env: dict[str, str]) -> str:
    parts = [
        str(ns),
        env.get("ACTION", "?"),
        env.get("SUBSYSTEM", "-"),
        env.get("DEVPATH", "-"),
    ]
    parts += [f"{k}={env[k]}" for k in SHOWN_KEYS if k in env]
    if env.get("ACTION") == "add" and env.get("DEVTYPE") == "usb_device":
        serial = sysfs_serial(env.get("DEVPATH", ""))
        if serial:
            parts.append(f"SERIAL={serial}")
    return " ".join(parts)


def matches(env: dict[str, str], spec: str) -> bool:
    """``spec`` is ACTION[:SUBSYSTEM[:DEVTYPE]]; empty parts match anything."""
    want = spec.split(":")
    have = [env.get("ACTION", ""), env.get("SUBSYSTEM", ""), env.get("DEVTYPE", "")]
    return all(not w or w == h for w, h in zip(want, have, strict=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--until",
        metavar="ACTION[:SUBSYSTEM[:DEVTYPE]]",
        help="exit after the first matching event (e.g. remove:usb:usb_device)",
    )
    ap.add_argument("--count", type=int, default=0, help="exit after this many events")
    ap.add_argument("--timeout", type=float, default=0, help="exit after this many seconds")
    ap.add_argument(
        "--subsystem", action="append", default=[], help="only print these subsystems (repeatable)"
    )
    args = ap.parse_args(argv)

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    # An unplug/replug bursts dozens of events; a small buffer would drop some (ENOBUFS).
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE (root only)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, KERNEL_GROUP))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    out = sys.stdout
    out.write(f"# ready {time.monotonic_ns()} pid={os.getpid()}\n")
    out.flush()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen = 0
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                out.write("# timeout\n")
                return 1 if args.until else 0
        try:
            msg = sock.recv(1 << 16)
        except OSError as e:  # ENOBUFS: say so instead of silently missing events
            out.write(f"# recv error {e}\n")
            out.flush()
            continue
        ns = time.monotonic_ns()
        env = parse(msg)
        if env is None:
            continue
        if args.subsystem and env.get("SUBSYSTEM") not in args.subsystem:
            continue
        out.write(format_event(ns, env) + "\n")
        out.flush()
        seen += 1
        if args.until and matches(env, args.until):
            return 0
        if args.count and seen >= args.count:
            return 0


if __name__ == "__main__":
    sys.exit(main())
