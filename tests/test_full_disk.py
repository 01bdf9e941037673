"""A full disk under a mounted vault (real mounts on a 64 MiB ext4 loop device): writes
fail with ENOSPC when they are made, never with EIO later; whatever was accepted is saved;
deletes still work; and a commit that fails anyway is reported by status, lock and the
audit log instead of being lost in silence."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process
from loopdisk import MIB, ext4_loop_disk, hand_pages_to_daemon, run_quiet
from store_support import Vault

from kryptvault.session.launcher import daemon_log_path

pytestmark = pytest.mark.fuse

DISK_MIB = 64


_run = run_quiet


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 MiB ext4 on a loop device, mounted on tmp_path/disk; on the way out the
    vault mounted on tmp_path/mnt is locked and everything undone, whatever the test did."""
    mnt = tmp_path / "mnt"
    with ext4_loop_disk(tmp_path, DISK_MIB) as top:
        try:
            yield top
        finally:
            with contextlib.suppress(Exception):
                if os.path.ismount(mnt):
                    run_process("lock", mnt)
            _run("umount", "-l", mnt)  # a dead FUSE mount is no "mount" to ismount


def _vault_on(disk: Path) -> VaultFixture:
    vault = make_vault(disk.parent)
    container = disk / "vault.kv"
    shutil.move(vault.container, container)
    (disk.parent / "mnt").mkdir()
    return dataclasses.replace(vault, container=container)


def _mount(vault: VaultFixture) -> Path:
    mnt = vault.dir / "mnt"
    mounted = run_process("mount", vault.container, mnt, *vault.pw())
    assert mounted.returncode == 0, mounted.stderr
    return mnt


def _lock(mnt: Path) -> subprocess.CompletedProcess[str]:
    locked = run_process("lock", mnt)
    deadline = time.monotonic() + 20
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    return locked


def _status(vault: VaultFixture) -> dict[str, object]:
    entries = json.loads(run_process("status", "--json").stdout)
    (entry,) = [e for e in entries if e.get("vault") == vault.uuid]
    return dict(entry)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes, chunk: int = MIB) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for pos in range(0, len(data), chunk):
            view = memoryview(data)[pos : pos + chunk]
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _fill_vault(mnt: Path, size: int = 3 * MIB) -> tuple[dict[str, str], OSError]:
    """Files of `size` random bytes until one fails: {name: sha256} of those written and
    closed without error, and the error."""
    kept: dict[str, str] = {}
    for i in range(4 * DISK_MIB * MIB // size):
        data = os.urandom(size)
        try:
            _write_file(mnt / f"f{i:03d}", data)
        except OSError as exc:
            return kept, exc
        kept[f"f{i:03d}"] = _digest(data)
    raise AssertionError(f"{4 * DISK_MIB} MiB went into a vault on a {DISK_MIB} MiB disk")


def _check_files(mnt: Path, expected: dict[str, str]) -> None:
    for name, digest in expected.items():
        assert _digest((mnt / name).read_bytes()) == digest, name


def test_filling_the_disk_fails_writes_with_enospc_and_keeps_every_file_closed_without_error(
    disk: Path,
) -> None:
    vault = _vault_on(disk)
    mnt = _mount(vault)
    empty = os.statvfs(mnt)
    assert empty.f_bavail * empty.f_frsize > 40 * MIB
    kept, error = _fill_vault(mnt)
    assert error.errno == errno.ENOSPC, error
    assert sum(1 for _ in kept) * 3 >= DISK_MIB // 2  # most of the disk was usable
    # The report's reproduction: dd with conv=fsync, until the disk is full.
    dd = _run("dd", "if=/dev/zero", f"of={mnt / 'dd.bin'}", "bs=1M", "count=64", "conv=fsync")
    assert dd.returncode != 0
    assert "No space left on device" in dd.stderr and "Input/output error" not in dd.stderr, dd.stderr
    with pytest.raises(OSError) as small:
        _write_file(mnt / "one-more", os.urandom(2 * MIB))
    assert small.value.errno == errno.ENOSPC
    # The last of it in 64 KiB appends; then every change that needs a block is refused.
    first = min(kept)
    appended = bytearray((mnt / first).read_bytes())
    fd = os.open(mnt / first, os.O_WRONLY | os.O_APPEND)
    try:
        while True:
            piece = os.urandom(65536)
            try:
                os.write(fd, piece)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            appended += piece
    finally:
        os.close(fd)
    kept[first] = _digest(bytes(appended))
    for change in (
        lambda: os.mkdir(mnt / "dir"),
        lambda: os.close(os.open(mnt / "new-file", os.O_CREAT | os.O_WRONLY, 0o644)),
        lambda: os.setxattr(mnt / first, "user.note", b"value"),
        lambda: os.truncate(mnt / first, 100 * MIB),
    ):
        with pytest.raises(OSError) as refused:
            change()
        assert refused.value.errno == errno.ENOSPC
    full = os.statvfs(mnt)  # df agrees: no more than the margin of the last refusal is left
    assert full.f_bavail * full.f_frsize < 4 * MIB
    # Full is not broken: nothing accepted is at risk, so status says all is well.
    status = _status(vault)
    assert status["ok"] is True and status["problem"] is None, status
    _check_files(mnt, kept)
    locked = _lock(mnt)
    assert locked.returncode == 0, locked.stderr
    assert locked.stdout.startswith("locked vault")
    mnt = _mount(vault)
    _check_files(mnt, kept)
    assert _lock(mnt).returncode == 0


def test_on_a_full_disk_rm_and_truncate_work_and_free_space_for_new_writes(disk: Path) -> None:
    vault = _vault_on(disk)
    mnt = _mount(vault)
    kept, error = _fill_vault(mnt)
    assert error.errno == errno.ENOSPC
    names = sorted(kept)
    os.unlink(mnt / f"f{len(kept):03d}")  # the one that failed half-way
    os.unlink(mnt / names[0])
    os.truncate(mnt / names[1], 0)
    subprocess.run(["rm", str(mnt / names[2])], check=True)
    del kept[names[0]], kept[names[2]]
    kept[names[1]] = _digest(b"")
    fresh = os.urandom(6 * MIB)  # fits only in what the three freed
    _write_file(mnt / "after-rm", fresh)
    kept["after-rm"] = _digest(fresh)
    _check_files(mnt, kept)
    locked = _lock(mnt)
    assert locked.returncode == 0, locked.stderr
    mnt = _mount(vault)
    _check_files(mnt, kept)
    assert sorted(p.name for p in mnt.iterdir()) == sorted(kept)
    assert _lock(mnt).returncode == 0


def _fill_host(path: Path) -> None:
    """What another process does: take every free block of the host filesystem."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (4 * MIB, 64 * 1024, 4096):
            block = bytes(size)
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        os.fsync(fd)
    finally:
        os.close(fd)


def _stall(vault: VaultFixture, path: Path, filler: Path) -> tuple[bytes, int]:
    """Write 6 MiB in small writes to a file kept open (the daemon holds them uncommitted;
    a closed file's data would be encrypted into the container at once), then fill the
    host; again if the commit timer committed them first. Returns what was written and
    the open descriptor."""
    for _attempt in range(3):
        generation = _status(vault)["generation"]
        data = os.urandom(6 * MIB)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for pos in range(0, len(data), 64 * 1024):
            os.write(fd, data[pos : pos + 64 * 1024])
        hand_pages_to_daemon(fd)
        _fill_host(filler)
        if _status(vault)["generation"] == generation:
            return data, fd
        os.close(fd)
        filler.unlink()
    pytest.fail("the commit timer committed before the host was full, three times")


def test_a_commit_that_fails_because_another_process_filled_the_host_is_reported_everywhere(
    disk: Path,
) -> None:
    vault = _vault_on(disk)
    mnt = _mount(vault)
    saved = os.urandom(2 * MIB)
    fd = os.open(mnt / "saved.bin", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, saved)
    os.fsync(fd)
    filler = disk / "filler"
    unsaved, unsaved_fd = _stall(vault, mnt / "unsaved.bin", filler)
    with pytest.raises(OSError) as failed:
        os.fsync(fd)
    assert failed.value.errno == errno.ENOSPC
    os.close(fd)
    os.close(unsaved_fd)  # no room to encrypt it into either: it stays in memory

    status = _status(vault)
    assert status["ok"] is False, status
    assert "full" in str(status["problem"]), status
    assert int(str(status["dirty_bytes"])) >= 6 * MIB
    human = run_process("status").stdout
    assert "NOT OK" in human and "full" in human, human
    with pytest.raises(OSError) as refused:
        _write_file(mnt / "new", b"x")
    assert refused.value.errno == errno.EROFS
    assert (mnt / "saved.bin").read_bytes() == saved  # reads keep working
    assert (mnt / "unsaved.bin").read_bytes() == unsaved  # (what is not saved yet too)
    log = daemon_log_path(vault.uuid).read_text()
    assert "cannot save the vault's changes" in log and "read-only" in log, log

    locked = _lock(mnt)
    assert locked.returncode == 1, locked.stdout
    assert_clean_error(locked.stderr)
    assert "MiB accepted since the last commit could not be saved" in locked.stderr
    assert "full" in locked.stderr and "locked vault" not in locked.stdout
    entries = [json.loads(x) for x in run_process("log", "--json", "--vault", vault.uuid).stdout.splitlines()]
    (lock,) = [e for e in entries if e["event"] == "lock"]
    assert lock["error"] and "full" in lock["error"], lock
    assert lock["unsaved_bytes"] >= 6 * MIB, lock
    mib = f"{lock['unsaved_bytes'] / MIB:.1f} MiB"
    assert mib in locked.stderr, (mib, locked.stderr)

    filler.unlink()
    mnt = _mount(vault)
    assert (mnt / "saved.bin").read_bytes() == saved
    assert _lock(mnt).returncode == 0


def test_the_free_unit_count_stays_exact_and_the_room_check_sees_the_host(disk: Path) -> None:
    """The store keeps its free-unit count up to date for the check before every write;
    the check refuses what would not fit on the host and accepts again after frees."""
    vault = Vault(disk / "store.kv")
    store = vault.create()
    units = store._units
    oids = []
    for i in range(6):
        oid = store.allocate_oid()
        store.write(oid, 0, 0, os.urandom(3 * MIB + i))
        oids.append(oid)
        assert units.free_count() == units.map.count(0)
    store.commit()
    assert units.free_count() == units.map.count(0)
    assert store.check_room(8 * MIB)
    host = os.statvfs(disk)
    assert not store.check_room(host.f_bavail * host.f_frsize + store.statfs().free_units * 4096)
    for oid in oids[:3]:
        store.free_oid(oid)
    assert units.free_count() == units.map.count(0)
    store.commit()
    assert units.free_count() == units.map.count(0)
    before = store.room()
    oid = store.allocate_oid()
    for i in range(80):  # small writes stay dirty (buffered) until the flush
        store.write(oid, 0, i * 65536, os.urandom(65536))
    assert store.commit_need() >= 5 * MIB
    store.flush()
    assert store.room() <= before - 4 * MIB
    store.close()
    vault.close_fds()


def test_once_the_host_has_space_again_a_commit_succeeds_and_the_vault_is_writable_again(
    disk: Path,
) -> None:
    vault = _vault_on(disk)
    mnt = _mount(vault)
    fd = os.open(mnt / "anchor", os.O_RDWR | os.O_CREAT, 0o644)
    filler = disk / "filler"
    data, late_fd = _stall(vault, mnt / "late.bin", filler)
    with pytest.raises(OSError) as failed:
        os.fsync(fd)
    assert failed.value.errno == errno.ENOSPC
    assert _status(vault)["ok"] is False
    filler.unlink()
    os.fsync(fd)  # the retry finds the space
    os.close(fd)
    os.close(late_fd)
    status = _status(vault)
    assert status["ok"] is True and status["problem"] is None, status
    _write_file(mnt / "more", b"writable again")
    locked = _lock(mnt)
    assert locked.returncode == 0, locked.stderr
    mnt = _mount(vault)
    assert (mnt / "late.bin").read_bytes() == data
    assert (mnt / "more").read_bytes() == b"writable again"
    assert _lock(mnt).returncode == 0
