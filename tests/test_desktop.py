"""The desktop links over real D-Bus daemons with fake peers: a private session bus and a
second bus playing the system bus, a fake logind (sleep inhibitors as real pipe fds,
PrepareForSleep, the session's Lock) and a fake notification server, all written here
with jeepney. The vault is a real one, mounted through the CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import KRYPTVAULT, VaultFixture, assert_clean_error, make_vault, run_process
from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    MessageFlag,
    MessageType,
    new_error,
    new_method_call,
    new_method_return,
    new_signal,
)
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from loopdisk import ext4_loop_disk, hand_pages_to_daemon, run_quiet
from needs import require_tool

from kryptvault.session.paths import state_dir

MIB = 1024 * 1024

pytestmark = pytest.mark.fuse

LOGIN1_PATH = "/org/freedesktop/login1"
SESSION_PATH = "/org/freedesktop/login1/session/_3fake"
USER_PATH = "/org/freedesktop/login1/user/_0"


@dataclass
class Buses:
    session: str
    system: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.session, DBUS_SYSTEM_BUS_ADDRESS=self.system)

    def session_only_env(self) -> dict[str, str]:
        """A session bus and no system bus (no logind): notifications only."""
        return dict(self.env(), DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent/system_bus_socket")


def _start_bus(directory: Path, name: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1",
         f"--address=unix:path={directory}/{name}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address.startswith("unix:"), address
    return proc, address


@pytest.fixture
def buses() -> Iterator[Buses]:
    require_tool("dbus-daemon", "dbus-daemon")
    # Short: a unix socket path must fit 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="kvbus-", dir="/tmp"))
    session_proc, session = _start_bus(directory, "session")
    system_proc, system = _start_bus(directory, "system")
    yield Buses(session, system, [session_proc, system_proc])
    for proc in (session_proc, system_proc):
        proc.terminate()
        proc.wait(timeout=10)
    shutil.rmtree(directory, ignore_errors=True)


class FakeService:
    """Owns `name` on the bus at `address` and answers method calls in a thread."""

    def __init__(self, address: str, name: str | None, enable_fds: bool = False) -> None:
        self.conn: DBusConnection = open_dbus_connection(address, enable_fds=enable_fds)
        if name is not None:
            reply = self.conn.send_and_get_reply(new_method_call(message_bus, "RequestName", "su", (name, 4)))
            assert reply.body[0] == 1, reply.body  # primary owner
        self._send_lock = threading.Lock()
        self.calls: list[tuple[float, str, tuple[object, ...]]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                msg = self.conn.receive()
            except (OSError, ValueError):
                return
            if msg.header.message_type != MessageType.method_call:
                continue
            self.calls.append((time.monotonic(), str(msg.header.fields.get(3)), tuple(msg.body)))
            reply = self.handle(msg)
            if reply is not None and not msg.header.flags & MessageFlag.no_reply_expected:
                self.send(reply)

    def handle(self, msg: Message) -> Message | None:
        """The reply to send, or None when the handler sent it itself."""
        return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod")

    def send(self, msg: Message) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


@dataclass
class Inhibitor:
    args: tuple[object, ...]
    closed_at: float | None = None
    audit_when_closed: str = ""


class FakeLogind(FakeService):
    def __init__(self, address: str) -> None:
        self.inhibitors: list[Inhibitor] = []
        self.state = "active"  # the session's State, as Properties.Get answers it
        self.daemon_in_session = True  # False: GetSessionByPID fails (a systemd user service)
        super().__init__(address, "org.freedesktop.login1", enable_fds=True)

    def handle(self, msg: Message) -> Message | None:
        member = msg.header.fields.get(3)
        if member == "Inhibit":
            read_end, write_end = os.pipe()
            inhibitor = Inhibitor(tuple(msg.body))
            self.inhibitors.append(inhibitor)
            threading.Thread(target=self._watch, args=(read_end, inhibitor), daemon=True).start()
            self.send(new_method_return(msg, "h", (write_end,)))
            os.close(write_end)  # the daemon's copy is now the only one: its close is EOF here
            return None
        if member == "GetSessionByPID":
            if not self.daemon_in_session:
                return new_error(msg, "org.freedesktop.login1.NoSessionForPID")
            return new_method_return(msg, "o", (SESSION_PATH,))
        if member == "GetUser":
            return new_method_return(msg, "o", (USER_PATH,))
        if member == "Get" and msg.body == ("org.freedesktop.login1.User", "Display"):
            return new_method_return(msg, "v", (("(so)", ("_3fake", SESSION_PATH)),))
        if member == "Get" and msg.body == ("org.freedesktop.login1.Session", "State"):
            return new_method_return(msg, "v", (("s", self.state),))
        return super().handle(msg)

    @staticmethod
    def _watch(read_end: int, inhibitor: Inhibitor) -> None:
        while os.read(read_end, 64):
            pass
        # Released: what had the daemon written to the audit log by now? closed_at is set
        # last: a waiter that sees it must also see the audit text (a slow guest read the
        # text as "" when closed_at came first).
        closed_at = time.monotonic()
        inhibitor.audit_when_closed = _audit_text()
        inhibitor.closed_at = closed_at
        os.close(read_end)

    def prepare_for_sleep(self, start: bool) -> float:
        self.send(new_signal(DBusAddress(LOGIN1_PATH, interface="org.freedesktop.login1.Manager"),
                             "PrepareForSleep", "b", (start,)))
        return time.monotonic()

    def session_lock(self) -> float:
        self.send(new_signal(DBusAddress(SESSION_PATH, interface="org.freedesktop.login1.Session"), "Lock"))
        return time.monotonic()


class FakeNotifications(FakeService):
    def __init__(self, address: str) -> None:
        super().__init__(address, "org.freedesktop.Notifications")

    def handle(self, msg: Message) -> Message | None:
        if msg.header.fields.get(3) == "Notify":
            return new_method_return(msg, "u", (len(self.calls),))
        return super().handle(msg)

    def notes(self) -> list[tuple[str, str]]:
        return [(str(args[3]), str(args[4])) for _, member, args in self.calls if member == "Notify"]


def _audit_text() -> str:
    try:
        return (state_dir() / "audit.jsonl").read_text()
    except FileNotFoundError:
        return ""


def _lock_entries(text: str, vault: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [e for e in entries if e.get("event") == "lock" and e.get("vault") == vault]


def _wait(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _daemon_gone(mnt: Path, timeout: float = 20.0) -> None:
    _wait(lambda: not os.path.ismount(mnt) and not json.loads(run_process("status", "--json").stdout),
          timeout, "the daemon to end")


def _daemon_pid(vault: VaultFixture) -> int:
    (entry,) = [e for e in json.loads(run_process("status", "--json").stdout) if e["vault"] == vault.uuid]
    return int(entry["pid"])


def _forge_prepare_for_sleep(system: str, pid: int) -> None:
    """A PrepareForSleep(true) from a client that is not logind, addressed to the
    connection of process `pid` (found on the bus by its pid)."""
    with open_dbus_connection(system) as conn:
        names = conn.send_and_get_reply(new_method_call(message_bus, "ListNames")).body[0]
        target = None
        for name in names:
            if name.startswith(":") and name != conn.unique_name:
                reply = conn.send_and_get_reply(
                    new_method_call(message_bus, "GetConnectionUnixProcessID", "s", (name,)))
                if reply.body and reply.body[0] == pid:
                    target = name
        assert target is not None, "the daemon is not on the system bus"
        forged = new_signal(DBusAddress(LOGIN1_PATH, interface="org.freedesktop.login1.Manager"),
                            "PrepareForSleep", "b", (True,))
        forged.header.fields[HeaderFields.destination] = target
        conn.send(forged)


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultFixture]:
    fixture = make_vault(tmp_path)
    (tmp_path / "mnt").mkdir()
    yield fixture
    if os.path.ismount(tmp_path / "mnt"):
        run_process("lock", tmp_path / "mnt")


def test_prepare_for_sleep_locks_at_once_and_the_inhibitor_is_released_only_after_the_commit(
    vault: VaultFixture, buses: Buses
) -> None:
    logind = FakeLogind(buses.system)
    notifications = FakeNotifications(buses.session)
    mnt = vault.dir / "mnt"
    try:
        mounted = run_process("mount", vault.container, mnt, *vault.pw(), env=buses.env())
        assert mounted.returncode == 0, mounted.stderr
        _wait(lambda: logind.inhibitors, 5.0, "the sleep inhibitor")
        (inhibitor,) = logind.inhibitors
        assert inhibitor.args[0] == "sleep" and inhibitor.args[3] == "delay"
        # Another user on the system bus sends a PrepareForSleep(true) of its own straight
        # to the daemon: not logind's, so no lock.
        _forge_prepare_for_sleep(buses.system, _daemon_pid(vault))
        time.sleep(0.3)
        assert os.path.ismount(mnt) and inhibitor.closed_at is None
        # Accepted but not committed yet (the commit delay is seconds): the lock saves it.
        (mnt / "notes.txt").write_bytes(b"written just before the lid closed\n" * 1000)
        emitted = logind.prepare_for_sleep(True)
        _wait(lambda: inhibitor.closed_at is not None, 5.0, "the inhibitor's release")
        assert inhibitor.closed_at is not None
        released_ms = (inhibitor.closed_at - emitted) * 1000
        print(f"PrepareForSleep(true) -> inhibitor released: {released_ms:.0f} ms")
        assert released_ms < 500
        # When the fd closed, the lock's entry (written after its commit) was already there.
        (entry,) = _lock_entries(inhibitor.audit_when_closed, vault.uuid)
        assert entry["reason"] == "suspend" and entry["route"] == "logind"
        assert entry["error"] is None and isinstance(entry["generation"], int)
        _daemon_gone(mnt)
        _wait(lambda: len(notifications.notes()) >= 2, 5.0, "the notifications")
        notes = notifications.notes()
        assert [summary for summary, _ in notes] == ["Vault mounted", "Vault locked"]
        hints = [args[6] for _, member, args in notifications.calls if member == "Notify"]
        assert all(h["desktop-entry"] == ("s", "kryptvault") for h in hints)  # type: ignore[index]
        short = vault.uuid.replace("-", "")[:8]
        assert notes[0][1] == f"Vault {short} is open."
        assert notes[1][1] == f"Vault {short} locked (the computer is going to sleep)."
        assert not any(str(vault.dir) in text or "vault.kv" in text for note in notes for text in note)
    finally:
        logind.close()
        notifications.close()
    # Remounted without any bus: the data written before the sleep was committed by the lock.
    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    assert (mnt / "notes.txt").read_bytes() == b"written just before the lid closed\n" * 1000
    assert run_process("lock", mnt).returncode == 0


def test_settings_from_setup_mount_without_a_mountpoint_and_choose_screen_lock_over_suspend(
    vault: VaultFixture, buses: Buses
) -> None:
    mnt = vault.dir / "mnt"
    setup = run_process("setup", vault.container, "--mountpoint", mnt, "--no-lock-on-suspend",
                        "--lock-on-screen-lock")
    assert setup.returncode == 0, setup.stderr
    logind = FakeLogind(buses.system)
    # As after a mount on plug: the daemon runs under the user's systemd, in no session;
    # it follows the user's graphical session.
    logind.daemon_in_session = False
    notifications = FakeNotifications(buses.session)
    screensaver = FakeService(buses.session, None)
    try:
        mounted = run_process("mount", vault.container, *vault.pw(), env=buses.env())
        assert mounted.returncode == 0, mounted.stderr
        assert os.path.ismount(mnt)
        _wait(lambda: any(a == ("org.freedesktop.login1.User", "Display") for _, _, a in logind.calls),
              5.0, "the session look-up")
        _wait(lambda: notifications.notes(), 5.0, "the mounted notification")
        # Not configured: no inhibitor, and sleeping does not lock.
        logind.prepare_for_sleep(True)
        screensaver.send(new_signal(DBusAddress("/org/freedesktop/ScreenSaver",
                                                interface="org.freedesktop.ScreenSaver"),
                                    "ActiveChanged", "b", (False,)))
        time.sleep(0.5)
        assert os.path.ismount(mnt)
        assert logind.inhibitors == []
        emitted = logind.session_lock()
        _wait(lambda: _lock_entries(_audit_text(), vault.uuid), 5.0, "the lock entry")
        print(f"session Lock -> lock entry: {(time.monotonic() - emitted) * 1000:.0f} ms")
        (entry,) = _lock_entries(_audit_text(), vault.uuid)
        assert entry["reason"] == "screen-lock" and entry["route"] == "logind"
        _daemon_gone(mnt)
        _wait(lambda: len(notifications.notes()) >= 2, 5.0, "the locked notification")
        assert notifications.notes()[1][1].endswith("locked (the screen was locked).")
    finally:
        logind.close()
        notifications.close()
        screensaver.close()


def test_screensaver_active_locks_when_configured(vault: VaultFixture, buses: Buses) -> None:
    mnt = vault.dir / "mnt"
    assert run_process("setup", vault.container, "--mountpoint", mnt, "--lock-on-screen-lock").returncode == 0
    notifications = FakeNotifications(buses.session)
    screensaver = FakeService(buses.session, None)
    try:
        mounted = run_process("mount", vault.container, *vault.pw(), env=buses.env())
        assert mounted.returncode == 0, mounted.stderr
        _wait(lambda: notifications.notes(), 5.0, "the mounted notification")
        time.sleep(0.2)  # the match rule follows the first notification
        screensaver.send(new_signal(DBusAddress("/org/freedesktop/ScreenSaver",
                                                interface="org.freedesktop.ScreenSaver"),
                                    "ActiveChanged", "b", (True,)))
        _daemon_gone(mnt)
        (entry,) = _lock_entries(_audit_text(), vault.uuid)
        assert entry["reason"] == "screen-lock" and entry["route"] == "screensaver"
    finally:
        notifications.close()
        screensaver.close()


def test_a_lock_by_command_is_notified_and_no_bus_at_all_changes_nothing(
    vault: VaultFixture, buses: Buses
) -> None:
    notifications = FakeNotifications(buses.session)
    mnt = vault.dir / "mnt"
    try:
        env = buses.session_only_env()
        assert run_process("mount", vault.container, mnt, *vault.pw(), env=env).returncode == 0
        _wait(lambda: notifications.notes(), 5.0, "the mounted notification")
        assert run_process("lock", mnt).returncode == 0
        _wait(lambda: len(notifications.notes()) >= 2, 5.0, "the locked notification")
        assert notifications.notes()[1][1].endswith("locked (locked by command).")
    finally:
        notifications.close()
    # The suite's own environment has no bus at all: mount and lock as ever, silently.
    mounted = run_process("mount", vault.container, mnt, *vault.pw())
    assert mounted.returncode == 0 and "bus" not in mounted.stderr.lower()
    assert run_process("lock", mnt).returncode == 0


def test_setup_dry_run_writes_nothing_and_setup_keeps_the_rest_of_the_config(
    vault: VaultFixture, tmp_path: Path
) -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kryptvault" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('# mine\n[backup]\ndestinations = ["/media/disk"]\nkeep = 3\n')
    before = config.read_text()
    units = tmp_path / "units"
    rules = tmp_path / "rules"
    dry = run_process("setup", vault.container, "--mountpoint", tmp_path / "here", "--units-dir", units,
                      "--rules-dir", rules, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f'[vaults."{vault.uuid}"]' in dry.stdout and "lock_on_suspend = true" in dry.stdout
    assert "would install the systemd user units" in dry.stdout and str(units) in dry.stdout
    assert "applications/kryptvault.desktop" in dry.stdout
    # As root (the suite is): every command it would run, the rules file it would write.
    assert "would run: systemctl --user daemon-reload" in dry.stdout
    assert f"would write {rules / '70-kryptvault.rules'}\nwould run: udevadm control --reload" in dry.stdout
    assert config.read_text() == before and not (tmp_path / "here").exists() and not units.exists()
    assert not rules.exists()
    try:
        done = run_process("setup", vault.container, "--mountpoint", tmp_path / "here", "--units-dir", units,
                           "--rules-dir", rules)
        assert done.returncode == 0, done.stderr
        # The suite's XDG_RUNTIME_DIR has no user manager (nor does this host): one line, no error.
        assert "it reads the units when it starts" in done.stdout
        assert f"# vault {vault.uuid}" in (rules / "70-kryptvault.rules").read_text()
        assert sorted(p.name for p in units.iterdir()) == [
            "kryptvault-guard@.service", "kryptvault-lock@.service", "kryptvault-plug@.service",
        ]
        plug_unit = (units / "kryptvault-plug@.service").read_text()
        assert f"ExecStart={Path(sys.executable).parent / 'kryptvault'} plug %i" in plug_unit
        data = Path(os.environ["XDG_DATA_HOME"])
        entry = (data / "applications" / "kryptvault.desktop").read_text()
        assert "Icon=kryptvault" in entry and "NoDisplay=true" in entry
        icon = data / "icons" / "hicolor" / "scalable" / "apps" / "kryptvault.svg"
        assert icon.read_text().startswith("<svg")
        assert run_process("setup", vault.container, "--idle-minutes", "15").returncode == 0
        text = config.read_text()
        assert text.startswith(before.rstrip("\n"))
        data = tomllib.loads(text)
        assert data["backup"] == {"destinations": ["/media/disk"], "keep": 3}
        assert data["vaults"] == {vault.uuid: {
            "container": str(vault.container.resolve()), "mountpoint": str(tmp_path / "here"),
            "mount_on_plug": True, "lock_on_suspend": True, "lock_on_screen_lock": False,
            "lock_on_logout": True, "idle_minutes": 15,
        }}
        assert (tmp_path / "here").is_dir()
    finally:
        config.unlink()


def test_a_bad_vault_table_is_one_clean_line_without_a_mountpoint_and_a_warning_with_one(
    vault: VaultFixture,
) -> None:
    missing = run_process("mount", vault.container, *vault.pw())
    assert missing.returncode == 2 and "missing MOUNTPOINT" in missing.stderr
    assert_clean_error(missing.stderr)
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kryptvault" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[vaults."not-a-uuid"]\nmountpoint = "/x"\n')
    mnt = vault.dir / "mnt"
    try:
        bad = run_process("mount", vault.container, *vault.pw())
        assert bad.returncode == 2
        assert_clean_error(bad.stderr)
        assert "is not a vault UUID" in bad.stderr
        given = run_process("mount", vault.container, mnt, *vault.pw())
        assert given.returncode == 0, given.stderr
        assert "warning: " in given.stderr and "is not a vault UUID" in given.stderr
        assert "Traceback" not in given.stderr
    finally:
        config.unlink()
        if os.path.ismount(mnt):
            run_process("lock", mnt)


def _generation(vault: VaultFixture) -> object:
    (entry,) = [e for e in json.loads(run_process("status", "--json").stdout) if e["vault"] == vault.uuid]
    return entry["generation"]


def _fill(path: Path) -> None:
    """Another process takes every free block of the host filesystem."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (4 * MIB, 64 * 1024, 4096):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_failed_commit_is_notified_as_read_only_and_the_lock_says_changes_were_lost(
    tmp_path: Path, buses: Buses
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ext4_loop_disk(tmp_path, 64) as disk:
        vault = make_vault(tmp_path)
        container = disk / "vault.kv"
        shutil.move(vault.container, container)
        notifications = FakeNotifications(buses.session)
        try:
            mounted = run_process("mount", container, mnt, *vault.pw(), env=buses.env())
            assert mounted.returncode == 0, mounted.stderr
            _wait(lambda: notifications.notes(), 5.0, "the mounted notification")
            for _attempt in range(3):
                generation = _generation(vault)
                # Kept open while the host fills: the daemon holds the data uncommitted.
                fd = os.open(mnt / "unsaved.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                for _ in range(96):
                    os.write(fd, os.urandom(64 * 1024))
                hand_pages_to_daemon(fd)
                _fill(disk / "filler")
                if _generation(vault) == generation:
                    break
                os.close(fd)
                (disk / "filler").unlink()  # the commit timer was first: again
            try:
                with pytest.raises(OSError):
                    os.fsync(fd)
            finally:
                os.close(fd)
            _wait(lambda: len(notifications.notes()) >= 2, 5.0, "the read-only notification")
            short = vault.uuid.replace("-", "")[:8]
            assert notifications.notes()[1] == (
                "Vault read-only",
                f"Vault {short} cannot save changes: a commit failed. `kryptvault status` says why.",
            )
            assert run_process("lock", mnt).returncode == 1
            _wait(lambda: len(notifications.notes()) >= 3, 10.0, "the locked notification")
            summary, body = notifications.notes()[2]
            assert summary == "Vault locked" and "could not be saved" in body
            assert [s for s, _ in notifications.notes()].count("Vault read-only") == 1
        finally:
            notifications.close()
            if os.path.ismount(mnt):
                run_process("lock", mnt)
            run_quiet("umount", "-l", mnt)


def test_the_session_closing_locks_with_logout_on_and_not_with_it_off(
    vault: VaultFixture, buses: Buses
) -> None:
    mnt = vault.dir / "mnt"
    logind = FakeLogind(buses.system)
    try:
        setup = run_process("setup", vault.container, "--mountpoint", mnt, "--no-lock-on-logout")
        assert setup.returncode == 0, setup.stderr
        assert run_process("mount", vault.container, *vault.pw(), env=buses.env()).returncode == 0
        _wait(lambda: logind.inhibitors, 5.0, "the sleep inhibitor")
        logind.state = "closing"
        time.sleep(2.5)  # more than one poll of the session's State
        assert os.path.ismount(mnt)
        assert not any(m == "Get" for _, m, _ in logind.calls)
        assert run_process("lock", mnt).returncode == 0
        _daemon_gone(mnt)

        logind.state = "active"
        assert run_process("setup", vault.container, "--lock-on-logout").returncode == 0
        assert run_process("mount", vault.container, *vault.pw(), env=buses.env()).returncode == 0
        _wait(lambda: any(m == "Get" for _, m, _ in logind.calls), 5.0, "a look at the session's State")
        assert os.path.ismount(mnt)
        closing = time.monotonic()
        logind.state = "closing"
        _daemon_gone(mnt)
        print(f"session closing -> locked: {(time.monotonic() - closing) * 1000:.0f} ms (polled every 2 s)")
        entries = _lock_entries(_audit_text(), vault.uuid)
        assert [(e["reason"], e["route"]) for e in entries][-1] == ("logout", "logind")
    finally:
        logind.close()


FAKE_PINENTRY = """#!{python}
# A fake pinentry: the Assuan commands it is sent go to {log}; the answer to GETPIN is the
# next line of {answers} ("pin:<password>" or "cancel").
import os, sys
calls = {count!r}
n = int(open(calls).read()) if os.path.exists(calls) else 0
open(calls, "w").write(str(n + 1))
answers = open({answers!r}).read().splitlines()
answer = answers[min(n, len(answers) - 1)]
def say(text):
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()
say("OK Pleased to meet you")
with open({log!r}, "a") as log:
    for line in sys.stdin:
        line = line.rstrip("\\n")
        log.write(f"{{n}} {{line}}\\n")
        log.flush()
        command = line.split(" ", 1)[0]
        if command == "GETPIN":
            if answer == "cancel":
                say("ERR 83886179 Operation cancelled <Pinentry>")
            else:
                say("D " + answer[4:].replace("%", "%25"))
                say("OK")
        elif command == "BYE":
            say("OK closing connection")
            break
        else:
            say("OK")
"""


@dataclass
class Pinentry:
    program: Path
    log: Path
    count: Path

    def calls(self) -> int:
        return int(self.count.read_text()) if self.count.exists() else 0


def _pinentry(tmp_path: Path, *answers: str) -> Pinentry:
    answers_file = tmp_path / "answers"
    answers_file.write_text("\n".join(answers) + "\n")
    fake = Pinentry(tmp_path / "fake-pinentry", tmp_path / "pinentry.log", tmp_path / "pinentry.count")
    fake.program.write_text(FAKE_PINENTRY.format(
        python=sys.executable, log=str(fake.log), answers=str(answers_file), count=str(fake.count)))
    fake.program.chmod(0o755)
    return fake


def test_plug_asks_with_pinentry_retries_a_wrong_password_and_mounts_at_the_configured_place(
    vault: VaultFixture, tmp_path: Path
) -> None:
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", vault.container, "--mountpoint", home_mnt).returncode == 0
    password = vault.password_file.read_text().strip()
    fake = _pinentry(tmp_path, "pin:not the password at all", f"pin:{password}")
    hex_id = vault.uuid.replace("-", "")  # as the unit's %i has it
    plugged = run_process("plug", hex_id, "--token", vault.token, "--pinentry", fake.program)
    try:
        assert plugged.returncode == 0, plugged.stderr
        assert os.path.ismount(home_mnt)
        assert fake.calls() == 2
        log = fake.log.read_text()
        assert "0 GETPIN" in log and "1 SETERROR Wrong password, or the wrong token." in log
        assert "0 SETERROR" not in log
        assert "SETDESC Password of vault " + vault.uuid.replace("-", "")[:8] in log
        again = run_process("plug", vault.uuid, "--token", vault.token, "--pinentry", fake.program)
        assert again.returncode == 0 and "already mounted" in again.stdout
        assert fake.calls() == 2  # mounted: nothing asked
    finally:
        run_process("lock", home_mnt)


def test_plug_cancelled_stays_locked_and_asks_once_and_mount_on_plug_off_asks_nothing(
    vault: VaultFixture, tmp_path: Path
) -> None:
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", vault.container, "--mountpoint", home_mnt).returncode == 0
    fake = _pinentry(tmp_path, "cancel")
    plugged = run_process("plug", vault.uuid, "--token", vault.token, "--pinentry", fake.program)
    assert plugged.returncode == 0, plugged.stderr
    assert "cancelled: the vault stays locked" in plugged.stdout
    assert fake.calls() == 1 and not os.path.ismount(home_mnt)
    assert run_process("setup", vault.container, "--no-mount-on-plug").returncode == 0
    off = run_process("plug", vault.uuid, "--token", vault.token, "--pinentry", fake.program)
    assert off.returncode == 0 and "mount on plug is off" in off.stdout
    assert fake.calls() == 1 and not os.path.ismount(home_mnt)
    nothing = tmp_path / "no-such-program"
    missing = run_process("plug", vault.uuid, "--token", vault.token, "--pinentry", nothing)
    assert missing.returncode == 0  # off: not even looked for
    assert run_process("setup", vault.container, "--mount-on-plug").returncode == 0
    missing = run_process("plug", vault.uuid, "--token", vault.token, "--pinentry", nothing,
                          "--fallback", nothing)
    assert missing.returncode == 1
    assert_clean_error(missing.stderr)
    assert "cannot ask for the password" in missing.stderr


def test_plug_waits_for_the_token_to_become_usable_before_it_asks(
    vault: VaultFixture, tmp_path: Path
) -> None:
    """The udev rule starts `plug` when the stick's disk appears; the automounter mounts
    its filesystem a moment later. Here the token directory appears 1.5 s after `plug`
    starts: one prompt, after it, and the vault mounts."""
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", vault.container, "--mountpoint", home_mnt).returncode == 0
    password = vault.password_file.read_text().strip()
    fake = _pinentry(tmp_path, f"pin:{password}")
    token = Path(vault.token)
    away = token.with_name(token.name + ".not-yet")
    token.rename(away)
    plugged = subprocess.Popen(
        [KRYPTVAULT, "plug", vault.uuid, "--token", str(token), "--pinentry", str(fake.program)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert plugged.poll() is None and fake.calls() == 0  # waiting, not asking
        away.rename(token)
        _out, err = plugged.communicate(timeout=60)
        assert plugged.returncode == 0, err
        assert fake.calls() == 1 and os.path.ismount(home_mnt)
    finally:
        if plugged.poll() is None:
            plugged.kill()
        if away.exists():
            away.rename(token)
        run_process("lock", home_mnt)


def test_plug_without_a_usable_token_says_why_and_never_asks(
    vault: VaultFixture, tmp_path: Path, buses: Buses
) -> None:
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", vault.container, "--mountpoint", home_mnt).returncode == 0
    fake = _pinentry(tmp_path, "pin:whatever")
    notifications = FakeNotifications(buses.session)
    missing = tmp_path / "no-token-here"
    env = {**buses.env(), "KRYPTVAULT_PLUG_TOKEN_WAIT": "1"}
    started = time.monotonic()
    plugged = run_process("plug", vault.uuid, "--token", missing, "--pinentry", fake.program, env=env)
    assert plugged.returncode == 1 and time.monotonic() - started >= 1.0
    assert_clean_error(plugged.stderr)
    assert "not asking for the password" in plugged.stderr and "does not exist" in plugged.stderr
    assert fake.calls() == 0 and not os.path.ismount(home_mnt)
    try:
        _wait(lambda: notifications.notes(), 5.0, "the notification")
        ((summary, body),) = notifications.notes()
        assert summary == "Vault not mounted" and vault.uuid.replace("-", "")[:8] in body
    finally:
        notifications.close()


def test_a_mount_that_fails_after_the_password_is_notified_with_its_reason(
    vault: VaultFixture, tmp_path: Path, buses: Buses
) -> None:
    """Not a wrong password (asked again) but a failure the prompt cannot fix: here the
    configured mount point is a file. The unit has no terminal, so the desktop says why."""
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", vault.container, "--mountpoint", home_mnt).returncode == 0
    if home_mnt.is_dir():
        home_mnt.rmdir()  # setup made the folder
    home_mnt.write_text("a file where the folder should be")
    password = vault.password_file.read_text().strip()
    fake = _pinentry(tmp_path, f"pin:{password}")
    notifications = FakeNotifications(buses.session)
    try:
        plugged = run_process("plug", vault.uuid, "--token", vault.token, "--pinentry", fake.program,
                              env=buses.env())
        assert plugged.returncode == 1
        assert_clean_error(plugged.stderr)
        assert fake.calls() == 1  # no second prompt for a failure a password cannot fix
        _wait(lambda: notifications.notes(), 5.0, "the notification")
        ((summary, body),) = notifications.notes()
        assert summary == "Vault not mounted" and vault.uuid.replace("-", "")[:8] in body
        reason = plugged.stderr.strip().splitlines()[-1].removeprefix("kryptvault: ")
        assert reason in body, (reason, body)
    finally:
        notifications.close()


def test_the_unplug_lock_unit_succeeds_when_the_daemon_has_already_locked(vault: VaultFixture) -> None:
    # The daemon locks itself on the unplug; the lock unit runs after it and must not end
    # "failed" after every unplug. Without --if-mounted "nothing mounted" stays an error.
    hex_id = vault.uuid.replace("-", "")
    unit = run_process("lock", "--vault", hex_id, "--reason", "unplug", "--if-mounted")
    assert unit.returncode == 0 and "is not mounted: nothing to lock" in unit.stdout
    plain = run_process("lock", "--vault", hex_id)
    assert plain.returncode == 1 and "no mounted vault" in plain.stderr
    assert_clean_error(plain.stderr)
    assert "--if-mounted" in (Path(__file__).parent.parent / "udev" / "kryptvault-lock@.service").read_text()


def test_the_guard_unit_starts_the_plug_unit_which_runs_plug() -> None:
    udev = Path(__file__).resolve().parents[1] / "udev"
    guard = (udev / "kryptvault-guard@.service").read_text()
    assert "ExecStartPost=/usr/bin/systemctl --user --no-block start kryptvault-plug@%i.service" in guard
    plug = (udev / "kryptvault-plug@.service").read_text()
    assert "ExecStart=kryptvault plug %i" in plug and "Restart=" not in plug


def test_gio_lists_the_mount_under_home_and_its_eject_runs_the_full_lock(vault: VaultFixture) -> None:
    gio = require_tool("gio", "libglib2.0-bin")
    setup = run_process("setup", vault.container)  # default mount point: ~/Vault-<id>
    assert setup.returncode == 0, setup.stderr
    short = vault.uuid.replace("-", "")[:8]
    mnt = Path.home() / f"Vault-{short}"
    assert mnt.is_dir()
    assert run_process("mount", vault.container, *vault.pw()).returncode == 0
    try:
        (mnt / "kept.txt").write_text("saved by the eject\n")
        listed = subprocess.run([gio, "mount", "-l"], capture_output=True, text=True, timeout=30)
        assert f"Vault-{short} -> file://{mnt}" in listed.stdout, listed.stdout + listed.stderr
        ejected = subprocess.run([gio, "mount", "-u", str(mnt)], capture_output=True, text=True, timeout=30)
        assert ejected.returncode == 0, ejected.stderr
        _daemon_gone(mnt)
        (entry,) = _lock_entries(_audit_text(), vault.uuid)
        assert entry["reason"] == "exit" and entry["route"] == "fuse" and entry["error"] is None
        assert run_process("mount", vault.container, *vault.pw()).returncode == 0
        assert (mnt / "kept.txt").read_text() == "saved by the eject\n"
    finally:
        if os.path.ismount(mnt):
            run_process("lock", mnt)


def test_plug_falls_back_to_an_ask_password_program_when_pinentry_cannot_run(
    vault: VaultFixture, tmp_path: Path
) -> None:
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", vault.container, "--mountpoint", home_mnt).returncode == 0
    prompts = tmp_path / "prompts"
    ask = tmp_path / "fake-ask-password"
    # As systemd-ask-password: the prompt as argument, the password on stdout; the first
    # answer is wrong, the second right, the third a cancel (exit 1).
    ask.write_text(f"""#!{sys.executable}
import sys
with open({str(prompts)!r}, "a") as f:
    f.write(sys.argv[1] + "\\n")
n = len(open({str(prompts)!r}).read().splitlines())
if n == 1:
    print("not the password at all")
elif n == 2:
    print(open({str(vault.password_file)!r}).read().strip())
else:
    sys.exit(1)
""")
    ask.chmod(0o755)
    nothing = tmp_path / "no-such-pinentry"
    args = ("plug", vault.uuid, "--token", vault.token, "--pinentry", nothing, "--fallback", ask)
    plugged = run_process(*args)
    try:
        assert plugged.returncode == 0, plugged.stderr
        assert os.path.ismount(home_mnt)
        short = vault.uuid.replace("-", "")[:8]
        assert prompts.read_text().splitlines() == [
            f"Password of vault {short}:",
            f"Wrong password, or the wrong token. Password of vault {short}:",
        ]
    finally:
        run_process("lock", home_mnt)
    _daemon_gone(home_mnt)
    cancelled = run_process(*args)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert not os.path.ismount(home_mnt)


FIDO2_KEY_SECRET = bytes(range(32))


def _fido2_vault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pin: str | None
) -> tuple[Path, str, list[object]]:
    """A vault whose token is a software FIDO2 key (tests/fido2_soft.py) with `pin`, put
    where python-fido2's HID discovery finds keys (as tests/test_fido2_token.py does).
    Returns the container, its UUID and the list of plugged keys (empty again on return)."""
    from cli_helpers import FAST_KDF, PASSWORD, run_cli
    from fido2.hid import CtapHidDevice
    from fido2_soft import SoftAuthenticator

    plugged: list[object] = []
    monkeypatch.setattr(CtapHidDevice, "list_devices", classmethod(lambda cls: iter(list(plugged))))
    plugged.append(SoftAuthenticator(device_secret=FIDO2_KEY_SECRET, pin=pin, path="/dev/hidraw-soft1"))
    container, pw = tmp_path / "fido2.kv", tmp_path / "pw-fido2"
    pw.write_text(PASSWORD + "\n")
    extra: list[str | Path] = []
    if pin is not None:
        (tmp_path / "pin").write_text(pin + "\n")
        extra = ["--pin-file", tmp_path / "pin"]
    made = run_cli("init", container, "--token", "fido2", "--password-file", pw, *FAST_KDF, *extra)
    assert made.exit_code == 0, made.output
    vault_id = run_cli("info", container, "--json")
    plugged.clear()
    return container, json.loads(vault_id.output)["uuid"], plugged


def test_a_security_key_holding_none_of_a_fido2_vaults_credentials_ends_plug_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buses: Buses
) -> None:
    """Every security key plugged starts the plug unit of every FIDO2 vault (udev cannot
    tell keys apart): another vault's key, or no key of ours at all, must not prompt or
    notify. The probe is silent: no touch asked of the foreign key."""
    from cli_helpers import run_cli
    from fido2_soft import SoftAuthenticator

    container, vault_id, plugged = _fido2_vault(tmp_path, monkeypatch, pin=None)
    home_mnt = tmp_path / "Vault"
    assert run_process("setup", container, "--mountpoint", home_mnt).returncode == 0
    rules = (Path(os.environ["KRYPTVAULT_UDEV_RULES_DIR"]) / "70-kryptvault.rules").read_text()
    hex_id = vault_id.replace("-", "")
    assert (
        'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{ID_SECURITY_TOKEN}=="1", TAG+="systemd", '
        f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-plug@{hex_id}.service"'
    ) in rules.splitlines()
    fake = _pinentry(tmp_path, "pin:whatever")
    notifications = FakeNotifications(buses.session)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", buses.session)
    foreign = SoftAuthenticator(auto_touch=False, path="/dev/hidraw-soft2")
    try:
        for keys in ([foreign], []):
            plugged[:] = keys
            started = time.monotonic()
            result = run_cli("plug", hex_id, "--pinentry", fake.program)
            assert result.exit_code == 0, result.output
            assert f"no plugged security key holds a credential of vault {vault_id}" in result.output
            assert time.monotonic() - started < 10  # no wait for a token that is not coming
        assert foreign.touches_wanted == 0 and foreign.silent_probes >= 1
        time.sleep(0.3)
        assert fake.calls() == 0 and notifications.notes() == [] and not os.path.ismount(home_mnt)
    finally:
        notifications.close()


def test_plug_asks_the_password_then_the_pin_for_the_key_holding_the_vaults_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another key plugged first, the probe picks the holder and hands the mount its
    path; the key's PIN is asked in a second prompt. The mount runs in a process of its
    own, which on this host (no /dev/uhid) cannot reach the software key: it fails, once,
    naming the holder's path, and plug stops without asking again. The whole mount with
    the touch is in the QEMU guest (tests/test_e2e_desktop.py)."""
    from cli_helpers import PASSWORD, run_cli
    from fido2_soft import SoftAuthenticator

    container, vault_id, plugged = _fido2_vault(tmp_path, monkeypatch, pin="4321")
    assert run_process("setup", container, "--mountpoint", tmp_path / "Vault").returncode == 0
    # Another key first; then the one that made the credential (its device secret).
    plugged[:] = [SoftAuthenticator(auto_touch=False, path="/dev/hidraw-soft2"),
                  SoftAuthenticator(device_secret=FIDO2_KEY_SECRET, pin="4321", auto_touch=False,
                                    path="/dev/hidraw-soft1")]
    fake = _pinentry(tmp_path, f"pin:{PASSWORD}", "pin:4321")
    result = run_cli("plug", vault_id, "--pinentry", fake.program)
    assert result.exit_code == 1
    assert "no FIDO2 security key at /dev/hidraw-soft1" in result.output
    assert fake.calls() == 2
    log = fake.log.read_text()
    short = vault_id.replace("-", "")[:8]
    assert f"0 SETDESC Password of vault {short}" in log and "0 SETPROMPT Password:" in log
    assert f"1 SETDESC PIN of the security key for vault {short}" in log and "1 SETPROMPT PIN:" in log


def test_pinentry_answers_are_percent_decoded_and_the_description_escaped(tmp_path: Path) -> None:
    from kryptvault.session.pinentry import PinentryCancelled, ask_password

    fake = _pinentry(tmp_path, "pin:50% off, really", "cancel")
    pin = ask_password(str(fake.program), "100% yours\nsecond line", error="bad 5%")
    assert bytes(pin) == b"50% off, really"
    log = fake.log.read_text()
    assert "0 SETDESC 100%25 yours%0Asecond line" in log and "0 SETERROR bad 5%25" in log
    with pytest.raises(PinentryCancelled):
        ask_password(str(fake.program), "again")


def _backup_config(*destinations: Path) -> Path:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kryptvault" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[backup]\ndestinations = [" + ", ".join(json.dumps(str(d)) for d in destinations)
                      + "]\nkeep = 3\n")
    return config


def _audit_events(vault: VaultFixture, *events: str) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in _audit_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("event") in events and e.get("vault") == vault.uuid]


def _urgency(notifications: FakeNotifications, index: int) -> object:
    calls = [args for _, member, args in notifications.calls if member == "Notify"]
    return calls[index][6]["urgency"]  # type: ignore[index]


def test_the_backup_after_a_lock_notifies_finished_after_locked_naming_destinations_by_number(
    vault: VaultFixture, buses: Buses, tmp_path: Path
) -> None:
    dest = tmp_path / "backups"
    dest.mkdir()
    config = _backup_config(dest, tmp_path / "unplugged-disk")
    notifications = FakeNotifications(buses.session)
    mnt = vault.dir / "mnt"
    try:
        env = buses.session_only_env()
        assert run_process("mount", vault.container, mnt, *vault.pw(), env=env).returncode == 0
        (mnt / "diary.txt").write_text("kept in the backup\n")
        assert run_process("lock", mnt).returncode == 0
        # The backup is a process of its own, started by the daemon as it exits.
        _wait(lambda: len(notifications.notes()) >= 3, 60.0, "the backup notification")
        short = vault.uuid.replace("-", "")[:8]
        assert notifications.notes() == [
            ("Vault mounted", f"Vault {short} is open."),
            ("Vault locked", f"Vault {short} locked (locked by command)."),
            ("Backup finished", f"Vault {short} was backed up to destination 1 of 2; "
                                "destination 2 not reachable."),
        ]
        assert _urgency(notifications, 2) == ("y", 1)
        (done,) = _audit_events(vault, "backup_done")
        assert str(done["backup"]).startswith(str(dest))
        listed = run_process("backup", "list", dest)
        assert listed.returncode == 0 and vault.uuid in listed.stdout
        assert not any(str(tmp_path) in text or "diary" in text for n in notifications.notes() for text in n)
    finally:
        notifications.close()
        config.unlink()


def test_a_failing_destination_is_notified_as_critical_and_the_exit_status_stays_without_a_bus(
    vault: VaultFixture, buses: Buses, tmp_path: Path
) -> None:
    good = tmp_path / "backups"
    good.mkdir()
    with ext4_loop_disk(tmp_path, 16) as disk:
        # A backup disk that the kernel turned read-only (as after I/O errors).
        assert run_quiet("mount", "-o", "remount,ro", disk).returncode == 0
        config = _backup_config(good, disk)
        notifications = FakeNotifications(buses.session)
        mnt = vault.dir / "mnt"
        try:
            env = buses.session_only_env()
            assert run_process("mount", vault.container, mnt, *vault.pw(), env=env).returncode == 0
            assert run_process("lock", mnt).returncode == 0
            _wait(lambda: len(notifications.notes()) >= 3, 60.0, "the backup notification")
            short = vault.uuid.replace("-", "")[:8]
            summary, body = notifications.notes()[2]
            assert summary == "Backup failed" and _urgency(notifications, 2) == ("y", 2)
            assert body.startswith(f"Vault {short}: the backup to destination 2 of 2 failed: ")
            assert "in destination 2: the filesystem is read-only" in body
            assert body.endswith(" Backed up to destination 1.")
            assert str(disk) not in body and str(tmp_path) not in body
            (failed,) = _audit_events(vault, "backup_failed")
            assert failed["dest"] == str(disk)

            # Run by hand: the same outcome and status with a bus, with a dead one, without.
            statuses = []
            for bus in (buses.session, "unix:path=/nonexistent/session_bus_socket", None):
                run_env = dict(env)
                if bus is None:
                    run_env.pop("DBUS_SESSION_BUS_ADDRESS")
                else:
                    run_env["DBUS_SESSION_BUS_ADDRESS"] = bus
                ran = run_process("backup", "auto", vault.container, env=run_env)
                assert ran.stderr == ""  # no word about buses, no traceback
                statuses.append((ran.returncode, ran.stdout.count(": done"), ran.stdout.count(": failed")))
            assert statuses == [(1, 1, 1)] * 3
            # Not on a terminal (as under the timer): the failure is notified, once per run
            # that had a bus.
            _wait(lambda: len(notifications.notes()) >= 4, 10.0, "the second failure notification")
            time.sleep(0.5)
            assert [s for s, _ in notifications.notes()[3:]] == ["Backup failed"]
            # A backup by hand (`kryptvault backup CONTAINER DEST`) prints; it never notifies.
            assert run_process("backup", vault.container, good, env=env).returncode == 0
            time.sleep(0.5)
            assert len(notifications.notes()) == 4
        finally:
            notifications.close()
            config.unlink()
            if os.path.ismount(mnt):
                run_process("lock", mnt)


@pytest.fixture
def fresh_config() -> Iterator[Path]:
    """No config.toml before or after: setup's rules cover every vault the file names."""
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kryptvault" / "config.toml"
    config.unlink(missing_ok=True)
    yield config
    config.unlink(missing_ok=True)


FAKE_PROGRAM = """#!/bin/sh
# A fake {name}: records its arguments, then does what the test asked for.
echo "{name} $*" >> {log}
{body}
"""


def _fake_programs(directory: Path, log: Path, **bodies: str) -> dict[str, str]:
    """Programs named after `bodies`' keys in `directory`, first on PATH in the env returned."""
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    for name, body in bodies.items():
        program = directory / name
        program.write_text(FAKE_PROGRAM.format(name=name, log=log, body=body))
        program.chmod(0o755)
    return dict(os.environ, PATH=f"{directory}:{os.environ['PATH']}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# As a running user manager answers: `is-system-running` says so, daemon-reload works.
USER_MANAGER = 'if [ "$2" = is-system-running ]; then echo running; fi'


def test_setup_as_root_installs_the_rules_for_every_set_up_vault_and_reloads_udevd_and_the_user_manager(
    tmp_path: Path, fresh_config: Path
) -> None:
    first = make_vault(tmp_path, name="first.kv")
    second = make_vault(tmp_path, name="second.kv")
    rules_dir = tmp_path / "rules"
    log = tmp_path / "programs.log"
    env = _fake_programs(tmp_path / "bin", log, systemctl=USER_MANAGER, udevadm="exit 0")
    done = run_process("setup", first.container, "--mountpoint", tmp_path / "m1", "--rules-dir", rules_dir,
                       env=env)
    assert done.returncode == 0, done.stderr
    assert _lines(log) == [
        "systemctl --user is-system-running",
        "systemctl --user daemon-reload",
        "udevadm control --reload",
    ]
    assert "reloaded the systemd user manager (systemctl --user daemon-reload)" in done.stdout
    rules = rules_dir / "70-kryptvault.rules"
    assert f"wrote {rules} and reloaded udevd (udevadm control --reload)" in done.stdout
    assert rules.read_text() == run_process("token", "udev", first.container, "--dry-run").stdout
    # A second vault: one rules file for both, the first vault's rules are kept.
    log.unlink()
    done = run_process("setup", second.container, "--mountpoint", tmp_path / "m2", "--rules-dir", rules_dir,
                       env=env)
    assert done.returncode == 0, done.stderr
    both = sorted([first, second], key=lambda v: v.uuid)  # the file lists vaults in UUID order
    assert rules.read_text() == run_process("token", "udev", *(v.container for v in both),
                                            "--dry-run").stdout
    assert _lines(log)[-1] == "udevadm control --reload"
    # Nothing new: the rules stay as they are and udevd is left alone.
    log.unlink()
    again = run_process("setup", first.container, "--rules-dir", rules_dir, env=env)
    assert again.returncode == 0, again.stderr
    assert f"the udev rules in {rules} are up to date" in again.stdout
    assert _lines(log) == ["systemctl --user is-system-running", "systemctl --user daemon-reload"]


def test_setup_failures_name_the_step_and_what_was_already_done(tmp_path: Path, fresh_config: Path) -> None:
    vault = make_vault(tmp_path)
    rules_dir = tmp_path / "rules"
    config = fresh_config
    log = tmp_path / "programs.log"
    env = _fake_programs(tmp_path / "bin", log, udevadm="exit 0", systemctl=USER_MANAGER + """
if [ "$2" = daemon-reload ]; then echo "Failed to reload daemon: Access denied" >&2; exit 1; fi""")
    units = tmp_path / "units"
    failed = run_process("setup", vault.container, "--mountpoint", tmp_path / "m", "--units-dir", units,
                         "--rules-dir", rules_dir, env=env)
    assert failed.returncode == 1
    assert_clean_error(failed.stderr)
    assert failed.stderr.strip() == (
        "kryptvault: reloading the systemd user manager failed: systemctl --user daemon-reload: "
        f"Failed to reload daemon: Access denied; already done: wrote the settings of vault {vault.uuid} "
        f"to {config}; created the folder {tmp_path / 'm'}; installed the systemd user units in {units}; "
        f"installed the desktop entry and its icon in {os.environ['XDG_DATA_HOME']}"
    )
    # What it says was done was done; what came after the failed step was not.
    assert (units / "kryptvault-plug@.service").exists() and (tmp_path / "m").is_dir()
    assert not rules_dir.exists() and "udevadm" not in log.read_text()
    # The last step fails (a file where the rules directory's parent should be): the steps
    # before it are listed, the user manager's reload among them.
    env = _fake_programs(tmp_path / "bin", log, systemctl=USER_MANAGER, udevadm="exit 0")
    (tmp_path / "etc").write_text("not a directory\n")
    rules_dir = tmp_path / "etc" / "rules.d"
    failed = run_process("setup", vault.container, "--units-dir", units, "--rules-dir", rules_dir, env=env)
    assert failed.returncode == 1
    assert_clean_error(failed.stderr)
    assert failed.stderr.startswith("kryptvault: installing the udev rules failed: Not a directory: ")
    assert failed.stderr.rstrip().endswith(
        f"; already done: installed the systemd user units in {units}; installed the desktop entry and its "
        f"icon in {os.environ['XDG_DATA_HOME']}; reloaded the systemd user manager (systemctl --user "
        "daemon-reload)")
    assert (tmp_path / "etc").read_text() == "not a directory\n"


def test_setup_keeps_the_installed_rules_of_vaults_it_cannot_render(
    tmp_path: Path, fresh_config: Path
) -> None:
    from kryptvault.token.base import TokenIdentity
    from kryptvault.token.udev import render_rules

    vault = make_vault(tmp_path)
    other = make_vault(tmp_path, name="other.kv")
    rules_dir = tmp_path / "rules"
    rules = rules_dir / "70-kryptvault.rules"
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kryptvault" / "config.toml"
    # Installed earlier by `token udev` for a vault on a USB stick, never set up here.
    stick_vault = uuid.uuid4()
    stick = TokenIdentity("usb", vendor_id=0x46F4, product_id=1, serial="STICK-42")
    rules_dir.mkdir()
    rules.write_text(render_rules([(stick, stick_vault)]))
    try:
        assert run_process("setup", other.container, "--rules-dir", rules_dir).returncode == 0
        # `other` is set up, then its container goes (a disk that is not plugged in).
        other.container.rename(tmp_path / "elsewhere.kv")
        done = run_process("setup", vault.container, "--rules-dir", rules_dir)
        assert done.returncode == 0, done.stderr
        kept = rules.read_text()
        assert f"# vault {vault.uuid}" in kept
        (note,) = [ln for ln in done.stdout.splitlines() if "keeping the installed rules of vaults" in ln]
        assert str(stick_vault) in note and other.uuid in note and "with no settings here" in note
        # Kept verbatim: the stick's access rules and its vault's lock-on-unplug rule.
        for line in render_rules([(stick, stick_vault)]).splitlines()[3:]:
            assert line in kept.splitlines()
        assert f"# vault {other.uuid}: directory token" in kept
        # The root command it prints (`token udev --keep-other-vaults`) writes the same file,
        # and a second setup finds it up to date.
        again = run_process("token", "udev", vault.container, "--no-units", "--keep-other-vaults",
                            "--rules-dir", rules_dir, "--dry-run")
        assert again.stdout == kept
        assert "are up to date" in run_process("setup", vault.container, "--rules-dir", rules_dir).stdout
        assert rules.read_text() == kept
    finally:
        config.unlink()


def test_setup_as_a_user_prints_the_one_root_command_and_with_the_flag_runs_it_through_sudo(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run setup as another user")
    vault = make_vault(tmp_path)
    # A user's world, owned by nobody: home, XDG dirs, the container, a rules directory
    # (standing in for /etc/udev/rules.d) that only the fake sudo's command writes to.
    user = Path(tempfile.mkdtemp(prefix="kvuser-", dir="/tmp"))
    try:
        user.chmod(0o755)
        container = user / "vault.kv"
        shutil.copy(vault.container, container)
        rules_dir = user / "rules"
        for name in ("home", "run", "config", "data", "state", "rules"):
            (user / name).mkdir(mode=0o700)
        log = user / "programs.log"
        # The fake sudo only records: nobody cannot run this interpreter (it lives under
        # /root); the test runs the recorded command as root itself, below.
        env = _fake_programs(user / "bin", log, systemctl="exit 1", sudo="exit 0")
        env.update(HOME=str(user / "home"), XDG_RUNTIME_DIR=str(user / "run"),
                   XDG_CONFIG_HOME=str(user / "config"), XDG_DATA_HOME=str(user / "data"),
                   XDG_STATE_HOME=str(user / "state"))
        env.pop("KRYPTVAULT_UDEV_RULES_DIR")
        subprocess.run(["chown", "-R", "65534:65534", str(user)], check=True)

        def as_user(*args: str | Path) -> subprocess.CompletedProcess[str]:
            # CAP_DAC_READ_SEARCH (read and search only, no write): the checkout and its
            # venv may sit in a directory only root can enter (a CI clone in /root, a
            # mktemp -d); setup's non-root path depends on the euid, which stays nobody's.
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
                       str(Path(sys.executable).parent / "kryptvault"), *map(str, args)]
            return subprocess.run(command, env=env, cwd=user, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=120)

        told = as_user("setup", container, "--rules-dir", rules_dir)
        assert told.returncode == 0, told.stderr
        (hint,) = [line for line in told.stdout.splitlines() if "needs root" in line]
        prefix = "to mount on plug and lock on unplug, install the udev rules (needs root): sudo /"
        assert hint.startswith(prefix)
        assert hint.endswith(f"/kryptvault token udev {container} --no-units --keep-other-vaults "
                             f"--rules-dir {rules_dir}")
        assert not (rules_dir / "70-kryptvault.rules").exists() and "sudo" not in log.read_text()
        dry = as_user("setup", container, "--rules-dir", rules_dir, "--install-udev-rules", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would run: {' '.join(hint.split()[-9:])}" in dry.stdout.splitlines()
        assert "sudo" not in log.read_text()

        ran = as_user("setup", container, "--rules-dir", rules_dir, "--install-udev-rules")
        assert ran.returncode == 0, ran.stderr
        (sudo,) = [line.split() for line in _lines(log) if line.startswith("sudo ")]
        assert sudo == hint.split()[-9:]  # it ran the command it prints
        assert f"installed the udev rules in {rules_dir / '70-kryptvault.rules'} (with sudo)" in ran.stdout
        # Run as root, that command writes the rules `token udev` renders, and no units.
        as_root = subprocess.run(sudo[1:], capture_output=True, text=True, timeout=120,
                                 stdin=subprocess.DEVNULL)
        assert as_root.returncode == 0, as_root.stderr
        rules = (rules_dir / "70-kryptvault.rules").read_text()
        assert rules == run_process("token", "udev", container, "--dry-run").stdout
        assert f"# vault {vault.uuid}" in rules
        assert as_root.stdout.splitlines()[0] == f"wrote {rules_dir / '70-kryptvault.rules'}"

        (rules_dir / "70-kryptvault.rules").unlink()
        _fake_programs(user / "bin", log, sudo='echo "sudo: a password is required" >&2; exit 1')
        refused = as_user("setup", container, "--rules-dir", rules_dir, "--install-udev-rules")
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[0] == "sudo: a password is required"
        assert_clean_error(refused.stderr.split("\n", 1)[1])
        assert refused.stderr.split("\n", 1)[1].startswith(
            "kryptvault: installing the udev rules failed: `/")
        assert "ended with status 1; already done: installed the systemd user units in " in refused.stderr
        assert not (rules_dir / "70-kryptvault.rules").exists()
    finally:
        shutil.rmtree(user, ignore_errors=True)
