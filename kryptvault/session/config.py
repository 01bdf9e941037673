"""The user's config file, `$XDG_CONFIG_HOME/kryptvault/config.toml` (automatic backups).

[backup]
destinations = ["/media/me/backup-disk/kryptvault", "/mnt/nas/kryptvault"]
keep = 7            # versions kept in each destination
after_lock = true   # start a backup after every lock (unplug included)

[backup.vaults."<vault-uuid>"]   # optional, per vault; overrides the global values
destinations = ["/media/me/other-disk"]
"""

from __future__ import annotations

import os
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.errors import UsageError
from kryptvault.session.paths import config_dir

DEFAULT_KEEP = 7


@dataclass
class AutoBackupConfig:
    destinations: list[Path] = field(default_factory=list)
    keep: int = DEFAULT_KEEP
    after_lock: bool = True


def config_path() -> Path:
    return config_dir() / "config.toml"


def load_config(vault_uuid: uuid.UUID, path: Path | None = None) -> AutoBackupConfig:
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return AutoBackupConfig()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}")
    section = data.get("backup", {})
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [backup] must be a table")
    merged = {k: v for k, v in section.items() if k != "vaults"}
    vaults = section.get("vaults", {})
    if isinstance(vaults, dict):
        for key, override in vaults.items():
            try:
                same = uuid.UUID(str(key)) == vault_uuid
            except ValueError:
                raise UsageError(f"{path}: {key!r} under [backup.vaults] is not a vault UUID")
            if same and isinstance(override, dict):
                merged.update(override)
    return _parse(merged, path)


def _parse(section: dict[str, object], path: Path) -> AutoBackupConfig:
    dests = section.get("destinations", [])
    if not isinstance(dests, list) or not all(isinstance(d, str) for d in dests):
        raise UsageError(f"{path}: backup destinations must be a list of paths")
    keep = section.get("keep", DEFAULT_KEEP)
    if not isinstance(keep, int) or keep < 1:
        raise UsageError(f"{path}: backup keep must be a whole number >= 1")
    after_lock = section.get("after_lock", True)
    if not isinstance(after_lock, bool):
        raise UsageError(f"{path}: backup after_lock must be true or false")
    return AutoBackupConfig([Path(os.path.expanduser(d)) for d in dests], keep, after_lock)
