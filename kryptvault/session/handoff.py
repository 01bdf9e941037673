"""Handing a session's settings and keys from the unlocking process to the mount daemon.

The daemon is a fresh child process (forking a Python process that already runs threads is
unsafe, and libfuse's own daemonising forks). Settings travel as one JSON line and the
two store keys as 64 raw bytes, over a pipe the child inherits — never argv or the
environment, which other processes can read in /proc.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from kryptvault.crypto.secret import Secret

KEY_LEN = 32
MAX_SETTINGS = 64 * 1024


@dataclass
class SessionSettings:
    container: str
    mountpoint: str
    vault_uuid: str
    block_size: int
    allow_other: bool = False
    commit_delay: float = 5.0
    lock_deadline_ms: int = 200
    idle_lock_minutes: float | None = None
    token: dict[str, object] = field(default_factory=dict)  # how the watcher finds the token
    slot: int = -1
    read_only: bool = False  # no writes, no commits, no rollback record written
    accept_lost_commit: bool = False  # the user acknowledged a damaged newest commit record

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> SessionSettings:
        return cls(**json.loads(line))


def send(fd: int, settings: SessionSettings, data_key: Secret, meta_key: Secret) -> None:
    payload = settings.encode()
    _write_all(fd, payload)
    with data_key.view() as d, meta_key.view() as m:
        _write_all(fd, d)
        _write_all(fd, m)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> tuple[SessionSettings, Secret, Secret]:
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError("the session settings were cut short")
        line += chunk
        if len(line) > MAX_SETTINGS:
            raise ValueError("session settings too long")
    settings = SessionSettings.decode(bytes(line))
    return settings, _read_key(fd), _read_key(fd)


def _read_key(fd: int) -> Secret:
    key = Secret(KEY_LEN)
    with key.view() as view:
        filled = 0
        while filled < KEY_LEN:
            got = os.readv(fd, [view[filled:]])
            if got == 0:
                key.wipe()
                raise EOFError("the session keys were cut short")
            filled += got
    return key
