"""Files installed for the desktop: the systemd user units (udev/*.service), the desktop
entry and its icon (desktop/)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kryptvault.durable import replace_file
from kryptvault.errors import KryptvaultError

USER_UNITS = ("kryptvault-guard@.service", "kryptvault-lock@.service", "kryptvault-plug@.service")


def default_units_dir() -> Path:
    # Where `systemd --user` looks: $XDG_CONFIG_HOME/systemd/user, ~/.config only without it.
    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "systemd" / "user"


def unit_texts() -> dict[str, str]:
    """Each unit's text, its `ExecStart=kryptvault ...` pointing at this installation."""
    executable = shutil.which("kryptvault") or str(Path(sys.executable).parent / "kryptvault")
    template_dir = Path(__file__).resolve().parents[2] / "udev"
    texts = {}
    for name in USER_UNITS:
        text = (template_dir / name).read_text() if (template_dir / name).exists() else ""
        if not text:
            raise KryptvaultError(f"the unit template {name} is missing from this installation")
        texts[name] = text.replace("ExecStart=kryptvault ", f"ExecStart={executable} ")
    return texts


def install_user_units(units: Path) -> None:
    units.mkdir(parents=True, exist_ok=True)
    for name, text in unit_texts().items():
        write_text_file(units / name, text)


def write_text_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text` (mode 0644, under the umask)."""
    try:
        replace_file(path, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise KryptvaultError(f"cannot write {path}: {exc.strerror or exc}")


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def desktop_files(base: Path) -> dict[Path, str]:
    """Where the desktop entry and its icon go under `base` (XDG_DATA_HOME), and their text."""
    executable = shutil.which("kryptvault") or str(Path(sys.executable).parent / "kryptvault")
    source = Path(__file__).resolve().parents[2] / "desktop"
    try:
        entry = (source / "kryptvault.desktop").read_text()
        icon = (source / "kryptvault.svg").read_text()
    except OSError:
        raise KryptvaultError("the desktop entry or its icon is missing from this installation")
    entry = entry.replace("Exec=kryptvault ", f"Exec={executable} ")
    return {
        base / "applications" / "kryptvault.desktop": entry,
        base / "icons" / "hicolor" / "scalable" / "apps" / "kryptvault.svg": icon,
    }


def install_desktop_files(base: Path) -> None:
    for path, text in desktop_files(base).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_file(path, text)
