"""A small, fresh ext4 filesystem on a loop device, for tests of what a full disk does."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import require_fuse

MIB = 1 << 20


def run_quiet(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def ext4_loop_disk(tmp_path: Path, mib: int) -> Iterator[Path]:
    """`mib` MiB of ext4 (no root reserve) mounted on tmp_path/disk; unmounted and the loop
    device detached on the way out, whatever happened."""
    if os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root, losetup and mkfs.ext4")
    require_fuse()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(mib * MIB)
    made = run_quiet("losetup", "--find", "--show", image)
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    top = tmp_path / "disk"
    top.mkdir()
    try:
        assert run_quiet("mkfs.ext4", "-q", "-F", "-m", "0", device).returncode == 0
        assert run_quiet("mount", device, top).returncode == 0
        yield top
    finally:
        if os.path.ismount(top) and run_quiet("umount", top).returncode != 0:
            run_quiet("umount", "-l", top)
        run_quiet("losetup", "-d", device)


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # wait for earlier writeback, write, wait for it


def hand_pages_to_daemon(fd: int) -> None:
    """Have the kernel write a FUSE file's dirty pages to its daemon (WRITE requests) and
    wait, without an fsync: the daemon then holds them uncommitted. (Closing the file would
    do the same, but the vault encrypts a closed file's data into the container at once.)"""
    if _LIBC.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(_SYNC_FILE_RANGE_ALL)):
        raise OSError(ctypes.get_errno(), "sync_file_range failed")
