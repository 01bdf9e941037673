"""Where a session keeps its runtime files, state and logs (XDG base directories)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def runtime_dir() -> Path:
    """Per-user, private, tmpfs-backed: control sockets live here."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kryptvault-{os.getuid()}"
    path = Path(base) / "kryptvault"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _ensure_private(path)
    return path


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    path = Path(base) / "kryptvault"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kryptvault"


def _ensure_private(path: Path) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a plain directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    if info.st_mode & 0o077:
        path.chmod(0o700)
