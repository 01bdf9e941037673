"""Starting the mount daemon as a child process and waiting until the mount is ready."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from kryptvault.crypto.secret import Secret
from kryptvault.errors import KryptvaultError
from kryptvault.session.handoff import SessionSettings, send
from kryptvault.session.paths import state_dir

READY_TIMEOUT = 60.0


def daemon_log_path(vault_uuid: str) -> Path:
    return state_dir() / f"daemon-{vault_uuid}.log"


def start_daemon(settings: SessionSettings, data_key: Secret, meta_key: Secret) -> int:
    """Spawn the daemon, hand it the keys over a pipe, return its pid once mounted."""
    handoff_r, handoff_w = os.pipe()
    ready_r, ready_w = os.pipe()
    log = open(daemon_log_path(settings.vault_uuid), "ab")  # noqa: SIM115 - handed to the child
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
        log.close()
        os.close(handoff_r)
        os.close(ready_w)
    try:
        send(handoff_w, settings, data_key, meta_key)
    finally:
        os.close(handoff_w)
    try:
        message = _read_ready(ready_r, child)
    finally:
        os.close(ready_r)
    if message != "ok":
        child.wait(timeout=10)
        raise KryptvaultError(message.removeprefix("error: "))
    return child.pid


def _read_ready(fd: int, child: subprocess.Popen[bytes]) -> str:
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
            raise KryptvaultError(f"the mount daemon exited early (status {code}); see its log")
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")
