"""The user's config file, `$XDG_CONFIG_HOME/kryptvault/config.toml` (automatic backups).

[backup]
destinations = ["/media/me/backup-disk/kryptvault", "/mnt/nas/kryptvault"]
keep = 7            # versions kept in each destination
after_lock = true   # start a backup after every lock (unplug included)

[backup.vaults."<vault-uuid>"]   # optional, per vault; overrides the global values
destinations = ["/media/me/other-disk"]
"""

from __future__ import annotations

import json
import os
import re
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


# ---------------------------------------------------------------- per-vault desktop settings
# [vaults."<vault-uuid>"]        written by `kryptvault setup`
# container = "/home/me/vault.kv"
# mountpoint = "/home/me/Vault"  # under $HOME, so file managers list it
# mount_on_plug = true
# lock_on_suspend = true
# lock_on_screen_lock = false
# lock_on_logout = true
# idle_minutes = 0               # 0: no idle lock


@dataclass
class VaultPrefs:
    vault_uuid: uuid.UUID | None = None
    container: Path | None = None
    mountpoint: Path | None = None
    mount_on_plug: bool = True
    lock_on_suspend: bool = True
    lock_on_screen_lock: bool = False
    lock_on_logout: bool = True
    idle_minutes: float = 0

    def to_toml(self) -> str:
        """The vault's table, as `setup` writes it (strings quoted as TOML basic strings)."""
        lines = [f'[vaults."{self.vault_uuid}"]']
        if self.container is not None:
            lines.append(f"container = {_toml_string(str(self.container))}")
        if self.mountpoint is not None:
            lines.append(f"mountpoint = {_toml_string(str(self.mountpoint))}")
        for name in ("mount_on_plug", "lock_on_suspend", "lock_on_screen_lock", "lock_on_logout"):
            lines.append(f"{name} = {'true' if getattr(self, name) else 'false'}")
        idle = self.idle_minutes
        lines.append(f"idle_minutes = {int(idle) if float(idle).is_integer() else idle}")
        return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    # JSON's escapes (\", \\, \uXXXX, \n...) are all valid in a TOML basic string.
    return json.dumps(text)


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}")


def _vault_tables(data: dict[str, object], path: Path) -> dict[uuid.UUID, dict[str, object]]:
    section = data.get("vaults", {})
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [vaults] must be a table")
    tables: dict[uuid.UUID, dict[str, object]] = {}
    for key, table in section.items():
        try:
            vault = uuid.UUID(str(key))
        except ValueError:
            raise UsageError(f"{path}: {key!r} under [vaults] is not a vault UUID")
        if not isinstance(table, dict):
            raise UsageError(f"{path}: [vaults.\"{key}\"] must be a table")
        tables[vault] = table
    return tables


def _parse_prefs(vault: uuid.UUID, table: dict[str, object], path: Path) -> VaultPrefs:
    prefs = VaultPrefs(vault_uuid=vault)
    for name in ("container", "mountpoint"):
        value = table.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}: {name} of vault {vault} must be a path")
        setattr(prefs, name, Path(os.path.expanduser(value)))
    for name in ("mount_on_plug", "lock_on_suspend", "lock_on_screen_lock", "lock_on_logout"):
        value = table.get(name, getattr(prefs, name))
        if not isinstance(value, bool):
            raise UsageError(f"{path}: {name} of vault {vault} must be true or false")
        setattr(prefs, name, value)
    idle = table.get("idle_minutes", 0)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or idle < 0:
        raise UsageError(f"{path}: idle_minutes of vault {vault} must be a number >= 0")
    prefs.idle_minutes = idle
    return prefs


def load_vault_prefs(
    vault_uuid: uuid.UUID | None = None, container: Path | None = None, path: Path | None = None
) -> VaultPrefs | None:
    """The settings of the vault with this UUID, or else of the one whose container is
    this file; None when the config names neither."""
    path = path or config_path()
    tables = _vault_tables(_read_toml(path), path)
    if vault_uuid is not None and vault_uuid in tables:
        return _parse_prefs(vault_uuid, tables[vault_uuid], path)
    if container is not None:
        for vault, table in tables.items():
            prefs = _parse_prefs(vault, table, path)
            if prefs.container is not None and prefs.container.resolve() == container.resolve():
                return prefs
    return None


def all_vault_prefs(path: Path | None = None) -> list[VaultPrefs]:
    """The settings of every vault in the config file, in its order."""
    path = path or config_path()
    tables = _vault_tables(_read_toml(path), path)
    return [_parse_prefs(vault, table, path) for vault, table in tables.items()]


def updated_config_text(prefs: VaultPrefs, path: Path | None = None) -> tuple[str, str]:
    """(old text, new text) of the config file with the vault's table replaced or added;
    every other line (backups, other vaults, comments) stays as it was."""
    path = path or config_path()
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}")
    table = re.escape(str(prefs.vault_uuid))
    header = re.compile(r'^\s*\[\s*vaults\s*\.\s*"?' + table + r'"?\s*\]\s*(#.*)?$')
    kept: list[str] = []
    skipping = False
    for line in old.splitlines(keepends=True):
        if header.match(line):
            skipping = True
            continue
        if skipping and line.lstrip().startswith("["):
            skipping = False
        if not skipping:
            kept.append(line)
    body = "".join(kept).rstrip("\n")
    new = (body + "\n\n" if body else "") + prefs.to_toml()
    try:
        parsed = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot update {path}: {exc}")
    assert prefs.vault_uuid is not None
    _parse_prefs(prefs.vault_uuid, _vault_tables(parsed, path)[prefs.vault_uuid], path)
    return old, new
