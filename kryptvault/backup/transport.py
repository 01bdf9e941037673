"""Where a remote backup set lives: any rclone remote, through the `rclone` program.

Only ciphertext, manifests and lists of chunk names go to rclone, in temporary files.
The user's own rclone configuration (rclone.conf, RCLONE_CONFIG_* variables) names the
remotes. Every call is a separate `rclone` process that dies with us (PR_SET_PDEATHSIG),
so a killed backup leaves no uploader running behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kryptvault.errors import KryptvaultError, UsageError

REMOTE_PREFIX = "rclone:"
RCLONE_ENV = "KRYPTVAULT_RCLONE"  # another rclone binary (default: the one on PATH)
# A dead remote must fail in seconds, not after rclone's default minutes of retries.
COMMON_FLAGS = (
    "--retries", "1",
    "--low-level-retries", "2",
    "--contimeout", "10s",
    "--timeout", "60s",
    "--log-level", "ERROR",
    "--use-json-log=false",
)
_STAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:(?:ERROR|NOTICE|CRITICAL|INFO|DEBUG) *: *)?")
PR_SET_PDEATHSIG = 1


class RemoteError(KryptvaultError):
    """rclone could not do what was asked."""


class RemoteUnreachable(RemoteError):
    """The remote did not answer at all (first contact failed)."""


def is_remote(dest: str | os.PathLike[str]) -> bool:
    return os.fspath(dest).startswith(REMOTE_PREFIX)


def remote_spec(dest: str | os.PathLike[str]) -> str:
    """`rclone:REMOTE:path` -> `REMOTE:path` (an rclone path), checked for shape."""
    spec = os.fspath(dest)[len(REMOTE_PREFIX):]
    if not spec or "\n" in spec or "\0" in spec:
        raise UsageError(f"{os.fspath(dest)!r} is not a remote: write rclone:REMOTE:path")
    if ":" not in spec and not spec.startswith("/"):
        raise UsageError(f"{os.fspath(dest)!r} names no rclone remote: write rclone:REMOTE:path")
    return spec


def join(base: str, *parts: str) -> str:
    out = base
    for part in parts:
        out = out + part if out.endswith((":", "/")) else f"{out}/{part}"
    return out


_PRCTL: Any = None
with contextlib.suppress(OSError, AttributeError):  # resolved here: never load libraries after fork
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def _rclone_binary() -> str:
    found = os.environ.get(RCLONE_ENV) or shutil.which("rclone")
    if not found:
        raise UsageError("the rclone program is not installed (scripts/install.sh installs it)")
    return found


def _reason(stderr: bytes) -> str:
    """rclone's last error message (a stamped line and its continuation lines), in one line."""
    messages: list[str] = []
    for raw in stderr.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line:
            continue
        if _STAMP.match(line) or not messages:
            messages.append(_STAMP.sub("", line))
        else:
            messages[-1] += " " + line
    useful = [m for m in messages if not m.startswith(("Attempt ", "Config file "))]
    text = useful[-1] if useful else (messages[-1] if messages else "no message")
    return " ".join(text.split())[:400]


class RcloneTransport:
    """One backup set's directory on an rclone remote (`root` is an rclone path)."""

    def __init__(self, root: str, display: str) -> None:
        self.root = root
        self.display = display  # what the user wrote, for messages
        self.binary = _rclone_binary()
        self.bytes_up = 0
        self.bytes_down = 0

    def child(self, name: str, display: str | None = None) -> RcloneTransport:
        return RcloneTransport(join(self.root, name), display or join(self.display, name))

    def _run(self, args: Sequence[str], what: str, stdin: bytes | None = None,
             ok_codes: Iterable[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
        try:
            proc = subprocess.run(
                [self.binary, *COMMON_FLAGS, *args],
                input=stdin if stdin is not None else b"",
                capture_output=True,
                preexec_fn=_die_with_parent,
                check=False,
            )
        except OSError as exc:
            raise RemoteError(f"cannot run rclone ({self.binary}): {exc.strerror or exc}")
        if proc.returncode not in tuple(ok_codes):
            raise RemoteError(f"{what} {self.display} failed: {_reason(proc.stderr)}")
        return proc

    def list(self, sub: str, *, dirs: bool = False, first_contact: bool = False) -> dict[str, int]:
        """Files (or directories) directly in `sub`: name -> size. A missing directory is
        empty (object stores have none)."""
        try:
            proc = self._run(
                ["lsjson", "--dirs-only" if dirs else "--files-only", "--no-modtime", "--no-mimetype",
                 join(self.root, sub) if sub else self.root],
                "listing", ok_codes=(0, 3))
        except RemoteError as exc:
            if first_contact:
                raise RemoteUnreachable(str(exc)) from exc
            raise
        if proc.returncode == 3:
            return {}
        try:
            rows = json.loads(proc.stdout or b"[]")
            return {str(r["Name"]): int(r.get("Size", 0)) for r in rows}
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteError(f"rclone listed {self.display} in an unexpected form: {exc}")

    def put_files(self, local_dir: Path, names: Sequence[str], sub: str) -> None:
        """Upload local_dir/NAME to sub/NAME for every name, in one rclone run."""
        if not names:
            return
        with _name_list(names) as listing:
            self._run(["copy", "--no-traverse", "--no-check-dest", "--files-from-raw", str(listing),
                       str(local_dir), join(self.root, sub)], "uploading to")
        self.bytes_up += sum((local_dir / n).stat().st_size for n in names)

    def get_files(self, names: Sequence[str], sub: str, local_dir: Path) -> None:
        """Download sub/NAME into local_dir/NAME; names the remote lacks are simply absent."""
        if not names:
            return
        with _name_list(names) as listing:
            self._run(["copy", "--no-traverse", "--ignore-checksum", "--files-from-raw", str(listing),
                       join(self.root, sub), str(local_dir)], "downloading from", ok_codes=(0, 3, 4))
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                self.bytes_down += (local_dir / n).stat().st_size

    def put_bytes(self, sub: str, name: str, data: bytes) -> None:
        # From a file of known size, not `rcat`: a stream above rclone's streaming cutoff
        # (100 KiB) becomes a multipart upload, which some S3 servers refuse.
        with scratch_dir("put") as tmp:
            path = tmp / name
            path.write_bytes(data)
            self._run(["copyto", "--no-check-dest", str(path), join(self.root, sub, name)], "uploading to")
        self.bytes_up += len(data)

    def move(self, sub: str, src: str, dst: str) -> None:
        self._run(["moveto", join(self.root, sub, src), join(self.root, sub, dst)], "renaming in")

    def get_bytes(self, sub: str, name: str) -> bytes:
        proc = self._run(["cat", join(self.root, sub, name)], "reading from")
        self.bytes_down += len(proc.stdout)
        return proc.stdout

    def delete(self, sub: str, names: Sequence[str]) -> None:
        if not names:
            return
        with _name_list(names) as listing:
            self._run(["delete", "--files-from-raw", str(listing), join(self.root, sub)], "deleting in",
                      ok_codes=(0, 3, 4))


@contextlib.contextmanager
def _name_list(names: Iterable[str]) -> Iterator[Path]:
    with scratch_dir("list") as tmp:
        path = tmp / "names"
        path.write_text("".join(f"{n}\n" for n in names))
        yield path


def _scratch_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kryptvault" / "remote-scratch"


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private directory for staged chunks and rclone's name lists. Those of killed runs
    (named by a process id that is gone) are removed here, so none piles up."""
    base = _scratch_base()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in base.iterdir():
        parts = old.name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{prefix}-{os.getpid()}-{os.urandom(4).hex()}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_remote(dest: str | os.PathLike[str]) -> RcloneTransport:
    return RcloneTransport(remote_spec(dest), os.fspath(dest))


__all__ = ["REMOTE_PREFIX", "RcloneTransport", "RemoteError", "RemoteUnreachable", "is_remote",
           "open_remote", "remote_spec"]
