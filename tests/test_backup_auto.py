"""Every lock is a backup: destinations from config.toml, started after the lock, in the
background, to each reachable destination; results in the audit log and in `status`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cli_helpers import make_vault, run_process

pytestmark = pytest.mark.fuse


def _events(vault_uuid: str) -> list[dict[str, object]]:
    out = run_process("log", "--json", "--vault", vault_uuid).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _wait_for(vault_uuid: str, event: str, count: int, timeout: float = 60.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _events(vault_uuid) if e["event"] == event]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {event} for {vault_uuid} within {timeout} s: {_events(vault_uuid)}")


def test_each_lock_starts_a_backup_to_reachable_destinations_and_skips_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_home = tmp_path / "config"
    (config_home / "kryptvault").mkdir(parents=True)
    disk = tmp_path / "backup-disk"
    disk.mkdir()
    unplugged = tmp_path / "nas-not-mounted"
    (config_home / "kryptvault" / "config.toml").write_text(
        f'[backup]\ndestinations = ["{disk}", "{unplugged}"]\nkeep = 3\nafter_lock = true\n'
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for round_ in range(2):
        assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
        (mnt / f"file{round_}.txt").write_text(f"round {round_}\n")
        started = time.monotonic()
        assert run_process("lock", mnt).returncode == 0
        lock_seconds = time.monotonic() - started
        assert lock_seconds < 10  # the backup runs after the lock, not inside it
        done = _wait_for(vault.uuid, "backup_done", round_ + 1)
        assert done[-1]["auto"] is True and done[-1]["version"] == round_ + 1
    skipped = [e for e in _events(vault.uuid) if e["event"] == "backup_skipped"]
    assert len(skipped) == 2 and skipped[0]["dest"] == str(unplugged)
    set_dir = disk / vault.uuid
    verify = run_process("verify", set_dir)
    assert verify.returncode == 0, verify.stderr
    restored = tmp_path / "restored.kv"
    assert run_process("restore", set_dir, restored).returncode == 0
    status = run_process("status").stdout
    line = next(x for x in status.splitlines() if x.startswith(f"last backup of {vault.uuid} to {set_dir}:"))
    assert ": done at " in line and line.endswith("version 2")
    other = next(
        x for x in status.splitlines() if x.startswith(f"last backup of {vault.uuid} to {unplugged}:")
    )
    assert ": skipped at " in other
    # The newest version holds both files: mount the restored copy.
    assert run_process("mount", restored, mnt, *vault.pw(), "--accept-rollback").returncode == 0
    try:
        assert (mnt / "file0.txt").read_text() == "round 0\n"
        assert (mnt / "file1.txt").read_text() == "round 1\n"
    finally:
        run_process("lock", mnt)
    os.sync()


def test_backup_auto_without_destinations_says_where_to_configure_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    vault = make_vault(tmp_path)
    result = run_process("backup", "auto", vault.container)
    assert result.returncode == 2
    assert "no backup destinations are configured" in result.stderr


@pytest.mark.root
def test_pulling_the_token_out_leaves_a_verified_restorable_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole promise: set a destination once, pull the token, find a backup."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop-device token")
    from kryptvault.cli.demo_commands import LoopStick

    config_home = tmp_path / "config"
    (config_home / "kryptvault").mkdir(parents=True)
    disk = tmp_path / "backup-disk"
    disk.mkdir()
    (config_home / "kryptvault" / "config.toml").write_text(f'[backup]\ndestinations = ["{disk}"]\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    stick = LoopStick(tmp_path / "stick.img", tmp_path / "stick")
    stick.create()
    stick.plug()
    try:
        token = f"fs:{stick.fs_uuid()}"
        pw = tmp_path / "pw"
        pw.write_text("a long test password\n")
        init = run_process(
            "init",
            tmp_path / "v.kv",
            "--token",
            token,
            "--password-file",
            pw,
            "--kdf-time-ms",
            "30",
            "--kdf-memory-mib",
            "8",
        )
        assert init.returncode == 0, init.stderr
        vault_uuid = init.stdout.split()[2]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        assert (
            run_process("mount", tmp_path / "v.kv", mnt, "--token", token, "--password-file", pw).returncode
            == 0
        )
        (mnt / "work.txt").write_text("saved before the unplug\n")
        with open(mnt / "work.txt", "rb") as f:
            os.fsync(f.fileno())
        stick.unplug()
        done = _wait_for(vault_uuid, "backup_done", 1)
        locks = [e for e in _events(vault_uuid) if e["event"] == "lock"]
        assert locks[-1]["reason"] == "unplug"
        set_dir = disk / vault_uuid
        assert done[-1]["version"] == 1
        assert run_process("verify", set_dir).returncode == 0
        restored = tmp_path / "restored.kv"
        assert run_process("restore", set_dir, restored).returncode == 0
        stick.plug()
        assert run_process("mount", restored, mnt, "--token", token, "--password-file", pw).returncode == 0
        try:
            assert (mnt / "work.txt").read_text() == "saved before the unplug\n"
        finally:
            run_process("lock", mnt)
    finally:
        stick.unplug()
