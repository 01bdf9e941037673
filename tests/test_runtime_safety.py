"""The local attack surface of a session: the runtime directory's fallback, who serves a
control socket, the daemon's log, and why a daemon could not start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process, run_process_in

from kryptvault.cli.secrets_input import read_from_file
from kryptvault.container.vault import StoreKeys, store_keys
from kryptvault.errors import KryptvaultError
from kryptvault.session.control import ControlClient, ForeignServerError, socket_path_for
from kryptvault.session.handoff import SessionSettings
from kryptvault.session.launcher import daemon_log_path, start_daemon
from kryptvault.session.paths import state_dir
from kryptvault.session.unlock import unlock_container

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")
NOBODY = 65534
VAULT = "0badc0de-4a5b-4c6d-8e7f-0123456789ab"

# Binds as root (so the socket may sit in a root-only directory), then becomes uid 65534
# before listen(): the kernel reports the listener's credentials to every client.
FOREIGN_SERVER = textwrap.dedent(
    """
    import json, os, socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sys.argv[1])
    os.setgid(65534)
    os.setuid(65534)
    sock.listen(8)
    print("ready", flush=True)
    sock.settimeout(float(sys.argv[2]))
    heard = 0
    try:
        while True:
            conn, _ = sock.accept()
            conn.settimeout(2)
            try:
                heard += len(conn.recv(4096))
                reply = {"ok": True, "vault": sys.argv[3], "mountpoint": "/fake", "container": "/fake.kv",
                         "pid": 1, "locking": False}
                conn.sendall(json.dumps(reply).encode() + b"\\n")
            except OSError:
                pass
            conn.close()
    except TimeoutError:
        pass
    print("heard", heard, flush=True)
    """
)


def _foreign_server(path: Path, seconds: float, vault: str = VAULT) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_SERVER, str(path), str(seconds), vault],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def _heard(server: subprocess.Popen[str]) -> int:
    out, _ = server.communicate(timeout=30)
    return int(out.split()[-1])


# ---------------------------------------------------------------------- peer credentials


@ROOT
def test_client_refuses_a_control_socket_served_by_another_uid_before_sending(short_tmp: Path) -> None:
    path = short_tmp / f"{VAULT}.sock"
    server = _foreign_server(path, 2.0)
    with pytest.raises(ForeignServerError, match=f"served by uid {NOBODY}, not by you"):
        ControlClient(path, timeout=5).request("lock", reason="command")
    assert _heard(server) == 0  # the request never left the client


@ROOT
def test_status_and_lock_ignore_a_foreign_server_in_the_runtime_dir() -> None:
    path = socket_path_for(VAULT)
    server = _foreign_server(path, 4.0)
    try:
        status = run_process("status", "--json")
        assert status.returncode == 0
        assert not [s for s in json.loads(status.stdout) if s.get("vault") == VAULT]
        assert f"served by uid {NOBODY}" in status.stderr
        locked = run_process("lock", "--vault", VAULT)
        assert locked.returncode == 1
        assert "no mounted vault" in locked.stderr
        assert _heard(server) == 0
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- runtime dir fallback


def _without_xdg_runtime(tmpdir: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmpdir)
    env["HOME"] = str(home)
    return env


@pytest.fixture
def shared_tmp(short_tmp: Path) -> Path:
    """A stand-in for /tmp: world-writable and sticky."""
    tmpdir = short_tmp / "t"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    (short_tmp / "h").mkdir(mode=0o700)
    return tmpdir


@ROOT
def test_fallback_runtime_dir_owned_by_another_user_is_not_used(shared_tmp: Path) -> None:
    squatted = shared_tmp / f"kryptvault-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, NOBODY, NOBODY)
    home = shared_tmp.parent / "h"
    result = run_process_in(_without_xdg_runtime(shared_tmp, home), "status")
    assert result.returncode == 0, result.stderr
    assert list(squatted.iterdir()) == []
    used = home / ".cache" / "kryptvault-run" / "kryptvault"
    assert stat.S_IMODE(used.stat().st_mode) == 0o700 and used.stat().st_uid == os.getuid()


@ROOT
def test_fallback_runtime_dir_that_is_a_symlink_is_not_followed(shared_tmp: Path) -> None:
    elsewhere = shared_tmp / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shared_tmp / f"kryptvault-{os.getuid()}").symlink_to(elsewhere)
    home = shared_tmp.parent / "h"
    result = run_process_in(_without_xdg_runtime(shared_tmp, home), "status")
    assert result.returncode == 0, result.stderr
    assert list(elsewhere.iterdir()) == []
    assert (home / ".cache" / "kryptvault-run" / "kryptvault").is_dir()


def test_fallback_runtime_dir_of_ours_with_a_loose_mode_is_made_private(shared_tmp: Path) -> None:
    ours = shared_tmp / f"kryptvault-{os.getuid()}"
    ours.mkdir()
    ours.chmod(0o777)
    result = run_process_in(_without_xdg_runtime(shared_tmp, shared_tmp.parent / "h"), "status")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700
    assert stat.S_IMODE((ours / "kryptvault").stat().st_mode) == 0o700


@ROOT
@pytest.mark.fuse
def test_mount_and_lock_work_with_a_squatted_fallback_runtime_dir(shared_tmp: Path, tmp_path: Path) -> None:
    squatted = shared_tmp / f"kryptvault-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, NOBODY, NOBODY)
    env = _without_xdg_runtime(shared_tmp, shared_tmp.parent / "h")
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = run_process_in(env, "mount", vault.container, mnt, *vault.pw())
    assert mounted.returncode == 0, mounted.stderr
    try:
        status = json.loads(run_process_in(env, "status", "--json").stdout)
        assert [s["mountpoint"] for s in status] == [str(mnt)]
        assert list(squatted.iterdir()) == []
    finally:
        locked = run_process_in(env, "lock", mnt)
    assert locked.returncode == 0, locked.stderr
    assert not os.path.ismount(mnt)


# ---------------------------------------------------------------------- daemon log


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultFixture]:
    fixture = make_vault(tmp_path)
    (tmp_path / "mnt").mkdir()
    yield fixture
    for mnt in tmp_path.iterdir():
        if mnt.name.startswith("mnt") and os.path.ismount(mnt):
            run_process("lock", mnt)


@pytest.mark.fuse
def test_daemon_log_is_private_and_never_names_a_file(vault: VaultFixture) -> None:
    log = daemon_log_path(vault.uuid)
    log.write_text("")
    log.chmod(0o644)  # as an older version left it
    state_dir().chmod(0o755)
    mnt = vault.dir / "mnt"
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir().stat().st_mode) == 0o700
    (mnt / "secret-name.txt").write_text("data")
    assert run_process("lock", mnt).returncode == 0
    kept = log.read_text()
    assert "locked (command" in kept
    assert "secret-name" not in kept


@pytest.mark.fuse
def test_daemon_log_keeps_a_warning_after_the_lock(vault: VaultFixture, short_tmp: Path) -> None:
    config = short_tmp / "config"
    (config / "kryptvault").mkdir(parents=True)
    (config / "kryptvault" / "config.toml").write_text("[backup\nbroken")
    env = dict(os.environ, XDG_CONFIG_HOME=str(config))
    mnt = vault.dir / "mnt"
    assert run_process_in(env, "mount", vault.container, mnt, *vault.pw()).returncode == 0
    assert run_process_in(env, "lock", mnt).returncode == 0
    kept = daemon_log_path(vault.uuid).read_text()
    assert "automatic backups are off" in kept
    assert "locked (command" in kept


# ---------------------------------------------------------------------- why a daemon did not start


@pytest.mark.fuse
def test_mounting_a_copy_of_a_mounted_vault_writable_names_the_mount_that_writes_it(
    vault: VaultFixture,
) -> None:
    assert run_process("mount", vault.container, vault.dir / "mnt", *vault.pw()).returncode == 0
    copy = vault.dir / "copy.kv"
    shutil.copyfile(vault.container, copy)
    (vault.dir / "mnt2").mkdir()
    second = run_process("mount", copy, vault.dir / "mnt2", *vault.pw())
    assert second.returncode == 1
    assert_clean_error(second.stderr)
    # A plain copy is the same lineage: a second writer of one history (docs/BACKUP.md §9).
    assert f"vault {vault.uuid} (original lineage) is already mounted writable on {vault.dir / 'mnt'}" in (
        second.stderr
    )
    assert not os.path.ismount(vault.dir / "mnt2")


def _settings_and_keys(vault: VaultFixture, container: Path, mnt: Path) -> tuple[SessionSettings, StoreKeys]:
    unlocked = unlock_container(
        container,
        token_spec=str(vault.token),
        ask_password=lambda: read_from_file(vault.password_file, "password"),
    )
    with unlocked:
        keys = store_keys(unlocked.master, unlocked.header.vault_uuid)
        settings = SessionSettings(
            container=str(container),
            mountpoint=str(mnt),
            vault_uuid=vault.uuid,
            block_size=unlocked.header.layout.block_size,
        )
    return settings, keys


@pytest.mark.fuse
def test_a_daemon_that_cannot_serve_reports_why_instead_of_exiting_early(
    vault: VaultFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_process("mount", vault.container, vault.dir / "mnt", *vault.pw()).returncode == 0
    copy = vault.dir / "copy.kv"
    shutil.copyfile(vault.container, copy)
    mnt2 = vault.dir / "mnt2"
    mnt2.mkdir()
    settings, keys = _settings_and_keys(vault, copy, mnt2)
    try:
        with pytest.raises(KryptvaultError) as raised:
            start_daemon(settings, keys.data, keys.meta)
    finally:
        keys.wipe()
    assert "exited early" not in str(raised.value)
    assert f"is already mounted writable on {vault.dir / 'mnt'}" in str(raised.value)
    assert not os.path.ismount(mnt2)


@pytest.mark.fuse
def test_a_control_socket_path_too_long_is_named_as_the_reason(vault: VaultFixture) -> None:
    deep = vault.dir / ("r" * 90)
    deep.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(deep))
    result = run_process_in(env, "mount", vault.container, vault.dir / "mnt", *vault.pw())
    assert result.returncode == 1
    assert_clean_error(result.stderr)
    assert "the control socket path is too long" in result.stderr and "XDG_RUNTIME_DIR" in result.stderr
    assert not os.path.ismount(vault.dir / "mnt")


def _kill_new_daemon(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the daemon this process starts as soon as it exists: a crash at start-up."""
    children = Path(f"/proc/{os.getpid()}/task/{threading.main_thread().native_id}/children")
    while not stop.is_set():
        for pid in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"kryptvault.session.daemon" in cmdline:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.001)


@pytest.mark.fuse
def test_a_daemon_that_dies_without_a_word_is_reported_with_its_log_path(vault: VaultFixture) -> None:
    mnt = vault.dir / "mnt"
    settings, keys = _settings_and_keys(vault, vault.container, mnt)
    daemon_log_path(vault.uuid).write_text("an earlier line\nthe last words\n")
    stop = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=_kill_new_daemon, args=(stop, killed))
    killer.start()
    try:
        with pytest.raises(KryptvaultError) as raised:
            start_daemon(settings, keys.data, keys.meta)
    finally:
        stop.set()
        killer.join()
        keys.wipe()
    assert killed, "the daemon was never seen"
    assert str(raised.value) == (
        f"the mount daemon exited early (status -9): the last words; its log: {daemon_log_path(vault.uuid)}"
    )
    assert not os.path.ismount(mnt)
