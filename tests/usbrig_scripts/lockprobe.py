#!/usr/bin/env python3
"""Guest-side probes for the lock-on-unplug test: a writer and an end-of-lock detector.

Standard library only, so that it measures kryptvault from outside. ``unplug_cycles.py``
runs both as forked processes; they also run standalone::

    lockprobe.py write FILE LOG CYCLE          # append + fsync numbered lines until an error
    lockprobe.py watch PID MOUNTPOINT OUT      # stamp when MOUNTPOINT is gone and PID exited

The writer logs ``w N`` before writing line N, ``a N`` once write() returned (the mount
has no writeback cache, so the daemon accepted the line) and ``f N`` once fsync()
returned, on a descriptor outside the vault (tmpfs). After the lock every accepted line
must be in the vault (the lock commits what was accepted), and at most the one line whose
write() failed may or may not be.

The detector holds a pidfd for the daemon (readable the moment it exits, zombie or not)
and /proc/self/mountinfo (POLLPRI on every mount-table change), and poll()s both with a
`poll_ms` timeout; on every wake-up it checks the pid and, on a mount-table change (or
every max(10, poll_ms) ms as a fallback), whether MOUNTPOINT is still in mountinfo. Both
end points are events, so the stamps are exact whatever `poll_ms` is; the timeout only
bounds how late a missed event would be noticed. Stamps are ``time.monotonic_ns()``, the
clock uevent_stamp.py uses.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import sys
import time


def line_for(cycle: int, index: int) -> bytes:
    """Line `index` of cycle `cycle`: distinct, and checkable without the writer's log."""
    digest = hashlib.sha256(f"{cycle}:{index}".encode()).hexdigest()[:40]
    return f"c{cycle:02d} {index:06d} {digest}\n".encode()


def write_loop(path: str, log_path: str, cycle: int, max_lines: int = 1_000_000, pace_s: float = 0.0) -> int:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log, f"start {time.monotonic_ns()}\n".encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        os.write(log, f"e open {exc.errno}\n".encode())
        return 1
    for index in range(max_lines):
        data = line_for(cycle, index)
        os.write(log, f"w {index}\n".encode())
        try:
            if os.write(fd, data) != len(data):
                os.write(log, f"e {index} short\n".encode())
                return 1
            os.write(log, f"a {index}\n".encode())
            os.fsync(fd)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            os.write(log, f"e {index} {name} {time.monotonic_ns()}\n".encode())
            return 0
        os.write(log, f"f {index}\n".encode())
        if pace_s:
            time.sleep(pace_s)
    return 0


def read_write_log(log_path: str) -> dict[str, object]:
    """{fsynced, accepted: lines 0..n-1 fsync-ed / accepted, attempted: last index tried, error}."""
    fsynced = accepted = 0
    attempted: int | None = None
    error = None
    with open(log_path) as f:
        for raw in f:
            parts = raw.split()
            if parts[:1] == ["w"]:
                attempted = int(parts[1])
            elif parts[:1] == ["a"]:
                accepted = int(parts[1]) + 1
            elif parts[:1] == ["f"]:
                index = int(parts[1])
                if index != fsynced:
                    raise ValueError(f"{log_path}: fsync of line {index} out of order")
                fsynced = index + 1
            elif parts[:1] == ["e"]:
                error = " ".join(parts[1:])
    return {"fsynced": fsynced, "accepted": accepted, "attempted": attempted, "error": error}


def _mounted(mountinfo: int, mountpoint: str) -> bool:
    os.lseek(mountinfo, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(mountinfo, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    target = mountpoint.encode()
    return any(line.split(b" ")[4] == target for line in b"".join(chunks).splitlines() if line)


def watch(
    pid: int,
    mountpoint: str,
    out_path: str,
    timeout: float = 60.0,
    ready_path: str | None = None,
    poll_ms: int = 1,
) -> int:
    pidfd = os.pidfd_open(pid)
    mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(mountinfo, select.POLLPRI | select.POLLERR)
    if not _mounted(mountinfo, mountpoint):
        result: dict[str, object] = {"error": f"{mountpoint} is not mounted at the start"}
        _write(out_path, result)
        return 1
    poller.poll(0)  # consume the POLLPRI every fresh mountinfo descriptor starts with
    if ready_path:
        _write(ready_path, {"ready": time.monotonic_ns()})
    mount_gone = pid_gone = None
    mount_gone_via = None
    wakeups = 0
    deadline = time.monotonic_ns() + int(timeout * 1e9)
    fallback_ns = max(10, poll_ms) * 1_000_000
    next_fallback = 0
    while mount_gone is None or pid_gone is None:
        events = dict(poller.poll(poll_ms))
        now = time.monotonic_ns()
        wakeups += 1
        if pid_gone is None and pidfd in events:
            pid_gone = now
        if mount_gone is None and (mountinfo in events or now >= next_fallback):
            next_fallback = now + fallback_ns
            if not _mounted(mountinfo, mountpoint):
                mount_gone = time.monotonic_ns()
                mount_gone_via = "event" if mountinfo in events else "fallback"
        if now > deadline:
            break
    result = {
        "mount_gone": mount_gone,
        "pid_gone": pid_gone,
        "mount_gone_via": mount_gone_via,
        "wakeups": wakeups,
        "poll_ms": poll_ms,
    }
    if mount_gone is not None and pid_gone is not None:
        result["end"] = max(mount_gone, pid_gone)
    _write(out_path, result)
    return 0 if "end" in result else 1


def _write(path: str, data: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"] and len(argv) == 4:
        return write_loop(argv[1], argv[2], int(argv[3]))
    if argv[:1] == ["watch"] and len(argv) == 4:
        return watch(int(argv[1]), argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
