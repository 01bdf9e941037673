"""The lock with the kernel's writeback cache: data that write(2) accepted into the page
cache (never fsync-ed, file still open) is written back and committed before the mount
goes; a write after the lock fails instead of vanishing; no plaintext through a held fd."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, make_vault, run_process

pytestmark = pytest.mark.fuse

MIB = 1 << 20

# Writes random 4 KiB pages and a sequential tail without fsync, reports the digest of
# what it wrote, then waits; after "go" it tries one more write and one read through the
# descriptor it still holds and reports what happened.
WRITER = textwrap.dedent(
    """
    import hashlib, os, random, sys
    path = sys.argv[1]
    rng = random.Random(7)
    size = 8 << 20
    image = bytearray(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    for _ in range(2000):
        off = rng.randrange(0, size // 4096) * 4096
        page = rng.randbytes(4096)
        os.pwrite(fd, page, off)
        image[off:off + 4096] = page
    tail = rng.randbytes(3 << 20)
    os.pwrite(fd, tail, size)
    image += tail
    print("wrote", hashlib.sha256(image).hexdigest(), len(image), flush=True)
    sys.stdin.readline()
    try:
        os.pwrite(fd, b"late" * 1024, 0)
        os.fsync(fd)
        print("late write accepted", flush=True)
    except OSError as exc:
        print("late write error", exc.errno, flush=True)
    try:
        data = os.pread(fd, 4096, 0)
        print("read", len(data), flush=True)
    except OSError as exc:
        print("read error", exc.errno, flush=True)
    """
)


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultFixture]:
    fixture = make_vault(tmp_path)
    (tmp_path / "mnt").mkdir()
    yield fixture
    mnt = tmp_path / "mnt"
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _mount(vault: VaultFixture) -> Path:
    mnt = vault.dir / "mnt"
    done = run_process("mount", vault.container, mnt, *vault.pw())
    assert done.returncode == 0, done.stderr
    return mnt


def _daemon_pid(vault: VaultFixture) -> int:
    status = json.loads(run_process("status", "--json").stdout)
    (entry,) = [s for s in status if s["container"] == str(vault.container.resolve())]
    return int(entry["pid"])


def _wait_gone(mnt: Path, pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.ismount(mnt) or Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "mount or daemon still there"
        time.sleep(0.02)


def test_the_lock_saves_data_still_in_the_page_cache_of_a_file_held_open(
    vault: VaultFixture,
) -> None:
    mnt = _mount(vault)
    pid = _daemon_pid(vault)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(mnt / "data.bin")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdin is not None
    line = writer.stdout.readline().split()
    assert line[0] == "wrote", line
    digest, size = line[1], int(line[2])
    locked = run_process("lock", mnt)
    assert locked.returncode == 0, locked.stderr
    _wait_gone(mnt, pid)
    out, _ = writer.communicate("go\n", timeout=20)
    # After the lock nothing is accepted or served through the descriptor held open.
    assert "late write error" in out, out
    assert "read error" in out, out
    mnt = _mount(vault)
    data = (mnt / "data.bin").read_bytes()
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == digest
    assert run_process("lock", mnt).returncode == 0


def test_random_small_writes_and_a_lock_right_after_them_lose_nothing(
    vault: VaultFixture,
) -> None:
    """Many files written and closed (no fsync), then an immediate lock: close writes the
    pages back and the lock commits them."""
    mnt = _mount(vault)
    pid = _daemon_pid(vault)
    rng = random.Random(3)
    expected: dict[str, bytes] = {}
    for i in range(200):
        data = rng.randbytes(rng.randrange(1, 70000))
        (mnt / f"f{i}").write_bytes(data)
        expected[f"f{i}"] = data
    assert run_process("lock", mnt).returncode == 0
    _wait_gone(mnt, pid)
    mnt = _mount(vault)
    for name, data in expected.items():
        assert (mnt / name).read_bytes() == data, name
    assert run_process("lock", mnt).returncode == 0
