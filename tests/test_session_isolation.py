"""The suite runs in an environment of its own: a vault the person running the tests has
mounted (their own runtime, state and config directories) is out of the suite's reach."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cli_helpers import make_vault, run_process, run_process_in
from conftest import SESSION_ENV

pytestmark = pytest.mark.fuse


def _user_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in SESSION_ENV:
        path = root / name.lower().removeprefix("xdg_")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        env[name] = str(path)
    return env


def test_the_suite_points_home_and_xdg_dirs_into_its_own_session_directory() -> None:
    for name, value in SESSION_ENV.items():
        assert os.environ[name] == value
        assert value.startswith("/tmp/kvt-session-")


def test_lock_all_in_the_suite_leaves_a_vault_mounted_in_another_session_untouched(
    tmp_path: Path,
) -> None:
    user_root = Path(tempfile.mkdtemp(prefix="kvt-user-", dir="/tmp"))
    user_env = _user_env(user_root)
    (tmp_path / "user").mkdir()
    user_vault = make_vault(tmp_path / "user", name="user.kv")
    user_mnt = tmp_path / "user-mnt"
    user_mnt.mkdir()
    mounted = run_process_in(user_env, "mount", user_vault.container, user_mnt, *user_vault.pw())
    assert mounted.returncode == 0, mounted.stderr
    try:
        (user_mnt / "work.txt").write_text("the user's work in progress\n")
        (tmp_path / "suite").mkdir()
        test_vault = make_vault(tmp_path / "suite")
        test_mnt = tmp_path / "suite-mnt"
        test_mnt.mkdir()
        assert run_process("mount", test_vault.container, test_mnt, *test_vault.pw()).returncode == 0
        assert run_process("lock", "--all").returncode == 0
        assert not os.path.ismount(test_mnt)

        assert os.path.ismount(user_mnt)
        assert (user_mnt / "work.txt").read_text() == "the user's work in progress\n"
        status = run_process("status", "--json").stdout
        assert str(user_vault.container.resolve()) not in status
        user_audit = Path(user_env["XDG_STATE_HOME"]) / "kryptvault" / "audit.jsonl"
        assert test_vault.uuid not in user_audit.read_text()
    finally:
        locked = run_process_in(user_env, "lock", user_mnt)
        shutil.rmtree(user_root, ignore_errors=True)
    assert locked.returncode == 0, locked.stderr
    assert not os.path.ismount(user_mnt)
