"""Rollback detection with the token's generation, and the restore + --accept-rollback flow."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from cli_helpers import assert_clean_error, make_vault, run_process, vault_and_dest

from kryptvault.token.records import read_records

pytestmark = pytest.mark.fuse


def _share_generation(token: Path, vault_uuid: str) -> int:
    """The token's rollback record of the vault's original lineage (docs/TOKEN.md)."""
    return read_records(token, uuid.UUID(vault_uuid)).get(bytes(16))


def _lineages(token: Path, vault_uuid: str) -> int:
    return len(read_records(token, uuid.UUID(vault_uuid)).entries)


def test_an_older_container_is_refused_until_the_rollback_is_accepted(tmp_path: Path) -> None:
    vault, mnt, dest = vault_and_dest(tmp_path)
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    (mnt / "state.txt").write_text("version one\n")
    assert run_process("lock", mnt).returncode == 0
    backed = run_process("backup", vault.container, dest, "--json")
    assert backed.returncode == 0, backed.stderr
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    (mnt / "state.txt").write_text("version two\n")
    assert run_process("lock", mnt).returncode == 0
    seen = _share_generation(vault.token, vault.uuid)
    assert seen > 0  # the lock recorded the newest generation on the token

    restored = run_process("restore", dest / vault.uuid, vault.container, "--force")
    assert restored.returncode == 0, restored.stderr
    assert "--accept-rollback" in restored.stdout + restored.stderr

    refused = run_process("mount", vault.container, mnt, *vault.pw())
    assert refused.returncode == 1
    assert_clean_error(refused.stderr)
    assert (
        "older than the last state its token saw" in refused.stderr and "--accept-rollback" in refused.stderr
    )
    assert not (mnt / "state.txt").exists()

    accepted = run_process("mount", vault.container, mnt, *vault.pw(), "--accept-rollback")
    assert accepted.returncode == 0, accepted.stderr
    assert (mnt / "state.txt").read_text() == "version one\n"
    # The record of the old lineage is never lowered: the mount forked the restored
    # container into a lineage of its own, with a record of its own.
    assert _share_generation(vault.token, vault.uuid) == seen
    assert _lineages(vault.token, vault.uuid) == 2
    assert run_process("lock", mnt).returncode == 0
    again = run_process("mount", vault.container, mnt, *vault.pw())
    assert again.returncode == 0, again.stderr  # no false alarm after accepting
    assert run_process("lock", mnt).returncode == 0
    events = [
        json.loads(x)["event"]
        for x in run_process("log", "--json", "--vault", vault.uuid).stdout.splitlines()
    ]
    assert "rollback_accepted" in events and "mount_failed" in events


def test_a_backup_token_that_missed_mounts_raises_no_alarm(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    backup_token = tmp_path / "backup-token"
    backup_token.mkdir()
    added = run_process(
        "token",
        "add",
        vault.container,
        "--token",
        backup_token,
        "--with-token",
        vault.token,
        "--password-file",
        vault.password_file,
        "--kdf-time-ms",
        "30",
        "--kdf-memory-mib",
        "8",
    )
    assert added.returncode == 0, added.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for i in range(3):  # the primary token sees three newer generations
        assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
        (mnt / "f").write_text(str(i))
        assert run_process("lock", mnt).returncode == 0
    assert _share_generation(backup_token, vault.uuid) < _share_generation(vault.token, vault.uuid)
    with_backup = run_process(
        "mount", vault.container, mnt, "--token", backup_token, "--password-file", vault.password_file
    )
    assert with_backup.returncode == 0, with_backup.stderr
    assert (mnt / "f").read_text() == "2"
    assert run_process("lock", mnt).returncode == 0
    assert _share_generation(backup_token, vault.uuid) >= _share_generation(vault.token, vault.uuid)


def test_idle_lock_locks_a_vault_nobody_uses(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert run_process("mount", vault.container, mnt, *vault.pw(), "--idle-lock", "0.1").returncode == 0
    (mnt / "f").write_text("idle soon")
    start = time.monotonic()
    # Watch the mount table, not the folder: looking into the folder is activity.
    while f" {mnt} " in Path("/proc/self/mountinfo").read_text() and time.monotonic() - start < 30:
        time.sleep(0.2)
    idle_for = time.monotonic() - start
    assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text()
    assert 5.0 <= idle_for < 20.0  # 0.1 minutes = 6 s without a file operation
    locks = [json.loads(x) for x in run_process("log", "--json", "--vault", vault.uuid).stdout.splitlines()]
    assert [e["reason"] for e in locks if e["event"] == "lock"] == ["idle"]
