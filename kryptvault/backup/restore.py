"""Rebuilding one version of a backup set into a container file, atomically and checked.

The version is read through current.kv and the increments (setdir.VersionView), every
1 MiB chunk is compared with the version's manifest before it is written, and the result
goes to a temporary file next to the target that is fsync-ed and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kryptvault.backup.fsutil import StepHook, fsync_dir, locked_dir, os_error, write_sparse
from kryptvault.backup.manifest import CHUNK_SIZE, Manifest, chunk_count, chunk_length
from kryptvault.backup.setdir import SetState, VersionView, find_set, load_state, open_version
from kryptvault.errors import IntegrityError, KryptvaultError, UsageError

Progress = Callable[[int, int], None]


@dataclass
class RestoreResult:
    vault_uuid: uuid.UUID
    version: int
    newest: int
    manifest: Manifest
    target: Path

    def to_json(self) -> dict[str, object]:
        return {
            "vault_uuid": str(self.vault_uuid),
            "version": self.version,
            "newest_version": self.newest,
            "backed_up": self.manifest.created_text,
            "container_size": self.manifest.size,
            "generation": self.manifest.generation,
            "container": str(self.target),
        }


def busy_message(set_path: Path) -> str:
    return f"a backup into {set_path} is running; try again when it has finished"


@contextlib.contextmanager
def reading_set(backup: Path) -> Iterator[SetState]:
    set_path, vault = find_set(backup)
    with locked_dir(set_path, False, busy_message(set_path)):
        yield load_state(set_path, vault)


def pick_version(state: SetState, version: int | None) -> int:
    if version is None:
        newest = state.newest
        if newest is None:
            raise KryptvaultError(f"{state.path} holds no complete backup version")
        return newest
    return version


def write_version(view: VersionView, manifest: Manifest, fd: int, progress: Progress | None = None) -> None:
    """Write the version into fd (sparse), checking every chunk against the manifest."""
    hook = StepHook()
    os.ftruncate(fd, manifest.size)
    for index in range(chunk_count(manifest.size)):
        offset = index * CHUNK_SIZE
        data = view.read(offset, chunk_length(index, manifest.size))
        if hashlib.sha256(data).digest() != manifest.container.sha256[index]:
            raise IntegrityError(
                f"version {manifest.version} does not rebuild correctly: chunk {index} "
                f"(bytes {offset}..{offset + len(data)}) fails its checksum; "
                "run 'kryptvault verify' on the backup to find the damaged file")
        write_sparse(fd, data, offset, hook)
        if progress is not None:
            progress(offset + len(data), manifest.size)
    os.fsync(fd)


def restore_target(target: Path, force: bool) -> Path:
    """Refuse a target a restore must not write; its directory otherwise."""
    if target.is_dir():
        raise UsageError(f"{target} is a directory, not a container file")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists (use --force to overwrite it)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"the directory {parent} does not exist")
    return parent


@contextlib.contextmanager
def new_container_file(target: Path, parent: Path) -> Iterator[int]:
    """A descriptor of a new temporary file beside `target`: renamed over it (and the
    directory fsync-ed) when the block ends, removed if it raises, so a restore never
    leaves a partly written container under the target's name."""
    tmp = parent / f".{target.name}.kv-restore-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise os_error("create", tmp, exc)
    try:
        try:
            yield fd
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(parent)
    except OSError as exc:
        raise os_error("write", target, exc)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def run_restore(backup: Path, version: int | None, target: Path, *, force: bool = False,
                progress: Progress | None = None) -> RestoreResult:
    target = Path(target)
    parent = restore_target(target, force)
    with reading_set(Path(backup)) as state:
        wanted = pick_version(state, version)
        with open_version(state, wanted) as view, _target_lock(target):
            manifest = state.manifests[wanted]
            with new_container_file(target, parent) as fd:
                write_version(view, manifest, fd, progress)
        newest = state.newest
        assert newest is not None
        return RestoreResult(state.vault_uuid, wanted, newest, manifest, target)


@contextlib.contextmanager
def _target_lock(target: Path) -> Iterator[None]:
    """Refuse to replace a container that a mount daemon holds (it locks it exclusively)."""
    if not target.exists():
        yield
        return
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error("open", target, exc)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KryptvaultError(f"{target} is mounted; lock or unmount it before restoring over it")
        yield
    finally:
        os.close(fd)
