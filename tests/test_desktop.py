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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process
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
from loopdisk import ext4_loop_disk, run_quiet
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
        # Released: what had the daemon written to the audit log by now?
        inhibitor.closed_at = time.monotonic()
        inhibitor.audit_when_closed = _audit_text()
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
        env = buses.env()
        env["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=/nonexistent/system_bus_socket"
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
    dry = run_process("setup", vault.container, "--mountpoint", tmp_path / "here", "--units-dir", units,
                      "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f'[vaults."{vault.uuid}"]' in dry.stdout and "lock_on_suspend = true" in dry.stdout
    assert "would install the systemd user units" in dry.stdout and str(units) in dry.stdout
    assert "applications/kryptvault.desktop" in dry.stdout
    assert config.read_text() == before and not (tmp_path / "here").exists() and not units.exists()
    try:
        done = run_process("setup", vault.container, "--mountpoint", tmp_path / "here", "--units-dir", units)
        assert done.returncode == 0, done.stderr
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
                with open(mnt / "unsaved.bin", "wb") as f:
                    for _ in range(96):
                        f.write(os.urandom(64 * 1024))
                _fill(disk / "filler")
                if _generation(vault) == generation:
                    break
                (disk / "filler").unlink()  # the commit timer was first: again
            fd = os.open(mnt / "unsaved.bin", os.O_RDONLY)
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


def test_pinentry_answers_are_percent_decoded_and_the_description_escaped(tmp_path: Path) -> None:
    from kryptvault.session.pinentry import PinentryCancelled, ask_password

    fake = _pinentry(tmp_path, "pin:50% off, really", "cancel")
    pin = ask_password(str(fake.program), "100% yours\nsecond line", error="bad 5%")
    assert bytes(pin) == b"50% off, really"
    log = fake.log.read_text()
    assert "0 SETDESC 100%25 yours%0Asecond line" in log and "0 SETERROR bad 5%25" in log
    with pytest.raises(PinentryCancelled):
        ask_password(str(fake.program), "again")
