"""Checking a backup set: without secrets (structure and checksums, naming every damaged
chunk and the container region it holds) and, with the vault's secrets, every block.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.backup.fsutil import read_exact
from kryptvault.backup.increment import FOOTER_SIZE, Increment, IncrementError
from kryptvault.backup.manifest import (
    ChunkSums,
    Manifest,
    chunk_count,
    chunk_length,
    increment_name,
    manifest_name,
)
from kryptvault.backup.restore import pick_version, reading_set, write_version
from kryptvault.backup.setdir import CURRENT, SetState, open_version
from kryptvault.container.groups import GroupGeometry
from kryptvault.container.layout import (
    COMMIT_OFFSETS,
    COMMIT_SLOT_SIZE,
    DATA_AREA_OFFSET,
    HEADER_COPY_SIZE,
    HEADER_OFFSETS,
    Layout,
)
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import store_keys
from kryptvault.errors import FormatError, IntegrityError, KryptvaultError
from kryptvault.session.unlock import AskSecret, unlock_container

Progress = Callable[[int, int], None]
UNIT = 4096


@dataclass(frozen=True)
class Problem:
    file: str  # the file of the set it is in ("current.kv", "v00000004.kvinc", ...)
    message: str
    chunk: int | None = None  # 1 MiB chunk of that file
    region: str = ""  # what of the container the damaged bytes hold

    def text(self) -> str:
        where = f" chunk {self.chunk}" if self.chunk is not None else ""
        region = f" [{self.region}]" if self.region else ""
        return f"{self.file}{where}: {self.message}{region}"

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "chunk": self.chunk, "message": self.message, "region": self.region}


@dataclass
class VerifyReport:
    set_path: Path
    vault_uuid: uuid.UUID
    versions: list[int]
    pending: int | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_bytes: int = 0
    rebuilt: list[int] = field(default_factory=list)  # versions rebuilt and checked in full
    blocks: dict[int, list[str]] = field(default_factory=dict)  # --full: version -> damage

    def add(self, file: str, message: str, chunk: int | None = None, region: str = "") -> None:
        self.problems.append(Problem(file, message, chunk, region))

    @property
    def ok(self) -> bool:
        return not self.problems and not any(self.blocks.values())

    def to_json(self) -> dict[str, object]:
        return {
            "backup": str(self.set_path),
            "vault_uuid": str(self.vault_uuid),
            "versions": self.versions,
            "interrupted_backup_pending": self.pending is not None,
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
            "notes": self.notes,
            "checked_bytes": self.checked_bytes,
            "rebuilt_versions": self.rebuilt,
            "block_damage": {str(v): d for v, d in self.blocks.items()},
        }


def describe_region(offset: int, length: int, block_size: int) -> str:
    """Which container structures bytes [offset, offset + length) hold (docs/FORMAT*.md)."""
    end = offset + length
    parts: list[str] = []
    fixed = [
        (HEADER_OFFSETS[0], HEADER_COPY_SIZE, "header copy A"),
        (HEADER_OFFSETS[1], HEADER_COPY_SIZE, "header copy B"),
        (COMMIT_OFFSETS[0], COMMIT_SLOT_SIZE, "commit slot 0"),
        (COMMIT_OFFSETS[1], COMMIT_SLOT_SIZE, "commit slot 1"),
        (COMMIT_OFFSETS[1] + COMMIT_SLOT_SIZE, DATA_AREA_OFFSET - COMMIT_OFFSETS[1] - COMMIT_SLOT_SIZE,
         "reserved area"),
    ]
    for start, size, name in fixed:
        if offset < start + size and end > start:
            parts.append(name)
    if end > DATA_AREA_OFFSET:
        geom = GroupGeometry(block_size, UNIT)
        first = (max(offset, DATA_AREA_OFFSET) - DATA_AREA_OFFSET) // UNIT
        last = (end - 1 - DATA_AREA_OFFSET) // UNIT
        text = f"data units {first}-{last}" if last > first else f"data unit {first}"
        g0, g1 = first // geom.units_per_group, last // geom.units_per_group
        c0 = first % geom.units_per_group // geom.units_per_chunk
        c1 = last % geom.units_per_group // geom.units_per_chunk
        if g0 == g1:
            text += f" (group {g0}, store chunk{'s' if c1 > c0 else ''} {c0}{f'-{c1}' if c1 > c0 else ''}"
            text += ", incl. its change table)" if c0 == 0 else ")"
        else:
            text += f" (groups {g0}-{g1}, incl. change tables)"
        parts.append(text)
    return ", ".join(parts)


def _check_sums(fd: int, sums: ChunkSums, name: str, describe: Callable[[int, int], str],
                report: VerifyReport, read: Callable[[int, int], bytes] | None = None,
                progress: Progress | None = None) -> None:
    reader = read or (lambda n, off: read_exact(fd, n, off))
    for index in range(chunk_count(sums.size, sums.chunk_size)):
        offset = index * sums.chunk_size
        want = chunk_length(index, sums.size, sums.chunk_size)
        data = reader(want, offset)
        report.checked_bytes += len(data)
        if len(data) != want:
            report.problems.append(Problem(name, f"is truncated (chunk ends at {offset + len(data)}, "
                                                 f"should end at {offset + want})", index,
                                           describe(offset, want)))
        elif hashlib.sha256(data).digest() != sums.sha256[index]:
            report.add(name, f"bytes {offset}..{offset + want} do not match their checksum", index,
                       describe(offset, want))
        if progress is not None:
            progress(report.checked_bytes, 0)


def _increment_region(inc: Increment | None, block_size: int, version: int) -> Callable[[int, int], str]:
    def describe(offset: int, length: int) -> str:
        if inc is None:
            return f"increment of version {version}; its extent table is unreadable"
        table_at = inc.file_size - FOOTER_SIZE - 16 * len(inc.offsets)
        parts = []
        for off, n in inc.extents_in_file_range(offset, offset + length)[:4]:
            parts.append(describe_region(off, n, block_size))
        if offset + length > table_at:
            parts.append("the increment's extent table/footer")
        return f"version {version}: " + "; ".join(parts)
    return describe


def verify_set(backup: Path, *, version: int | None = None, progress: Progress | None = None) -> VerifyReport:
    """Check every manifest, current.kv and every increment against their checksums and
    each other; with `version`, also rebuild that version and check it chunk by chunk."""
    with reading_set(Path(backup)) as state:
        report = VerifyReport(state.path, state.vault_uuid, state.versions, state.pending)
        _verify_state(state, report, progress)
        if version is not None:
            if version not in state.manifests:
                report.problems.append(Problem(manifest_name(version), "this version is not in the backup"))
            else:
                _verify_rebuilt(state, version, report, progress)
        return report


def _verify_state(state: SetState, report: VerifyReport, progress: Progress | None) -> None:
    for v, why in sorted(state.bad_manifests.items()):
        report.problems.append(Problem(manifest_name(v), why))
    every = sorted(set(state.manifests) | set(state.bad_manifests))
    if not every:
        report.problems.append(Problem(state.path.name, "holds no backup version"))
        return
    oldest, newest = every[0], every[-1]
    for v in range(oldest, newest + 1):
        if v not in every:
            report.problems.append(Problem(manifest_name(v), "is missing (versions must be consecutive)"))
    for v, m in sorted(state.manifests.items()):
        if v > oldest and m.previous is None:
            report.problems.append(Problem(manifest_name(v), "names no increment for the previous version"))
    for name in state.temps:
        report.notes.append(f"{name}: left over by an interrupted backup; the next backup removes it")
    for name in state.unknown:
        report.notes.append(f"{name}: not part of a backup set (ignored)")
    for v in sorted(state.increments):
        if (v < oldest or v > newest) and v != state.pending:
            report.notes.append(f"{increment_name(v)}: left over from pruning; the next backup removes it")
    # Increments: version v is rebuilt from v+1 by v's increment, described by manifest v+1.
    for v in range(oldest, newest):
        described = state.manifests.get(v + 1)
        _verify_increment(state, v, described, report, progress)
    # current.kv holds the newest version (through the pending undo, if a backup was cut short).
    top = state.manifests.get(newest)
    if top is None:
        report.add(CURRENT, f"cannot be checked: the manifest of version {newest} is damaged")
        return
    if not state.has_current:
        report.problems.append(Problem(CURRENT, "is missing"))
        return
    describe = _container_region(top.block_size, newest)
    if state.pending is not None:
        report.notes.append(
            f"an interrupted backup left current.kv partly updated; version {newest} is read through "
            f"{increment_name(newest)} (its undo file), and the next backup rolls it back")
        try:
            with open_version(state, newest) as view:
                if not view.layers[0].check_trailer():
                    report.add(increment_name(newest), "the undo file fails its checksum")
                _check_sums(-1, top.container, f"version {newest} (current.kv + undo)", describe, report,
                            read=lambda n, off: bytes(view.read(off, n)), progress=progress)
        except (KryptvaultError, OSError) as exc:
            report.problems.append(Problem(increment_name(newest), f"cannot be read: {exc}"))
        return
    fd = os.open(state.current_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size != top.size:
            report.add(CURRENT, f"is {size} bytes; version {newest} was {top.size} bytes")
        _check_sums(fd, top.container, CURRENT, describe, report, progress=progress)
    finally:
        os.close(fd)


def _container_region(block_size: int, version: int) -> Callable[[int, int], str]:
    return lambda offset, length: f"version {version}: " + describe_region(offset, length, block_size)


def _verify_increment(state: SetState, v: int, described: Manifest | None, report: VerifyReport,
                      progress: Progress | None) -> None:
    name = increment_name(v)
    if v not in state.increments:
        report.problems.append(Problem(name, f"is missing: version {v} cannot be rebuilt"))
        return
    older = state.manifests.get(v)
    either = older or described
    block_size = either.block_size if either is not None else 65536
    try:
        fd = os.open(state.increment_path(v), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        report.problems.append(Problem(name, f"cannot be opened: {exc.strerror}"))
        return
    try:
        inc: Increment | None
        try:
            inc = Increment.load(fd)
        except IncrementError as exc:
            inc = None
            report.problems.append(Problem(name, str(exc)))
        if described is None:
            report.add(name, f"cannot be checked: the manifest of version {v + 1} is damaged")
        elif described.previous is not None:
            sums = described.previous.sums
            size = os.fstat(fd).st_size
            if size != sums.size:
                report.problems.append(Problem(name, f"is {size} bytes; the manifest says {sums.size}"))
            _check_sums(fd, sums, name, _increment_region(inc, block_size, v), report, progress=progress)
        if inc is not None:
            wrong = []
            if inc.vault_uuid != state.vault_uuid:
                wrong.append("another vault")
            if inc.version != v or inc.base_version != v + 1:
                wrong.append(f"versions {inc.base_version}->{inc.version}")
            if older is not None and inc.size != older.size:
                wrong.append(f"size {inc.size} for version {v} (manifest: {older.size})")
            if described is not None and inc.base_size != described.size:
                wrong.append(f"base size {inc.base_size} (manifest: {described.size})")
            if wrong:
                report.add(name, "footer does not match the manifests: " + ", ".join(wrong))
    finally:
        os.close(fd)


def _verify_rebuilt(state: SetState, version: int, report: VerifyReport, progress: Progress | None) -> None:
    manifest = state.manifests[version]
    label = f"version {version} (rebuilt)"
    try:
        with open_version(state, version) as view:
            describe = _container_region(manifest.block_size, version)
            _check_sums(-1, manifest.container, label, describe, report,
                        read=lambda n, off: bytes(view.read(off, n)), progress=progress)
            report.rebuilt.append(version)
    except (KryptvaultError, OSError) as exc:
        report.problems.append(Problem(label, f"cannot be rebuilt: {exc}"))


# ---------------------------------------------------------------------- with the key
@contextlib.contextmanager
def materialized(state: SetState, version: int) -> Iterator[Path]:
    """A path holding the version as a container: current.kv itself for the newest version
    (unless a backup was cut short), else an anonymous rebuilt file (never left behind)."""
    if version == state.newest and state.pending is None:
        yield state.current_path
        return
    manifest = state.manifests[version]
    with open_version(state, version) as view:
        fd = _anonymous_file(state.path)
        try:
            write_version(view, manifest, fd)
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)


def _anonymous_file(near: Path) -> int:
    for directory in (near, Path(tempfile.gettempdir())):
        with contextlib.suppress(OSError):
            return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    handle = tempfile.TemporaryFile()  # noqa: SIM115
    fd = os.dup(handle.fileno())
    handle.close()
    return fd


def verify_blocks(
    backup: Path,
    version: int | None,
    *,
    token_spec: str | None,
    ask_password: AskSecret,
    ask_recovery_key: AskSecret | None,
) -> tuple[int, int, list[str]]:
    """Unlock the version's own header and authenticate every block reachable from its
    commit record: (version, commit generation, damage descriptions)."""
    with reading_set(Path(backup)) as state:
        wanted = pick_version(state, version)
        if wanted not in state.manifests:
            raise KryptvaultError(f"the backup has no readable version {wanted}")
        with materialized(state, wanted) as path:
            generation, found = verify_container_blocks(
                path, token_spec=token_spec, ask_password=ask_password, ask_recovery_key=ask_recovery_key)
        return wanted, generation, found


def verify_container_blocks(
    path: Path,
    *,
    token_spec: str | None,
    ask_password: AskSecret,
    ask_recovery_key: AskSecret | None,
) -> tuple[int, list[str]]:
    """Unlock one container file (a rebuilt version) and authenticate every block:
    (commit generation, damage descriptions)."""
    unlocked = unlock_container(path, token_spec=token_spec, ask_password=ask_password,
                                ask_recovery_key=ask_recovery_key)
    with unlocked:
        keys = store_keys(unlocked.master, unlocked.vault_uuid)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            layout = Layout(block_size=unlocked.header.layout.block_size)
            try:
                store = ObjectStore.open(fd, layout, unlocked.vault_uuid, keys.data, keys.meta,
                                         read_only=True)
            except (IntegrityError, FormatError) as exc:
                return 0, [f"the object store does not open: {exc}"]
            try:
                damage = store.verify()
                generation = store.generation
            finally:
                store.close()
        finally:
            os.close(fd)
            keys.wipe()
    found = [
        f"object {d.oid} stream {d.stream} "
        + (f"level {d.level} block {d.index}" if d.level >= 0 else "")
        + f": {d.reason}"
        for d in damage
    ]
    return generation, found


__all__ = ["Problem", "VerifyReport", "describe_region", "verify_blocks", "verify_container_blocks",
           "verify_set"]
