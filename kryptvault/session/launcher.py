"""Starting the mount daemon as a child process and waiting until the mount is ready."""

from __future__ import annotations

import contextlib
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

from kryptvault.crypto.secret import Secret
from kryptvault.errors import KryptvaultError
from kryptvault.session import fusectl
from kryptvault.session.handoff import SessionSettings, send
from kryptvault.session.paths import state_dir

READY_TIMEOUT = 60.0


def daemon_log_path(vault_uuid: str) -> Path:
    return state_dir() / f"daemon-{vault_uuid}.log"


def open_daemon_log(path: Path) -> int:
    """The daemon's log, appended to, readable by its owner only (it records errors of a
    mounted vault). Never through a symlink: the state directory could be shared."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise KryptvaultError(f"{path} is not a log file of yours: refusing to write to it")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # made by an older version, 0644
    except BaseException:
        os.close(fd)
        raise
    return fd


def start_daemon(settings: SessionSettings, data_key: Secret, meta_key: Secret) -> int:
    """Spawn the daemon, hand it the keys over a pipe, return its pid once mounted."""
    log_path = daemon_log_path(settings.vault_uuid)
    log = open_daemon_log(log_path)
    handoff_r, handoff_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kryptvault.session.daemon",
                "--handoff-fd",
                str(handoff_r),
                "--ready-fd",
                str(ready_w),
            ],
            pass_fds=(handoff_r, ready_w),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # no SIGHUP when the terminal closes; it has no terminal
            close_fds=True,
        )
    finally:
        os.close(log)
        os.close(handoff_r)
        os.close(ready_w)
    try:
        try:
            send(handoff_w, settings, data_key, meta_key)
        except BrokenPipeError:
            pass  # it died before reading the keys: the readiness pipe's end says how
        finally:
            os.close(handoff_w)
        try:
            message = _read_ready(ready_r, child, log_path)
        finally:
            os.close(ready_r)
    except KeyboardInterrupt:
        # Ctrl-C reaches only us (the daemon has a session of its own): a vault the user
        # gave up on must not come up behind their back. SIGTERM is a lock request once the
        # daemon serves, and ends it before that.
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        with contextlib.suppress(OSError):  # killed before its handlers: a dead mount
            fusectl.clean_stale_mount(Path(settings.mountpoint))
        raise
    if message != "ok":
        child.wait(timeout=10)
        reason = message.removeprefix("error: ")
        if "internal error" in reason:  # the traceback is in the log, not in the message
            reason += f"; its log: {log_path}"
        raise KryptvaultError(reason)
    return child.pid


def _read_ready(fd: int, child: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            child.kill()
            raise KryptvaultError("the mount daemon did not become ready in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            code = child.wait(timeout=10)
            # It died without reporting (a crash): its last words are the best reason.
            last = _last_log_line(log_path)
            reason = f": {last}" if last else ""
            raise KryptvaultError(
                f"the mount daemon exited early (status {code}){reason}; its log: {log_path}"
            )
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _last_log_line(path: Path, limit: int = 200) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - 4096))
            lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].decode("utf-8", "replace")[:limit] if lines else ""
