"""Where a session keeps its runtime files, state and logs (XDG base directories)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from kryptvault.errors import KryptvaultError


def runtime_dir() -> Path:
    """Per-user, private, tmpfs-backed: control sockets live here.

    Without XDG_RUNTIME_DIR the base is $TMPDIR (or /tmp) /kryptvault-UID, a name anyone
    can take first: it is used only if it is a real directory of ours (checked on the
    opened directory, not the name), else the base moves under the home directory. In a
    sticky /tmp nobody else can rename or replace a directory of ours once it is checked."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        path = Path(xdg) / "kryptvault"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        base = Path(os.environ.get("TMPDIR") or "/tmp") / f"kryptvault-{os.getuid()}"
        try:
            _private_directory(base)
        except KryptvaultError:
            base = Path.home() / ".cache" / "kryptvault-run"
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private_directory(base)
        path = base / "kryptvault"
    _private_directory(path)
    return path


def state_dir() -> Path:
    """Audit log, back-off state and daemon logs: private to the user (0700)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    path = Path(base) / "kryptvault"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private_directory(path)
    return path


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kryptvault"


def _private_directory(path: Path) -> None:
    """Create `path` (mode 0700) if missing; make sure it is a directory of ours, not a
    symlink, and that only we can enter it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KryptvaultError(f"cannot create {path}: {exc.strerror}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise KryptvaultError(f"{path} is not a plain directory (a symlink or a file)")
        raise KryptvaultError(f"cannot open {path}: {exc.strerror}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode):
            raise KryptvaultError(f"{path} is not a plain directory")
        if info.st_uid != os.getuid():
            raise KryptvaultError(f"{path} belongs to another user (uid {info.st_uid})")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
