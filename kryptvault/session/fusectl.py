"""Taking a FUSE mount away: lazy unmount, aborting the connection, cleaning stale mounts.

Facts (docs/fuse-facts in the project notes): `fusermount3 -u` fails with EBUSY while
files are open; a lazy unmount (MNT_DETACH / `-z`) removes the path at once but keeps the
connection serving open files; writing to /sys/fs/fuse/connections/N/abort (N = minor of
the mount's st_dev) fails every pending and future request. A lock uses both.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
from pathlib import Path

FUSECTL = Path("/sys/fs/fuse/connections")
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def is_mounted(path: Path) -> bool:
    """True for a live or a dead (ENOTCONN) mount at `path`."""
    try:
        return os.path.ismount(path)
    except OSError:
        return True


def is_stale(path: Path) -> bool:
    """A FUSE mount whose daemon died: every access fails with ENOTCONN."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _mountinfo_entry(path: Path, resolve: bool = True) -> list[str] | None:
    """The /proc/self/mountinfo fields of the topmost mount at `path` (no stat of the mount
    itself: works on a dead mount, and from the mount's own daemon with `resolve=False`)."""
    target = os.path.realpath(path) if resolve else os.path.abspath(path)
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            mount_point = fields[4].encode().decode("unicode_escape")
            if mount_point == target:
                found = fields
    return found


def mounted_fuse_source(path: Path) -> str | None:
    """The `fsname` of the FUSE mount at `path`."""
    fields = _mountinfo_entry(path)
    if fields is None:
        return None
    sep = fields.index("-")
    return fields[sep + 2] if fields[sep + 1].startswith("fuse") else None


def connection_id(path: Path, resolve: bool = True) -> int | None:
    """N in /sys/fs/fuse/connections/N: the minor number of the mount's device.

    The mount's own daemon must pass an already resolved path with `resolve=False`:
    realpath would stat the mount root and so send a request to itself."""
    fields = _mountinfo_entry(path, resolve)
    if fields is None:
        return None
    return int(fields[2].split(":")[1])


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
