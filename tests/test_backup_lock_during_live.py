"""The vault is locked (standing in for the token being unplugged) while a live backup
is copying it: the lock wins and does not wait for the backup, the partial backup is
discarded with a clean one-line error, and the versions already in DEST stay intact.

A live backup is only a consistent copy while the mount daemon's backup hold lasts
(docs/BACKUP.md §7): once the daemon is gone, nothing keeps the held generation's units
from being reused (a new mount, or the backup after the lock). So a backup whose hold
ended before it finished reading must not commit a version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import KRYPTVAULT, assert_clean_error, mounted_vault_and_dest, run_process

from kryptvault.backup.engine import TEST_SLOW_ENV
from kryptvault.backup.restore import run_restore
from kryptvault.session.paths import state_dir

pytestmark = pytest.mark.fuse

SLOW_MS = 400  # per 1 MiB chunk copied: ~24 chunks → the incremental copy takes ~10 s


def _status(vault_uuid: str) -> dict[str, object] | None:
    entries = json.loads(run_process("status", "--json").stdout or "[]")
    found = [s for s in entries if s["vault"] == vault_uuid]
    return found[0] if found else None


def _audit(vault_uuid: str, since: int) -> list[dict[str, object]]:
    path = state_dir() / "audit.jsonl"
    with path.open("rb") as f:
        f.seek(since)
        lines = f.read().decode("utf-8", "replace").splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    return [e for e in entries if e.get("vault") == vault_uuid]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_locking_during_a_live_backup_discards_it_and_keeps_the_previous_versions(tmp_path: Path) -> None:
    vault, mnt, dest = mounted_vault_and_dest(tmp_path)
    audit_path = state_dir() / "audit.jsonl"
    audit_start = audit_path.stat().st_size if audit_path.exists() else 0
    rnd = random.Random(11)
    backup: subprocess.Popen[str] | None = None
    try:
        for i in range(4):
            (mnt / f"before{i}.bin").write_bytes(rnd.randbytes(1 << 20))
        first = run_process("backup", vault.container, dest, "--json")
        assert first.returncode == 0, first.stderr
        v1 = json.loads(first.stdout)
        assert v1["version"] == 1 and v1["live"]
        set_dir = Path(v1["backup"])
        v1_copy = tmp_path / "v1-before.kv"
        run_restore(dest, 1, v1_copy)
        v1_sha = _sha(v1_copy)
        v1_files = sorted(p.name for p in set_dir.iterdir())

        for i in range(24):  # incompressible, spread over ~24 MiB of chunks
            (mnt / f"after{i}.bin").write_bytes(rnd.randbytes(1 << 20))
        status = _status(vault.uuid)
        assert status is not None
        daemon_pid = int(str(status["pid"]))

        backup = subprocess.Popen(
            [KRYPTVAULT, "backup", str(vault.container), str(dest), "--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, TEST_SLOW_ENV: str(SLOW_MS)},
        )
        # Wait until it holds the daemon and is copying (its temps are in DEST).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            held = (_status(vault.uuid) or {}).get("backup_holds") == 1
            if held and any(p.name.startswith(".tmp-") for p in set_dir.iterdir()):
                break
            assert backup.poll() is None, backup.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the backup never started copying")
        time.sleep(0.2)
        assert backup.poll() is None, "the backup finished before the lock: make it slower"

        started = time.monotonic()
        lock = run_process("lock", mnt)
        assert lock.returncode == 0, lock.stderr
        while os.path.ismount(mnt) or Path(f"/proc/{daemon_pid}").exists():
            assert time.monotonic() - started < 10, "the lock waited for the backup"
            time.sleep(0.01)
        lock_seconds = time.monotonic() - started
        backup_running_at_lock = backup.poll() is None
        print(
            f"\nlock completed (mount gone, daemon exited) in {lock_seconds * 1000:.0f} ms; "
            f"backup still running then: {backup_running_at_lock}"
        )
        assert backup_running_at_lock, "the lock waited for the backup"
        assert lock_seconds < 5

        out, err = backup.communicate(timeout=60)
        backup_seconds = time.monotonic() - started
        print(f"backup exited {backup.returncode} {backup_seconds:.1f} s after the lock: {err.strip()}")
    finally:
        if backup is not None and backup.poll() is None:
            backup.kill()
            backup.wait()
        if os.path.ismount(mnt):
            run_process("lock", mnt)

    # The lock won: the partial backup was discarded, cleanly.
    assert backup.returncode == 1, out + err
    assert out == ""
    assert_clean_error(err)
    assert sorted(p.name for p in set_dir.iterdir()) == v1_files  # no temps, no version 2
    assert "locked during the backup" in err and "nothing was kept" in err
    # Version 1 is intact.
    listed = run_process("backup", "list", dest, "--json")
    assert listed.returncode == 0, listed.stderr
    info = json.loads(listed.stdout)
    assert [r["version"] for r in info["versions"]] == [1]
    assert info["versions"][0]["generation"] == v1["generation"]
    assert not info["interrupted_backup_pending"]
    check = run_process("verify", set_dir)
    assert check.returncode == 0, check.stdout + check.stderr
    again = tmp_path / "v1-after.kv"
    run_restore(dest, 1, again)
    assert _sha(again) == v1_sha
    full = run_process("verify", dest, "--full", "--version", "1", *vault.pw())
    assert full.returncode == 0, full.stdout + full.stderr
    # Both are in the audit log, the failure with its reason.
    events = _audit(vault.uuid, audit_start)
    kinds = [e["event"] for e in events]
    assert "lock" in kinds, kinds
    failed = [e for e in events if e["event"] == "backup_failed"]
    assert len(failed) == 1 and "locked during the backup" in str(failed[0].get("error")), events
    assert [e for e in events if e["event"] == "backup_done"] and kinds.count("backup_done") == 1
