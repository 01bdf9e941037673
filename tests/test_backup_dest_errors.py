"""Bad destinations fail with one clean line and leave the backup set as it was: another
vault's backups, a missing directory, a read-only or full filesystem, a running backup."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process
from test_backup_support import OpenVault, file_digest, set_dir, tree

from kryptvault.backup.engine import run_backup
from kryptvault.backup.restore import run_restore
from kryptvault.backup.verify import verify_set


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(vault: VaultFixture, name: str, size: int) -> None:
    with OpenVault.of(vault) as ov:
        ov.write(name, os.urandom(size))
        ov.commit()


def _intact(dest: Path, before: list[str], digest: str, tmp: Path) -> None:
    assert tree(dest) == before  # nothing added, nothing half-renamed, no temp files
    report = verify_set(dest)
    assert report.ok and not report.notes, [p.text() for p in report.problems] + report.notes
    out = tmp / "check.kv"
    run_restore(dest, None, out, force=True)
    assert file_digest(out) == digest


def test_destination_holding_another_vaults_backups_is_refused(tmp_path: Path) -> None:
    first = make_vault(tmp_path, name="first.kv")
    second = make_vault(tmp_path, name="second.kv")
    dest = tmp_path / "dest"
    dest.mkdir()
    assert run_process("backup", first.container, dest).returncode == 0
    before = tree(dest)
    for target in (dest, set_dir(dest, first)):
        result = run_process("backup", second.container, target)
        assert result.returncode == 1
        assert_clean_error(result.stderr)
        assert f"holds the backups of vault {first.uuid}, not of vault {second.uuid}" in result.stderr
    assert tree(dest) == before


def test_missing_destination_is_a_usage_error(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    result = run_process("backup", vault.container, tmp_path / "nowhere")
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert "does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists()
    missing = run_process("restore", tmp_path / "nowhere", tmp_path / "x.kv")
    assert missing.returncode == 2
    assert_clean_error(missing.stderr)


def test_read_only_destination(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    other = make_vault(tmp_path, name="other.kv")
    with tmpfs(tmp_path / "ro", "64m") as dest:
        assert run_process("backup", vault.container, dest).returncode == 0
        digest = file_digest(vault.container)
        _fill(vault, "/more.bin", 200_000)
        before = tree(dest)
        subprocess.run(["mount", "-o", "remount,ro", str(dest)], check=True)
        result = run_process("backup", vault.container, dest)
        assert result.returncode == 1
        assert_clean_error(result.stderr)
        assert "read-only" in result.stderr
        _intact(dest, before, digest, tmp_path)
        ok = run_process("verify", dest)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    with tmpfs(tmp_path / "empty-ro", "64m") as empty:
        subprocess.run(["mount", "-o", "remount,ro", str(empty)], check=True)
        fresh = run_process("backup", other.container, empty)
        assert fresh.returncode == 1
        assert_clean_error(fresh.stderr)
        assert "read-only" in fresh.stderr
        assert tree(empty) == []


@pytest.mark.parametrize("strategy", ["in-place", "copy"])
def test_full_destination_keeps_the_previous_version(tmp_path: Path, strategy: str) -> None:
    vault = make_vault(tmp_path)
    with tmpfs(tmp_path / "full", "2m") as dest:
        run_backup(vault.container, dest)
        digest = file_digest(vault.container)
        before = tree(dest)
        _fill(vault, "/big.bin", 1_500_000)
        result = run_process("backup", vault.container, dest, "--strategy", strategy)
        assert result.returncode == 1, result.stdout
        assert_clean_error(result.stderr)
        assert "no space left on the device" in result.stderr
        _intact(dest, before, digest, tmp_path)


def test_first_backup_into_a_full_destination_leaves_nothing(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    _fill(vault, "/big.bin", 3_000_000)
    with tmpfs(tmp_path / "tiny", "2m") as dest:
        result = run_process("backup", vault.container, dest)
        assert result.returncode == 1
        assert_clean_error(result.stderr)
        assert "no space left on the device" in result.stderr
        assert tree(dest) == []


def test_a_running_backup_and_a_mounted_backup_copy_are_respected(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    run_backup(vault.container, dest)
    _fill(vault, "/x.bin", 50_000)
    sdir = set_dir(dest, vault)
    before = tree(dest)
    fd = os.open(sdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = run_process("backup", vault.container, dest)
        listing = run_process("backup", "list", dest)
    finally:
        os.close(fd)
    assert busy.returncode == 1 and "another backup into" in busy.stderr
    assert_clean_error(busy.stderr)
    assert listing.returncode == 1 and "is running" in listing.stderr
    fd = os.open(sdir / "current.kv", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # someone mounted the backup copy itself
        in_use = run_process("backup", vault.container, dest)
    finally:
        os.close(fd)
    assert in_use.returncode == 1 and "is in use" in in_use.stderr
    assert_clean_error(in_use.stderr)
    assert tree(dest) == before
    assert run_process("backup", vault.container, dest).returncode == 0
