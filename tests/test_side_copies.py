"""Copies of a vault beside the live one: a restored copy mounted read-only (or a fork
mounted writable) while the vault itself is mounted, through the CLI and real FUSE mounts;
what stays refused (one container file twice, two writers of one lineage); and backups
that never mix a copy's history into the vault's backup set (docs/BACKUP.md §9, §11)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process

pytestmark = pytest.mark.fuse


def _events(vault_uuid: str) -> list[dict[str, object]]:
    out = run_process("log", "--json", "--vault", vault_uuid).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _mounted(mnt: Path) -> bool:
    return f" {mnt} " in Path("/proc/self/mountinfo").read_text()


def _dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path


def _vault_with_backup(tmp_path: Path) -> tuple[VaultFixture, Path, Path]:
    """A vault whose backup set holds version 1 ("old") and version 2 ("new")."""
    vault = make_vault(tmp_path)
    mnt = _dir(tmp_path, "mnt")
    dest = _dir(tmp_path, "backups")
    for text in ("old contents\n", "new contents\n"):
        assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
        (mnt / "doc.txt").write_text(text)
        (mnt / f"only-{text.split()[0]}.txt").write_text(text)
        assert run_process("lock", mnt).returncode == 0
        backed = run_process("backup", vault.container, dest)
        assert backed.returncode == 0, backed.stderr
    return vault, mnt, dest


def test_a_restored_copy_mounts_read_only_beside_the_mounted_vault_and_lock_vault_locks_both(
    tmp_path: Path,
) -> None:
    vault, mnt, dest = _vault_with_backup(tmp_path)
    same = tmp_path / "same.kv"
    shutil.copyfile(vault.container, same)  # a plain copy: the same lineage and generation
    live = run_process("mount", vault.container, mnt, *vault.pw())
    assert live.returncode == 0, live.stderr
    side = _dir(tmp_path, "side")
    other = _dir(tmp_path, "other")
    try:
        # Two writable mounts of one history stay refused (read-only it may look).
        second = run_process("mount", same, other, *vault.pw())
        assert second.returncode == 1, second.stderr
        assert_clean_error(second.stderr)
        assert "(original lineage) is already mounted writable on" in second.stderr
        assert str(mnt) in second.stderr and not _mounted(other)
        (mnt / "while-mounted.txt").write_text("written while the copy was looked at\n")
        old = tmp_path / "old.kv"
        restored = run_process("restore", dest / vault.uuid, "1", old)
        assert restored.returncode == 0, restored.stderr
        looked = run_process("mount", old, side, *vault.pw(), "--read-only", "--accept-rollback")
        assert looked.returncode == 0, looked.stderr
        assert (side / "doc.txt").read_text() == "old contents\n"  # the old file, fetched
        assert not (side / "only-new.txt").exists()
        assert (mnt / "doc.txt").read_text() == "new contents\n"
        shutil.copyfile(side / "doc.txt", mnt / "doc-from-backup.txt")

        status = json.loads(run_process("status", "--json").stdout)
        mine = sorted((s["mountpoint"], s["read_only"]) for s in status if s.get("vault") == vault.uuid)
        assert mine == [(str(mnt), False), (str(side), True)]

        # The same container file twice stays refused.
        twice = run_process("mount", vault.container, other, *vault.pw())
        assert twice.returncode == 1 and f"is already mounted on {mnt}" in twice.stderr
        assert_clean_error(twice.stderr)
        pids = {s["pid"] for s in status if s.get("vault") == vault.uuid}
    finally:
        locked = run_process("lock", "--vault", vault.uuid)
    assert locked.returncode == 0, locked.stderr
    assert f"({mnt})" in locked.stdout and f"({side})" in locked.stdout  # says which
    assert not _mounted(mnt) and not _mounted(side)
    locks = [e for e in _events(vault.uuid) if e["event"] == "lock" and e.get("pid") in pids]
    assert len(locks) == 2 and not any(e.get("error") for e in locks)  # each audited its own
    mounts = {e["mountpoint"] for e in _events(vault.uuid) if e["event"] == "mount"}
    assert {str(mnt), str(side)} <= mounts

    again = run_process("mount", vault.container, mnt, *vault.pw())
    assert again.returncode == 0, again.stderr
    try:
        assert (mnt / "doc.txt").read_text() == "new contents\n"
        assert (mnt / "while-mounted.txt").read_text() == "written while the copy was looked at\n"
        assert (mnt / "doc-from-backup.txt").read_text() == "old contents\n"
    finally:
        assert run_process("lock", mnt).returncode == 0


def test_a_forked_copy_mounts_writable_beside_the_vault_and_each_locks_by_its_mountpoint(
    tmp_path: Path,
) -> None:
    vault, mnt, dest = _vault_with_backup(tmp_path)
    fork = tmp_path / "fork.kv"
    forked = run_process("restore", dest / vault.uuid, "1", fork, "--new-identity", *vault.pw())
    assert forked.returncode == 0, forked.stderr
    side = _dir(tmp_path, "side")
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    try:
        mounted = run_process("mount", fork, side, *vault.pw())
        assert mounted.returncode == 0, mounted.stderr
        (side / "fork.txt").write_text("in the fork\n")
        (mnt / "live.txt").write_text("in the vault\n")
        status = run_process("status").stdout
        assert f"{vault.uuid} on {side} (" in status and ", fork " in status
        assert run_process("lock", side).returncode == 0
        assert _mounted(mnt) and not _mounted(side)
    finally:
        assert run_process("lock", mnt).returncode == 0
    assert run_process("mount", fork, side, *vault.pw()).returncode == 0
    try:
        assert (side / "fork.txt").read_text() == "in the fork\n"
        assert not (side / "live.txt").exists()
    finally:
        assert run_process("lock", side).returncode == 0


def test_a_fork_is_never_backed_up_into_the_vaults_set_automatically_or_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault, mnt, dest = _vault_with_backup(tmp_path)
    config_home = tmp_path / "config"
    (config_home / "kryptvault").mkdir(parents=True)
    (config_home / "kryptvault" / "config.toml").write_text(
        f'[backup]\ndestinations = ["{dest}"]\nkeep = 1\nafter_lock = true\n'
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    set_dir = dest / vault.uuid
    fork = tmp_path / "fork.kv"
    forked = run_process("restore", set_dir, "1", fork, "--new-identity", *vault.pw())
    assert forked.returncode == 0, forked.stderr
    before = sorted(p.name for p in set_dir.iterdir())
    current = (set_dir / "current.kv").read_bytes()

    side = _dir(tmp_path, "side")
    assert run_process("mount", fork, side, *vault.pw()).returncode == 0
    (side / "fork.txt").write_text("in the fork\n")
    assert run_process("lock", side).returncode == 0
    skipped = [e for e in _events(vault.uuid) if e["event"] == "auto_backup_skipped"]
    assert len(skipped) == 1 and skipped[0]["container"] == str(fork)
    assert "fork" in str(skipped[0]["reason"]) and "backup set" in str(skipped[0]["reason"])
    time.sleep(3)  # a backup started after the lock would have begun by now
    assert not [e for e in _events(vault.uuid) if e["event"] in ("backup_started", "backup_done")
                and e.get("container") == str(fork)]
    assert sorted(p.name for p in set_dir.iterdir()) == before
    assert (set_dir / "current.kv").read_bytes() == current

    by_hand = run_process("backup", fork, dest, "--keep", "1")
    assert by_hand.returncode == 1
    assert_clean_error(by_hand.stderr)
    assert f"is lineage {skipped[0]['lineage']} of vault {vault.uuid}" in by_hand.stderr
    assert "would mix two histories" in by_hand.stderr and "--full" in by_hand.stderr
    assert sorted(p.name for p in set_dir.iterdir()) == before
    assert (set_dir / "current.kv").read_bytes() == current
    apart = _dir(tmp_path, "fork-backups")
    for _ in range(2):  # a destination of its own, continued
        kept = run_process("backup", fork, apart)
        assert kept.returncode == 0, kept.stderr
    into_forks = run_process("backup", vault.container, apart)  # and the other way round
    assert into_forks.returncode == 1 and "holds lineage" in into_forks.stderr, into_forks.stderr

    # The vault itself still backs up after its lock, into its own set.
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    (mnt / "more.txt").write_text("more\n")
    assert run_process("lock", mnt).returncode == 0
    deadline = time.monotonic() + 60
    while not [e for e in _events(vault.uuid) if e["event"] == "backup_done" and e.get("auto")]:
        assert time.monotonic() < deadline, _events(vault.uuid)
        time.sleep(0.2)
    assert os.path.exists(set_dir / "current.kv")


@pytest.fixture
def bind_token(tmp_path: Path) -> Iterator[Path]:
    """A token directory that can be "unplugged": a bind mount of a real directory."""
    real = _dir(tmp_path, "stick")
    token = _dir(tmp_path, "token")
    subprocess.run(["mount", "--bind", str(real), str(token)], check=True)
    try:
        yield token
    finally:
        subprocess.run(["umount", str(token)], capture_output=True)


def test_pulling_the_token_locks_the_vault_and_the_copy_mounted_beside_it(
    tmp_path: Path, bind_token: Path
) -> None:
    vault, mnt, dest = _vault_with_backup(tmp_path)
    assert vault.token == bind_token
    old = tmp_path / "old.kv"
    assert run_process("restore", dest / vault.uuid, "1", old).returncode == 0
    side = _dir(tmp_path, "side")
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    looked = run_process("mount", old, side, *vault.pw(), "--read-only", "--accept-rollback")
    assert looked.returncode == 0, looked.stderr
    pids = {s["pid"] for s in json.loads(run_process("status", "--json").stdout) if s.get("pid")}
    assert len(pids) == 2
    subprocess.run(["umount", str(bind_token)], check=True)  # unplug
    deadline = time.monotonic() + 15
    while (_mounted(mnt) or _mounted(side)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _mounted(mnt) and not _mounted(side)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        locks = [e for e in _events(vault.uuid) if e["event"] == "lock" and e.get("pid") in pids]
        if len(locks) == 2:
            break
        time.sleep(0.1)
    assert sorted(e["reason"] for e in locks) == ["unplug", "unplug"]
