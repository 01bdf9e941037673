"""The audit log (append-only JSON lines) and the per-vault backoff after failed passwords.

Each entry is one line, written with a single `os.write` on an O_APPEND descriptor: the
kernel positions and writes it under the inode lock, so lines from several processes never
interleave. Values are scalars only, strings cut at 200 characters and lines kept under
4 KiB, so nothing can flood the log. Callers never pass secrets (there is no field for a
password or key); bytes are refused outright so that a key cannot slip in by mistake.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kryptvault.session.paths import state_dir

log = logging.getLogger("kryptvault.audit")

EVENTS = (
    "unlock_ok",
    "unlock_failed",
    "lock",
    "token_plugged",
    "token_removed",
    "control_connect",
    "control_request",
    "backup_started",
    "backup_done",
    "backup_failed",
    "mount",
    "unmount",
)
# Entries that must survive a crash right after them: who opened the vault, and that it closed.
FSYNC_EVENTS = frozenset({"unlock_ok", "unlock_failed", "lock", "mount", "unmount"})
MAX_STRING = 200
MAX_FIELDS = 16
MAX_LINE = 4000  # below PIPE_BUF (4096), so even a pipe or FIFO as the log stays atomic
RESERVED = frozenset({"ts", "event", "vault"})
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")

Scalar = str | int | float | bool | None


def utc_timestamp(now: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-30T11:20:01.123Z."""
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _vault_text(vault: uuid.UUID | str | None) -> str | None:
    if vault is None:
        return None
    try:
        return str(vault if isinstance(vault, uuid.UUID) else uuid.UUID(str(vault)))
    except ValueError:
        return _clip(str(vault))


def _clip(text: str, limit: int = MAX_STRING) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _scalar(name: str, value: object) -> Scalar:
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"audit field {name!r}: bytes are never logged (they could be key material)")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, uuid.UUID | os.PathLike):
        return _clip(str(value))
    raise TypeError(f"audit field {name!r} must be a scalar, not {type(value).__name__}")


def make_entry(event: str, vault: uuid.UUID | str | None, fields: dict[str, object]) -> dict[str, Scalar]:
    """The entry as it will be written; TypeError/ValueError for what a caller must not pass."""
    if not _NAME.fullmatch(event):
        raise ValueError(f"bad audit event name {event!r}")
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"too many audit fields ({len(fields)}, at most {MAX_FIELDS})")
    entry: dict[str, Scalar] = {"ts": utc_timestamp(), "event": event, "vault": _vault_text(vault)}
    for name, value in fields.items():
        if name in RESERVED or not _NAME.fullmatch(name):
            raise ValueError(f"bad audit field name {name!r}")
        entry[name] = _scalar(name, value)
    return entry


def encode_entry(entry: dict[str, Scalar]) -> bytes:
    line = _dump(entry)
    # Escaped control characters can make 200 characters six times longer: cut harder,
    # and as a last resort keep only the time, event and vault.
    for limit in (40, 8):
        if len(line) < MAX_LINE:
            break
        line = _dump({**_clipped(entry, limit), "truncated": True})
    if len(line) >= MAX_LINE:
        line = _dump({**{k: entry[k] for k in ("ts", "event", "vault")}, "truncated": True})
    return line + b"\n"


def _clipped(entry: dict[str, Scalar], limit: int) -> dict[str, Scalar]:
    return {k: _clip(v, limit) if isinstance(v, str) and k not in RESERVED else v for k, v in entry.items()}


def _dump(entry: dict[str, Scalar]) -> bytes:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class AuditLog:
    """Append-only; safe to share between threads and processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else state_dir() / "audit.jsonl"
        self._fd = -1
        self._lock = threading.Lock()

    def append(self, event: str, vault: uuid.UUID | str | None = None, **fields: object) -> bool:
        """Write one entry; False (and a warning) if the disk refused it.

        Bad arguments raise; I/O errors do not: a full disk must never stop a lock.
        """
        return self.append_entries([make_entry(event, vault, fields)])

    def append_entries(self, entries: list[dict[str, Scalar]]) -> bool:
        """Write entries made earlier by `make_entry` (each keeps its own time stamp), with
        at most one fsync: the lock writes the removal it was told about and itself at once."""
        lines = [encode_entry(entry) for entry in entries]
        durable = any(entry["event"] in FSYNC_EVENTS for entry in entries)
        # The write happens under the lock: close() from another thread must not let the
        # descriptor number be reused by some other file between our lookup and our write.
        with self._lock:
            try:
                fd = self._open()
                # One write per line: each stays below PIPE_BUF, so lines from several
                # processes never interleave.
                written = sum(os.write(fd, line) for line in lines)
                if durable:
                    os.fsync(fd)
            except OSError as exc:
                log.warning("cannot write the audit log %s: %s", self.path, exc.strerror or exc)
                return False
        return written == sum(len(line) for line in lines)

    def _open(self) -> int:
        if self._fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(self.path, flags, 0o600)
            info = os.fstat(fd)
            if info.st_mode & 0o077 and info.st_uid == os.geteuid():
                os.fchmod(fd, 0o600)
            self._fd = fd
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- reading


def parse_timestamp(text: str) -> datetime.datetime:
    """An ISO-8601 time; naive times are local time. ValueError if not a time."""
    moment = datetime.datetime.fromisoformat(text.strip())
    return moment.astimezone() if moment.tzinfo is None else moment


class EntryFilter:
    def __init__(self, vault: uuid.UUID | str | None = None, since: datetime.datetime | None = None) -> None:
        self.vault = _vault_text(vault)
        self.since = since.astimezone() if since is not None and since.tzinfo is None else since

    def __call__(self, entry: dict[str, Any]) -> bool:
        if self.vault is not None and entry.get("vault") != self.vault:
            return False
        if self.since is not None:
            try:
                return parse_timestamp(str(entry.get("ts"))) >= self.since
            except ValueError:
                return False
        return True


def _complete_entries(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Entries in the complete lines of `data`, and how many bytes those lines took.

    A last line without its newline is torn (a crash mid-write) or still being written:
    it is not consumed. A damaged line in the middle is skipped.
    """
    end = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:end].split(b"\n"):
        if not raw:
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries, end


def read_entries(
    path: Path, vault: uuid.UUID | str | None = None, since: datetime.datetime | None = None
) -> Iterator[dict[str, Any]]:
    """The log's entries, oldest first; a missing log has none."""
    keep = EntryFilter(vault, since)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    entries, _ = _complete_entries(data)
    yield from (e for e in entries if keep(e))


def follow_entries(
    path: Path,
    vault: uuid.UUID | str | None = None,
    since: datetime.datetime | None = None,
    *,
    interval: float = 0.25,
    stop: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """Like `read_entries`, then every new entry as it is appended (until `stop` is set)."""
    keep = EntryFilter(vault, since)
    offset, inode = 0, None
    pending = b""
    while stop is None or not stop.is_set():
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                if info.st_ino != inode or info.st_size < offset:
                    offset, inode, pending = 0, info.st_ino, b""  # new or truncated log
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        pending += chunk
        entries, used = _complete_entries(pending)
        pending = pending[used:]
        yield from (e for e in entries if keep(e))
        if stop is not None:
            stop.wait(interval)
        else:
            time.sleep(interval)


# ---------------------------------------------------------------------- backoff

MAX_DELAY = 60.0


def nominal_delay(failures: int) -> float:
    """0 after a success, then 1 s, 2 s, 4 s, ... capped at MAX_DELAY."""
    return 0.0 if failures <= 0 else min(MAX_DELAY, 2.0 ** min(failures - 1, 16))


class Backoff:
    """Consecutive failed unlocks per vault, shared by every process of the user.

    The state file is rewritten whole (temp file + rename), under an flock on a separate
    lock file: the rename replaces the state file's inode, so it cannot carry the lock.
    """

    def __init__(self, state_path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = state_path if state_path is not None else state_dir() / "backoff.json"
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock

    def delay_for(self, vault_uuid: uuid.UUID | str) -> float:
        """Seconds still to wait before the next attempt (0 if none)."""
        with self._locked(fcntl.LOCK_SH):
            record = self._load().get(_key(vault_uuid))
        if record is None:
            return 0.0
        failures, last = record
        delay = nominal_delay(failures)
        # A clock set back must not stretch the wait beyond the nominal delay.
        return max(0.0, min(delay, last + delay - self._clock()))

    def failures(self, vault_uuid: uuid.UUID | str) -> int:
        with self._locked(fcntl.LOCK_SH):
            record = self._load().get(_key(vault_uuid))
        return record[0] if record else 0

    def record_failure(self, vault_uuid: uuid.UUID | str) -> None:
        with self._locked(fcntl.LOCK_EX):
            state = self._load()
            failures = state.get(_key(vault_uuid), (0, 0.0))[0]
            state[_key(vault_uuid)] = (failures + 1, self._clock())
            self._save(state)

    def record_success(self, vault_uuid: uuid.UUID | str) -> None:
        with self._locked(fcntl.LOCK_EX):
            state = self._load()
            if state.pop(_key(vault_uuid), None) is not None:
                self._save(state)

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _load(self) -> dict[str, tuple[int, float]]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("ignoring a damaged backoff state file %s", self.path)
            return {}
        state: dict[str, tuple[int, float]] = {}
        vaults = raw.get("vaults") if isinstance(raw, dict) else None
        for key, value in (vaults if isinstance(vaults, dict) else {}).items():
            if isinstance(value, dict):
                failures, last = value.get("failures"), value.get("last_failure")
                if isinstance(failures, int) and isinstance(last, int | float):
                    state[str(key)] = (failures, float(last))
        return state

    def _save(self, state: dict[str, tuple[int, float]]) -> None:
        data = {
            "version": 1,
            "vaults": {k: {"failures": f, "last_failure": t} for k, (f, t) in state.items()},
        }
        fd, tmp = tempfile.mkstemp(prefix=".backoff-", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _key(vault_uuid: uuid.UUID | str) -> str:
    return str(vault_uuid if isinstance(vault_uuid, uuid.UUID) else uuid.UUID(str(vault_uuid)))
