"""Taking a FUSE mount away: lazy unmount, aborting the connection, cleaning stale mounts.

Facts (docs/fuse-facts in the project notes): `fusermount3 -u` fails with EBUSY while
files are open; a lazy unmount (MNT_DETACH / `-z`) removes the path at once but keeps the
connection serving open files; writing to /sys/fs/fuse/connections/N/abort (N = minor of
the mount's st_dev) fails every pending and future request. A lock uses both.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FUSECTL = Path("/sys/fs/fuse/connections")
MNT_DETACH = 2
KRYPTVAULT_FSTYPE = b"fuse.kryptvault"
PROBE_TIMEOUT = 2.0
# mountinfo writes space, tab, newline and backslash in paths as \ooo; every other byte,
# UTF-8 or not, appears as is (so no text codec may touch it).
_OCTAL = re.compile(rb"\\([0-7]{3})")

_libc = ctypes.CDLL(None, use_errno=True)  # libc is among the process's own symbols (secret.py)


def is_mounted(path: Path) -> bool:
    """True for a live or a dead (ENOTCONN) mount at `path`."""
    try:
        return os.path.ismount(path)
    except OSError:
        return True


def is_stale(path: Path) -> bool:
    """A kryptvault FUSE mount at `path` whose daemon died: every request fails.

    Asked with statfs, never stat: the kernel answers stat from its attribute cache (valid
    for a second) even when the connection is dead, while statfs always goes to the
    connection. A request still queued when the daemon's exit aborts the connection fails
    with ECONNABORTED; every later one with ENOTCONN."""
    fields = _mountinfo_entry(path)
    if fields is None or _fstype(fields) != KRYPTVAULT_FSTYPE:
        return False
    return _dead([os.fsencode(path)])[0]


def _dead(paths: list[bytes], timeout: float = PROBE_TIMEOUT) -> list[bool]:
    """statfs each path in a thread of its own: a dead connection answers at once, while a
    live daemon that hangs (stopped, stuck) must not hang the command asking."""
    answers: list[bool] = [False] * len(paths)

    def probe(i: int) -> None:
        try:
            os.statvfs(paths[i])
        except OSError as exc:
            answers[i] = exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    threads = [threading.Thread(target=probe, args=(i,), daemon=True) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return answers


@dataclass(frozen=True)
class DeadMount:
    mountpoint: str
    fsname: str  # "kryptvault:" and the first 8 hex digits of the vault UUID


def dead_mounts(among: Iterable[bytes], exclude: Iterable[str] = ()) -> list[DeadMount]:
    """This user's kryptvault mounts at the mount points `among` whose daemon died (for
    `status`), skipping the mount points in `exclude` (live ones already known: statfs
    would ask their daemons)."""
    wanted = set(among)
    skip = {os.fsencode(path) for path in exclude}
    uid = f"user_id={os.getuid()}".encode()
    candidates = [
        fields
        for fields in _mountinfo()
        if _fstype(fields) == KRYPTVAULT_FSTYPE
        and fields[4] in wanted
        and fields[4] not in skip
        and uid in _super_options(fields).split(b",")
    ]
    dead = _dead([fields[4] for fields in candidates])
    return [
        DeadMount(os.fsdecode(fields[4]), os.fsdecode(_source(fields)))
        for fields, is_dead in zip(candidates, dead, strict=True)
        if is_dead
    ]


def _mountinfo() -> list[list[bytes]]:
    """/proc/self/mountinfo, one field list per mount, the mount point unescaped (as raw
    bytes: a mount point need not be UTF-8)."""
    entries = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            fields = line.split()
            fields[4] = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
            entries.append(fields)
    return entries


def _fstype(fields: list[bytes]) -> bytes:
    return fields[fields.index(b"-") + 1]


def _source(fields: list[bytes]) -> bytes:
    return fields[fields.index(b"-") + 2]


def _super_options(fields: list[bytes]) -> bytes:
    sep = fields.index(b"-")
    return fields[sep + 3] if len(fields) > sep + 3 else b""


def _mountinfo_entry(path: Path, resolve: bool = True) -> list[bytes] | None:
    """The /proc/self/mountinfo fields of the topmost mount at `path` (no stat of the mount
    itself: works on a dead mount, and from the mount's own daemon with `resolve=False`)."""
    target = os.fsencode(os.path.realpath(path) if resolve else os.path.abspath(path))
    found = None
    for fields in _mountinfo():
        if fields[4] == target:
            found = fields
    return found


def mounted_fuse_source(path: Path) -> str | None:
    """The `fsname` of the FUSE mount at `path`."""
    fields = _mountinfo_entry(path)
    if fields is None or not _fstype(fields).startswith(b"fuse"):
        return None
    return os.fsdecode(_source(fields))


def connection_id(path: Path, resolve: bool = True) -> int | None:
    """N in /sys/fs/fuse/connections/N: the minor number of the mount's device.

    The mount's own daemon must pass an already resolved path with `resolve=False`:
    realpath would stat the mount root and so send a request to itself."""
    fields = _mountinfo_entry(path, resolve)
    if fields is None:
        return None
    return int(fields[2].split(b":")[1])


def ensure_fusectl() -> bool:
    if os.path.ismount(FUSECTL):
        return True
    if os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True)
    return result.returncode == 0


def abort_connection(conn: int) -> bool:
    ensure_fusectl()
    try:
        (FUSECTL / str(conn) / "abort").write_text("1")
        return True
    except OSError:
        return False


def detach(path: Path) -> bool:
    """Lazy unmount: the path is free at once; open files keep the connection until abort."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(path), MNT_DETACH) == 0:
            return True
        if ctypes.get_errno() == errno.EINVAL:  # not a mount point (any more)
            return not is_mounted(path)
    helper = shutil.which("fusermount3") or shutil.which("fusermount")
    if helper is None:
        return False
    result = subprocess.run([helper, "-u", "-z", "-q", str(path)], capture_output=True)
    return result.returncode == 0


def unmount(path: Path) -> bool:
    """A normal unmount (fails while files are open)."""
    if os.geteuid() == 0:
        return bool(_libc.umount2(os.fsencode(path), 0) == 0)
    helper = shutil.which("fusermount3") or shutil.which("fusermount")
    if helper is None:
        return False
    return subprocess.run([helper, "-u", "-q", str(path)], capture_output=True).returncode == 0


def clean_stale_mount(path: Path) -> bool:
    """Remove a dead kryptvault mount left by a killed daemon. True if one was removed."""
    if not is_stale(path):
        return False
    conn = connection_id(path)
    if conn is not None:
        abort_connection(conn)
    return detach(path)
