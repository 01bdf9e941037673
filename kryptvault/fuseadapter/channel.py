"""Getting a /dev/fuse connection for a mountpoint, the way libfuse does for users.

`fusermount3` (setuid root, from the fuse3 package) opens /dev/fuse, mounts it and hands
the descriptor back over a unix socket named in `_FUSE_COMMFD` (SCM_RIGHTS). The same path
serves root and ordinary users, so the tests (run as root) exercise what users run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterable

FUSERMOUNT = "fusermount3"


class MountError(OSError):
    """The mount could not be made; the message is fusermount3's own line."""


def _escape(value: str) -> str:
    # fusermount3 splits -o at commas and understands a backslash escape.
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount(mountpoint: str, options: Iterable[str]) -> int:
    """Mount a FUSE filesystem on `mountpoint`; returns the /dev/fuse descriptor."""
    program = shutil.which(FUSERMOUNT)
    if program is None:
        raise MountError(2, f"{FUSERMOUNT} is not installed (package fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ)
        env["_FUSE_COMMFD"] = str(theirs.fileno())
        opts = ",".join(_escape(o) for o in options)
        proc = subprocess.Popen(
            [program, "-o", opts, "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        _out, err = proc.communicate()
        if not fds:
            line = err.decode(errors="replace").strip().splitlines()
            raise MountError(5, line[-1] if line else f"{FUSERMOUNT} failed ({proc.returncode})")
        fd = fds[0]
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fd, False)
        return fd
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()


def unmount(mountpoint: str, *, lazy: bool = True) -> bool:
    """Ask fusermount3 to unmount (lazily: open files keep working); True if it did."""
    program = shutil.which(FUSERMOUNT)
    if program is None:
        return False
    args = [program, "-u", "-q"] + (["-z"] if lazy else []) + ["--", mountpoint]
    return subprocess.run(args, capture_output=True, check=False).returncode == 0
