"""A backup killed after any of its steps (every write, truncate, fsync, rename, unlink)
leaves every committed version intact: verify passes, each version restores to the exact
container it was taken from, and the next backup cleans up and completes."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, make_vault, run_process
from test_backup_support import OpenVault, file_digest, set_dir

from kryptvault.backup.engine import run_backup
from kryptvault.backup.fsutil import TEST_DIE_ENV, TEST_DIE_EXIT
from kryptvault.backup.restore import run_restore
from kryptvault.backup.setdir import TMP_PREFIX, find_set, load_state
from kryptvault.backup.verify import verify_set

KEEP = 2


def _killed_backup(container: Path, dest: Path, die_after: int, strategy: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.environ[TEST_DIE_ENV] = str(die_after)
            run_backup(container, dest, keep=KEEP, strategy=strategy)
            code = 0
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _change(vault: VaultFixture, seed: int) -> None:
    rnd = random.Random(seed)
    with OpenVault.of(vault) as ov:
        ov.write("/data.bin", rnd.randbytes(150_000), offset=rnd.randrange(1 << 20), truncate=False)
        ov.write(f"/f{seed}.txt", rnd.randbytes(rnd.randrange(1, 50_000)))
        ov.write("/grow.bin", rnd.randbytes(150_000 * (seed % 5 + 1)))  # the container grows too
        ov.commit()


def _check_versions(dest: Path, digests: dict[int, str], tmp: Path) -> list[int]:
    report = verify_set(dest)
    assert report.ok, [p.text() for p in report.problems]
    versions = report.versions
    for v in versions:
        out = tmp / f"check-{v}.kv"
        run_restore(dest, v, out, force=True)
        assert file_digest(out) == digests[v], f"version {v} changed"
        out.unlink()
    return versions


def _scenario(tmp_path: Path, strategy: str, backups_before: int) -> tuple[int, int]:
    vault = make_vault(tmp_path)
    with OpenVault.of(vault) as ov:
        ov.write("/data.bin", random.Random(0).randbytes(1 << 20))
        ov.commit()
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    digests: dict[int, str] = {}
    for v in range(1, backups_before + 1):
        if v > 1:
            _change(vault, v)
        digests[v] = file_digest(vault.container)
        run_backup(vault.container, pristine, keep=KEEP, strategy=strategy)
    _change(vault, 100)
    new_version = backups_before + 1
    digests[new_version] = file_digest(vault.container)
    before = sorted(digests)[-(KEEP):-1] if backups_before else []
    pending_seen = 0
    for step in range(1, 500):
        dest = tmp_path / f"dest-{step}"
        shutil.copytree(pristine, dest)
        rc = _killed_backup(vault.container, dest, step, strategy)
        if rc == 0:
            assert step > 5
            break
        assert rc == TEST_DIE_EXIT
        if backups_before:
            set_path, vault_uuid = find_set(dest)
            if load_state(set_path, vault_uuid).pending is not None:
                pending_seen = pending_seen or step
            versions = _check_versions(dest, digests, tmp_path)
            # Either the old versions, or (killed after the commit point) the new one too.
            assert versions[-1] in (backups_before, new_version)
            assert set(before) <= set(versions) or versions[-1] == new_version
        # The next backup cleans up and completes.
        result = run_backup(vault.container, dest, keep=KEEP, strategy=strategy)
        assert result.version in (new_version, new_version + 1)
        digests.setdefault(new_version + 1, digests[new_version])
        versions = _check_versions(dest, digests, tmp_path)
        assert versions[-1] == result.version
        assert not [n for n in os.listdir(set_dir(dest, vault)) if n.startswith(TMP_PREFIX)]
        shutil.rmtree(dest)
    else:
        pytest.fail("the backup never completed")
    return step, pending_seen


@pytest.mark.parametrize("strategy", ["in-place", "copy"])
def test_incremental_backup_killed_at_every_step(tmp_path: Path, strategy: str) -> None:
    steps, pending = _scenario(tmp_path, strategy, backups_before=2)
    assert pending, "no kill point left an interrupted backup to roll back"
    print(f"{strategy}: killed at each of {steps - 1} steps")


def test_first_backup_killed_at_every_step(tmp_path: Path) -> None:
    steps, _ = _scenario(tmp_path, "in-place", backups_before=0)
    print(f"first backup: killed at each of {steps - 1} steps")


def test_the_kill_hook_works_through_the_command_and_verify_reads_through_the_undo(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with OpenVault.of(vault) as ov:
        ov.write("/a.bin", os.urandom(500_000))
        ov.commit()
    first = file_digest(vault.container)
    assert run_process("backup", vault.container, dest).returncode == 0
    _change(vault, 3)
    # Find (quickly, in a forked child) the first step at which the undo increment is in
    # place and current.kv is partly patched; then kill the real command there.
    for step in range(5, 100):
        probe = tmp_path / f"probe-{step}"
        shutil.copytree(dest, probe)
        assert _killed_backup(vault.container, probe, step, "auto") == TEST_DIE_EXIT
        state = load_state(*find_set(probe))
        found = state.pending is not None and file_digest(state.current_path) != first
        shutil.rmtree(probe)
        if found:
            break
    else:
        pytest.fail("no interrupted backup with a partly patched current.kv")
    trial = tmp_path / "trial"
    shutil.copytree(dest, trial)
    os.environ[TEST_DIE_ENV] = str(step)
    try:
        killed = run_process("backup", vault.container, trial)
    finally:
        del os.environ[TEST_DIE_ENV]
    assert killed.returncode == TEST_DIE_EXIT, killed.stderr
    state = load_state(*find_set(trial))
    assert state.pending is not None and file_digest(state.current_path) != first
    shown = run_process("verify", trial)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "interrupted backup" in shown.stdout
    listed = run_process("backup", "list", trial)
    assert "pending rollback" in listed.stdout
    restored = tmp_path / "restored.kv"
    assert run_process("restore", trial, restored).returncode == 0
    assert file_digest(restored) == first
    resumed = run_process("backup", vault.container, trial)
    assert resumed.returncode == 0, resumed.stderr
    assert "rolled back an interrupted backup" in resumed.stdout
    assert file_digest(set_dir(trial, vault) / "current.kv") == file_digest(vault.container)
