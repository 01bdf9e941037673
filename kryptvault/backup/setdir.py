"""The backup set directory: naming, discovery, and reading its state without changing it.

    DEST/<vault-uuid>/current.kv           the newest version, a plain container file
    DEST/<vault-uuid>/vNNNNNNNN.manifest   one per kept version (immutable)
    DEST/<vault-uuid>/vNNNNNNNN.kvinc      rebuilds version N from version N+1
    DEST/<vault-uuid>/.tmp-*               only while a backup runs (or after it was killed)

A version exists once its manifest has been renamed into place. An increment of the
newest version with no newer manifest is the undo journal of an interrupted backup
("pending"): the newest version is then current.kv with that increment applied.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.backup.fsutil import os_error, read_exact
from kryptvault.backup.increment import Increment, IncrementError
from kryptvault.backup.manifest import Manifest, ManifestError, increment_name, manifest_name
from kryptvault.errors import KryptvaultError, UsageError

CURRENT = "current.kv"
TMP_PREFIX = ".tmp-"
MANIFEST_RE = re.compile(r"v(\d{8,})\.manifest")
INCREMENT_RE = re.compile(r"v(\d{8,})\.kvinc")


LINEAGE = "lineage"  # the lineage id (32 hex digits) of a set made from a fork; absent: the original


def set_lineage(path: Path) -> bytes:
    """Whose history the set holds: the lineage its versions were made from, as far as
    the machines that wrote them knew (docs/BACKUP.md §9). Absent: the original."""
    try:
        text = (path / LINEAGE).read_text().strip()
        lineage = bytes.fromhex(text)
    except FileNotFoundError:
        return bytes(16)
    except (OSError, ValueError) as exc:
        raise KryptvaultError(f"cannot read {path / LINEAGE}: {exc}")
    if len(lineage) != 16:
        raise KryptvaultError(f"{path / LINEAGE} does not hold a lineage id")
    return lineage


def write_set_lineage(path: Path, lineage: bytes) -> None:
    """Atomically; the original lineage is the file's absence."""
    target = path / LINEAGE
    try:
        if lineage == bytes(16):
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        else:
            tmp = path / f"{TMP_PREFIX}lineage"
            tmp.write_text(lineage.hex() + "\n")
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise os_error("write the lineage of", path, exc)


def parse_uuid(name: str) -> uuid.UUID | None:
    try:
        value = uuid.UUID(name)
    except ValueError:
        return None
    return value if str(value) == name else None


def is_set_dir(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n == CURRENT or MANIFEST_RE.fullmatch(n) or INCREMENT_RE.fullmatch(n) for n in names)


def set_owner(path: Path) -> uuid.UUID | None:
    """The vault a set directory belongs to: its name, else its first readable manifest."""
    owner = parse_uuid(path.name)
    if owner is not None:
        return owner
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(path)):
            if MANIFEST_RE.fullmatch(name):
                with contextlib.suppress(OSError, ManifestError):
                    return Manifest.decode((path / name).read_bytes()).vault_uuid
    return None


def find_set(backup: Path) -> tuple[Path, uuid.UUID]:
    """BACKUP is a set directory or a DEST holding exactly one: (set directory, vault UUID)."""
    if not backup.exists():
        raise UsageError(f"{backup} does not exist")
    if not backup.is_dir():
        raise UsageError(f"{backup} is not a directory (give the backup destination)")
    if is_set_dir(backup):
        owner = set_owner(backup)
        if owner is None:
            raise KryptvaultError(f"{backup} looks like a backup set but names no vault")
        return backup, owner
    found = [d for d in sorted(backup.iterdir()) if d.is_dir() and parse_uuid(d.name) and is_set_dir(d)]
    if not found:
        raise UsageError(f"{backup} holds no kryptvault backup")
    if len(found) > 1:
        raise UsageError(f"{backup} holds backups of {len(found)} vaults; give one of its UUID directories")
    owner = parse_uuid(found[0].name)
    assert owner is not None
    return found[0], owner


def set_for_backup(dest: Path, vault_uuid: uuid.UUID) -> tuple[Path, bool]:
    """The set directory for this vault under DEST, created if needed: (path, created)."""
    if not dest.exists():
        raise UsageError(f"the backup destination {dest} does not exist")
    if not dest.is_dir():
        raise UsageError(f"the backup destination {dest} is not a directory")
    if is_set_dir(dest):
        owner = set_owner(dest)
        if owner == vault_uuid:
            return dest, False
        raise KryptvaultError(
            f"{dest} holds the backups of vault {owner}, not of vault {vault_uuid}; "
            "use a separate destination for each vault")
    for entry in sorted(dest.iterdir()):
        other = parse_uuid(entry.name)
        if other is not None and other != vault_uuid and entry.is_dir() and is_set_dir(entry):
            raise KryptvaultError(
                f"{dest} holds the backups of vault {other}, not of vault {vault_uuid}; "
                "use a separate destination for each vault")
    path = dest / str(vault_uuid)
    if path.is_dir():
        return path, False
    try:
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise os_error("create the backup directory in", dest, exc)
    return path, True


@dataclass
class SetState:
    path: Path
    vault_uuid: uuid.UUID
    manifests: dict[int, Manifest] = field(default_factory=dict)
    bad_manifests: dict[int, str] = field(default_factory=dict)
    increments: set[int] = field(default_factory=set)
    has_current: bool = False
    temps: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def versions(self) -> list[int]:
        return sorted(self.manifests)

    @property
    def newest(self) -> int | None:
        every = set(self.manifests) | set(self.bad_manifests)
        return max(every) if every else None

    @property
    def pending(self) -> int | None:
        """The newest version, if an interrupted backup left its undo increment."""
        newest = self.newest
        if newest is not None and newest in self.manifests and newest in self.increments:
            return newest
        return None

    @property
    def current_path(self) -> Path:
        return self.path / CURRENT

    def manifest_path(self, version: int) -> Path:
        return self.path / manifest_name(version)

    def increment_path(self, version: int) -> Path:
        return self.path / increment_name(version)


def load_state(path: Path, vault_uuid: uuid.UUID) -> SetState:
    state = SetState(path, vault_uuid)
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise os_error("read", path, exc)
    for name in names:
        if m := MANIFEST_RE.fullmatch(name):
            version = int(m.group(1))
            try:
                manifest = Manifest.decode((path / name).read_bytes())
            except ManifestError as exc:
                state.bad_manifests[version] = str(exc)
                continue
            except OSError as exc:
                state.bad_manifests[version] = f"unreadable: {exc.strerror or exc}"
                continue
            if manifest.version != version:
                state.bad_manifests[version] = f"names version {manifest.version} inside"
            elif manifest.vault_uuid != vault_uuid:
                state.bad_manifests[version] = f"belongs to vault {manifest.vault_uuid}"
            else:
                state.manifests[version] = manifest
        elif m := INCREMENT_RE.fullmatch(name):
            state.increments.add(int(m.group(1)))
        elif name == CURRENT:
            state.has_current = True
        elif name == LINEAGE:
            pass
        elif name.startswith(TMP_PREFIX):
            state.temps.append(name)
        else:
            state.unknown.append(name)
    return state


@contextlib.contextmanager
def open_increment(state: SetState, version: int) -> Iterator[Increment]:
    path = state.increment_path(version)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error("open", path, exc)
    try:
        inc = Increment.load(fd)
        if inc.vault_uuid != state.vault_uuid or inc.version != version or inc.base_version != version + 1:
            raise IncrementError(f"{path.name} is not the increment from version {version + 1} to {version}")
        yield inc
    finally:
        os.close(fd)


class VersionView:
    """Reads one version of the set without writing anything: current.kv, then each
    increment down to the version wanted (write its extents, truncate to its size)."""

    def __init__(self, base_fd: int, base_size: int, layers: list[Increment], size: int) -> None:
        self.base_fd = base_fd
        self.base_size = base_size
        self.layers = layers
        self.size = size

    def read(self, offset: int, length: int) -> bytearray:
        end = min(offset + length, self.size)
        buf = bytearray(max(0, end - offset))
        if not buf:
            return buf
        base_end = min(end, self.base_size)
        if base_end > offset:
            data = read_exact(self.base_fd, base_end - offset, offset)
            buf[: len(data)] = data
        cur = self.base_size
        for inc in self.layers:
            if inc.size < cur and inc.size < end:
                cut = max(0, inc.size - offset)
                buf[cut:] = bytes(len(buf) - cut)
            cur = inc.size
            inc.overlay(buf, offset)
        return buf


@contextlib.contextmanager
def open_version(state: SetState, version: int) -> Iterator[VersionView]:
    """A reader for `version` (newest = current.kv, undoing an interrupted backup if any)."""
    if version not in state.manifests:
        if version in state.bad_manifests:
            why = state.bad_manifests[version]
            raise KryptvaultError(f"the manifest of version {version} is damaged: {why}")
        raise UsageError(f"the backup has no version {version} (it has {describe_versions(state)})")
    newest = state.newest
    assert newest is not None
    if newest not in state.manifests:
        raise KryptvaultError(f"the manifest of the newest version {newest} is damaged")
    try:
        base_fd = os.open(state.current_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error("open", state.current_path, exc)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, base_fd)
        layers: list[Increment] = []
        wanted = [newest] if state.pending == newest else []
        wanted += list(range(newest - 1, version - 1, -1))
        for v in wanted:
            if v not in state.increments:
                raise KryptvaultError(
                    f"the increment that rebuilds version {v} ({increment_name(v)}) is missing")
            layers.append(stack.enter_context(open_increment(state, v)))
        base_size = os.fstat(base_fd).st_size
        yield VersionView(base_fd, base_size, layers, state.manifests[version].size)


def describe_versions(state: SetState) -> str:
    versions = state.versions
    if not versions:
        return "no versions"
    return f"versions {versions[0]}..{versions[-1]}" if len(versions) > 1 else f"version {versions[0]}"
