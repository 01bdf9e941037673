"""The mount daemon's links to the desktop, over D-Bus (jeepney: pure Python, no GTK).

- Lock before sleep: while mounted, a logind *delay* inhibitor (an fd) is held; on
  `PrepareForSleep(true)` the lock runs, and the fd is closed only after the lock's commit
  and audit entry (`release`, or the daemon's exit, which follows the lock at once), so
  the machine does not sleep with the vault open.
- Lock on screen lock (when configured): logind's session `Lock` signal and
  `org.freedesktop.ScreenSaver.ActiveChanged(true)`.
- Notifications (`org.freedesktop.Notifications.Notify`): mounted, locked (with the
  reason), read-only after a failed commit. Fire-and-forget: no reply is asked for, and a
  stuck bus costs the sender at most NOTIFY_TIMEOUT. `notify_once` sends one from a
  process with no mount (the backup after a lock: finished or failed).

Every bus is optional: without one (no desktop, a server, a test) this does nothing and
says so only at debug level. Nothing sent names a file: only the vault's short id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageFlag, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from kryptvault.session.config import VaultPrefs

log = logging.getLogger("kryptvault.desktop")

LOGIN1 = "org.freedesktop.login1"
LOGIN1_MANAGER = DBusAddress("/org/freedesktop/login1", bus_name=LOGIN1, interface=f"{LOGIN1}.Manager")
NOTIFICATIONS = DBusAddress(
    "/org/freedesktop/Notifications",
    bus_name="org.freedesktop.Notifications",
    interface="org.freedesktop.Notifications",
)
SCREENSAVER = "org.freedesktop.ScreenSaver"
CALL_TIMEOUT = 2.0  # set-up calls (AddMatch, Inhibit): a bus that does not answer is no bus
NOTIFY_TIMEOUT = 0.1  # the most a notification may cost its sender (the lock, say)
PROBLEM_POLL = 1.0
SESSION_POLL = 2.0  # how often logind is asked whether the session is closing (logout)

# What the "locked" notification says for each lock reason (trigger_lock's first argument).
REASONS = {
    "unplug": "the token was removed",
    "suspend": "the computer is going to sleep",
    "screen-lock": "the screen was locked",
    "logout": "the session ended",
    "idle": "no file activity",
    "command": "locked by command",
    "signal": "the mount daemon was stopped",
    "exit": "the mount was removed",
}


class Desktop:
    def __init__(
        self,
        label: str,
        prefs: VaultPrefs,
        trigger_lock: Callable[[str, str], object],
        problem: Callable[[], str | None] | None = None,
    ) -> None:
        self._label = label
        self._prefs = prefs
        self._trigger_lock = trigger_lock
        self._problem = problem
        self._session: DBusConnection | None = None
        self._send_lock = threading.Lock()
        self._inhibitor = -1
        self._inhibitor_lock = threading.Lock()

    def start(self) -> None:
        """Connect in a thread of its own: the mount must not wait for a bus."""
        threading.Thread(target=self._run, name="kryptvault-desktop", daemon=True).start()

    # ------------------------------------------------------------------ sleep, screen lock
    def _run(self) -> None:
        try:
            self._session = _connect("SESSION", enable_fds=False)
            self.notify("Vault mounted", f"Vault {self._label} is open.")
            if self._session is not None and self._prefs.lock_on_screen_lock:
                self._watch_screensaver(self._session)
            if self._problem is not None:
                threading.Thread(target=self._watch_problem, name="kryptvault-ro", daemon=True).start()
            if self._prefs.lock_on_suspend or self._prefs.lock_on_screen_lock or self._prefs.lock_on_logout:
                system = _connect("SYSTEM", enable_fds=True)
                if system is not None:
                    self._follow_logind(system)
        except Exception:
            # Desktop links are a convenience: their failure must never touch the mount.
            log.debug("desktop link failed", exc_info=True)

    def _follow_logind(self, conn: DBusConnection) -> None:
        # Only logind's own signals count: on the system bus any user may send a signal
        # addressed to this connection, whatever match rules say.
        owner = _name_owner(conn, LOGIN1)
        if owner is None:
            log.debug("no logind on the system bus")
            return
        wanted: dict[tuple[str, str], str] = {}
        if self._prefs.lock_on_suspend:
            _add_match(conn, MatchRule(type="signal", sender=LOGIN1, interface=f"{LOGIN1}.Manager",
                                       member="PrepareForSleep"))
            wanted[(f"{LOGIN1}.Manager", "PrepareForSleep")] = "suspend"
            self._take_inhibitor(conn)
        path = None
        if self._prefs.lock_on_screen_lock or self._prefs.lock_on_logout:
            path = _own_session_path(conn)
        if path is not None and self._prefs.lock_on_screen_lock:
            _add_match(conn, MatchRule(type="signal", sender=LOGIN1, interface=f"{LOGIN1}.Session",
                                       member="Lock", path=path))
            wanted[(f"{LOGIN1}.Session", "Lock")] = "screen-lock"
        watch_state = path if self._prefs.lock_on_logout else None
        if wanted or watch_state:
            self._listen(conn, wanted, "logind", watch_state, sender=owner)

    def _take_inhibitor(self, conn: DBusConnection) -> None:
        call = new_method_call(
            LOGIN1_MANAGER, "Inhibit", "ssss",
            ("sleep", "kryptvault", "Locking the vault before sleep", "delay"),
        )
        reply = conn.send_and_get_reply(call, timeout=CALL_TIMEOUT)
        if reply.header.message_type != MessageType.method_return:
            log.debug("logind refused a sleep inhibitor: %s", reply.body)
            return
        fd = int(reply.body[0].to_raw_fd())
        os.set_inheritable(fd, False)  # no child (a backup, fusermount) may hold sleep off
        with self._inhibitor_lock:
            self._inhibitor = fd
        log.debug("holding a sleep delay inhibitor")

    def release(self) -> None:
        """Let the machine sleep: called after the lock's commit and audit entry."""
        with self._inhibitor_lock:
            fd, self._inhibitor = self._inhibitor, -1
        if fd >= 0:
            os.close(fd)

    def _watch_screensaver(self, conn: DBusConnection) -> None:
        _add_match(conn, MatchRule(type="signal", interface=SCREENSAVER, member="ActiveChanged"))
        threading.Thread(
            target=self._listen, args=(conn, {(SCREENSAVER, "ActiveChanged"): "screen-lock"}, "screensaver"),
            name="kryptvault-desktop-ss", daemon=True,
        ).start()

    def _listen(
        self,
        conn: DBusConnection,
        wanted: dict[tuple[str, str], str],
        route: str,
        session: str | None = None,
        sender: str | None = None,
    ) -> None:
        """Lock on the signals in `wanted`; with `session`, also when that logind session
        starts closing (logout). Its State is asked for every SESSION_POLL: logind does not
        announce it, and with KillUserProcesses=no a closing session keeps this daemon."""
        asked = -1
        try:
            while True:
                try:
                    msg = conn.receive(timeout=SESSION_POLL if session else None)
                except TimeoutError:
                    assert session is not None
                    asked = _ask_state(conn, session)
                    continue
                if msg.header.message_type == MessageType.method_return:
                    answer = msg.header.fields.get(HeaderFields.reply_serial) == asked
                    if answer and msg.body == (("s", "closing"),):
                        log.debug("locking: the session is closing")
                        self._trigger_lock("logout", route)
                    continue
                if msg.header.message_type != MessageType.signal:
                    continue
                fields = msg.header.fields
                if sender is not None and fields.get(HeaderFields.sender) != sender:
                    continue
                reason = wanted.get((fields.get(HeaderFields.interface), fields.get(HeaderFields.member)))
                if reason is None:
                    continue
                # PrepareForSleep(false) and ActiveChanged(false) are the way back: nothing to do.
                if msg.body and msg.body[0] is False:
                    continue
                log.debug("locking: %s (%s)", reason, route)
                self._trigger_lock(reason, route)
        except (OSError, ValueError, RuntimeError):
            log.debug("the %s bus went away", route, exc_info=True)

    # ------------------------------------------------------------------ notifications
    def notify(self, summary: str, body: str, critical: bool = False) -> None:
        conn = self._session
        if conn is None:
            return
        msg = _notify_message(summary, body, critical)
        try:
            with self._send_lock:
                conn.send(msg)
        except Exception:  # fire-and-forget: whatever went wrong, the sender goes on
            log.debug("could not send a notification", exc_info=True)

    def notify_locked(self, reason: str, commit_error: str | None) -> None:
        why = REASONS.get(reason, reason)
        if commit_error:
            self.notify("Vault locked", f"Vault {self._label} locked ({why}); its last changes "
                        "could not be saved: see `kryptvault log`.", critical=True)
        else:
            self.notify("Vault locked", f"Vault {self._label} locked ({why}).")

    def _watch_problem(self) -> None:
        """Say when saving starts failing (the vault turns read-only) and when a commit
        succeeds again (a full disk that got space back)."""
        assert self._problem is not None
        failing = False
        while True:
            time.sleep(PROBLEM_POLL)
            now = self._problem() is not None
            if now and not failing:
                self.notify("Vault read-only", f"Vault {self._label} cannot save changes: a commit "
                            "failed. `kryptvault status` says why.", critical=True)
            elif failing and not now:
                self.notify("Vault writable again", f"Vault {self._label} saved everything again.")
            failing = now


def _notify_message(summary: str, body: str, critical: bool) -> Message:
    # desktop-entry: the entry `kryptvault setup` installs (name and icon for the server).
    hints: dict[str, tuple[str, Any]] = {
        "urgency": ("y", 2 if critical else 1),
        "desktop-entry": ("s", "kryptvault"),
    }
    msg = new_method_call(
        NOTIFICATIONS, "Notify", "susssasa{sv}i",
        ("kryptvault", 0, "kryptvault", summary, body, [], hints, -1),
    )
    msg.header.flags |= MessageFlag.no_reply_expected
    return msg


def notify_once(summary: str, body: str, critical: bool = False) -> bool:
    """One notification from a process with no Desktop (the backup after a lock): connect,
    send, go. Silent without a session bus; never raises. True when the bus took it.

    No reply is asked from the notification server (an activatable one could take the
    bus's activation timeout to start); a call to the bus itself follows instead: the bus
    handles a connection's messages in order, so once it answers, the notification is in
    the server's queue and closing the connection cannot lose it."""
    try:
        conn = _connect("SESSION", enable_fds=False)
        if conn is None:
            return False
        try:
            conn.sock.settimeout(CALL_TIMEOUT)
            conn.send(_notify_message(summary, body, critical))
            reply = conn.send_and_get_reply(new_method_call(message_bus, "GetId"), timeout=CALL_TIMEOUT)
            return bool(reply.header.message_type == MessageType.method_return)
        finally:
            conn.close()
    except Exception:  # a notification never changes what its sender does or reports
        log.debug("could not send a notification", exc_info=True)
        return False


def _connect(bus: str, enable_fds: bool) -> DBusConnection | None:
    if bus == "SESSION" and not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        log.debug("no session bus")
        return None
    try:
        conn = open_dbus_connection(bus, enable_fds=enable_fds, auth_timeout=CALL_TIMEOUT)
    except (OSError, RuntimeError, ValueError, TimeoutError) as exc:
        log.debug("no %s bus: %s", bus.lower(), exc)
        return None
    # Sends (notifications) must not hang on a stuck bus; receives wait in select anyway.
    conn.sock.settimeout(NOTIFY_TIMEOUT)
    return conn


def _add_match(conn: DBusConnection, rule: MatchRule) -> None:
    call = new_method_call(message_bus, "AddMatch", "s", (rule.serialise(),))
    conn.send_and_get_reply(call, timeout=CALL_TIMEOUT)


def _name_owner(conn: DBusConnection, name: str) -> str | None:
    reply = conn.send_and_get_reply(new_method_call(message_bus, "GetNameOwner", "s", (name,)),
                                    timeout=CALL_TIMEOUT)
    if reply.header.message_type != MessageType.method_return:
        return None
    return str(reply.body[0])


def _ask_state(conn: DBusConnection, session: str) -> int:
    """Ask for the session's State without waiting; the answer comes to the listen loop."""
    props = DBusAddress(session, bus_name=LOGIN1, interface="org.freedesktop.DBus.Properties")
    serial: int = next(conn.outgoing_serial)
    conn.send(new_method_call(props, "Get", "ss", (f"{LOGIN1}.Session", "State")), serial=serial)
    return serial


def _own_session_path(conn: DBusConnection) -> str | None:
    """logind's object for the session this daemon belongs to: its own (by pid, else
    XDG_SESSION_ID); a daemon started by the user's systemd (mount on plug) is in no
    session, and follows the user's graphical one (the User's Display property)."""
    calls = [new_method_call(LOGIN1_MANAGER, "GetSessionByPID", "u", (os.getpid(),))]
    session_id = os.environ.get("XDG_SESSION_ID")
    if session_id:
        calls.append(new_method_call(LOGIN1_MANAGER, "GetSession", "s", (session_id,)))
    for call in calls:
        reply: Message = conn.send_and_get_reply(call, timeout=CALL_TIMEOUT)
        if reply.header.message_type == MessageType.method_return:
            return str(reply.body[0])
    user = conn.send_and_get_reply(new_method_call(LOGIN1_MANAGER, "GetUser", "u", (os.getuid(),)),
                                   timeout=CALL_TIMEOUT)
    if user.header.message_type == MessageType.method_return:
        props = DBusAddress(str(user.body[0]), bus_name=LOGIN1, interface="org.freedesktop.DBus.Properties")
        display = conn.send_and_get_reply(new_method_call(props, "Get", "ss", (f"{LOGIN1}.User", "Display")),
                                          timeout=CALL_TIMEOUT)
        if display.header.message_type == MessageType.method_return:
            # A variant of (session id, object path); an empty id: no graphical session.
            session, path = display.body[0][1]
            if session:
                return str(path)
    log.debug("not in a logind session: no screen-lock signal to follow")
    return None
