"""Backing a container up into a backup set, without any key (docs/BACKUP.md).

First backup: a sparse copy of the container becomes current.kv (version 1).

Later backups (incremental): the container's plaintext change tables name the 64 KiB
chunks written since the generation of the last backup (`changed_chunks_since`). Only
those ranges (and always [0, 64 KiB): header copies and commit slots) are read from the
container. Each 1 MiB chunk of current.kv that they touch is read from DEST, checked
against the last manifest, patched, and compared at 4 KiB granularity: the old bytes of
every differing 4 KiB piece go to the increment (which rebuilds the older version), the
new bytes into current.kv. Two ways to get the new bytes into current.kv:

* clone / copy: current.kv is cloned (reflink) or copied to a temporary file, which is
  patched and renamed over current.kv. current.kv is a complete container at every
  instant. Chosen automatically when DEST's filesystem can clone (btrfs, XFS, ...).
* in-place (the default elsewhere): the increment is made durable and renamed into place
  first, then current.kv is patched in place, then the new manifest is renamed into
  place (the commit point). If the backup dies before that, the increment is the undo
  journal: the next backup applies it, and verify/restore/list apply it on the fly. This
  costs about what changed instead of a full copy of the container (measured: copying
  1 GiB on ext4 costs ~30 % of a full backup; an incremental of 1 MiB costs ~1 %).

The commit order, the rollback and the kill tests are described in docs/BACKUP.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.backup.fsutil import (
    StepHook,
    create_exclusive,
    data_extents,
    fsync,
    fsync_dir,
    locked_dir,
    os_error,
    read_exact,
    rename,
    try_clone,
    unlink,
    write_all,
    write_sparse,
)
from kryptvault.backup.fsutil import copy_file as copy_whole_file
from kryptvault.backup.increment import IncrementWriter
from kryptvault.backup.manifest import (
    CHUNK_SIZE,
    ChunkHasher,
    ChunkSums,
    Manifest,
    PreviousRef,
    chunk_count,
    chunk_length,
    increment_name,
)
from kryptvault.backup.setdir import (
    TMP_PREFIX,
    SetState,
    load_state,
    open_increment,
    set_for_backup,
    set_lineage,
    write_set_lineage,
)
from kryptvault.backup.source import LiveHold, Source, open_source
from kryptvault.container.groups import GroupGeometry, changed_chunks_since, decode_descriptor
from kryptvault.container.layout import COMMIT_OFFSETS, COMMIT_SLOT_SIZE, DATA_AREA_OFFSET, Layout
from kryptvault.errors import IntegrityError, KryptvaultError, UsageError
from kryptvault.session.lineages import known_lineage

DEFAULT_KEEP = 7
DIFF_UNIT = 4096
FORWARD_MEMORY = 64 << 20
STRATEGIES = ("auto", "in-place", "clone", "copy")
ZERO_UNIT = bytes(DIFF_UNIT)

Progress = Callable[[int, int], None]

# TEST-ONLY hook: with KRYPTVAULT_TEST_BACKUP_SLOW_MS=N set, every 1 MiB chunk copied from
# the container sleeps N ms, so tests can act while a backup is copying. Never set it otherwise.
TEST_SLOW_ENV = "KRYPTVAULT_TEST_BACKUP_SLOW_MS"


def _test_slow_chunk() -> None:
    raw = os.environ.get(TEST_SLOW_ENV)
    if raw:
        time.sleep(int(raw) / 1000)
Descriptors = list["array[int] | None"]


class BackupDamaged(IntegrityError):
    """The backup set itself is damaged; the backup cannot build on it."""


@dataclass
class BackupResult:
    vault_uuid: uuid.UUID
    set_path: Path
    version: int
    method: str  # full / incremental / rescan
    live: bool
    strategy: str  # new / in-place / clone / copy
    generation: int
    container_size: int
    source_bytes_read: int
    bytes_written: int
    increment_bytes: int  # size of the increment that rebuilds the previous version
    changed_ranges: int
    seconds: float
    versions: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "vault_uuid": str(self.vault_uuid),
            "backup": str(self.set_path),
            "version": self.version,
            "method": self.method,
            "live": self.live,
            "strategy": self.strategy,
            "generation": self.generation,
            "container_size": self.container_size,
            "source_bytes_read": self.source_bytes_read,
            "bytes_written": self.bytes_written,
            "increment_bytes": self.increment_bytes,
            "changed_ranges": self.changed_ranges,
            "seconds": round(self.seconds, 3),
            "versions": self.versions,
            "pruned": self.pruned,
            "notes": self.notes,
        }


class _Temps:
    """Temporary files of one backup run: unlinked at the end unless renamed into place."""

    def __init__(self, directory: Path, hook: StepHook) -> None:
        self.directory = directory
        self.hook = hook
        self.paths: list[Path] = []

    def new(self, what: str) -> tuple[Path, int]:
        path = self.directory / f"{TMP_PREFIX}{what}-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = create_exclusive(path)
        except OSError as exc:
            raise os_error("write the backup into", self.directory, exc)
        self.hook.tick()
        self.paths.append(path)
        return path, fd

    def write_file(self, what: str, data: bytes) -> Path:
        path, fd = self.new(what)
        try:
            write_all(fd, data, 0, self.hook)
            fsync(fd, self.hook)
        finally:
            os.close(fd)
        return path

    def renamed(self, path: Path) -> None:
        self.paths.remove(path)

    def cleanup(self) -> None:
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.unlink()
        self.paths.clear()


class _Forward:
    """New bytes bound for current.kv: written straight into a patched copy, or (in-place)
    kept until the increment is durable, in memory up to a limit and then in a temp file."""

    def __init__(self, temps: _Temps, direct_fd: int | None, limit: int = FORWARD_MEMORY) -> None:
        self._temps = temps
        self._direct = direct_fd
        self._limit = limit
        self._mem: list[tuple[int, bytes]] = []
        self._mem_bytes = 0
        self._spill_fd = -1
        self._spill_pos = 0
        self._spilled: list[tuple[int, int, int]] = []  # (offset, length, position in spill)
        self.bytes = 0

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.bytes += len(data)
        if self._direct is not None:
            write_all(self._direct, data, offset, self._temps.hook)
            return
        if self._spill_fd < 0 and self._mem_bytes + len(data) > self._limit:
            _path, self._spill_fd = self._temps.new("forward")
            for off, mem in self._mem:
                self._spill(off, mem)
            self._mem.clear()
        if self._spill_fd >= 0:
            self._spill(offset, data)
        else:
            self._mem.append((offset, bytes(data)))
            self._mem_bytes += len(data)

    def _spill(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        write_all(self._spill_fd, data, self._spill_pos, self._temps.hook)
        self._spilled.append((offset, len(data), self._spill_pos))
        self._spill_pos += len(data)

    def items(self) -> Iterator[tuple[int, bytes]]:
        yield from self._mem
        for offset, length, pos in self._spilled:
            yield offset, read_exact(self._spill_fd, length, pos)

    def close(self) -> None:
        if self._spill_fd >= 0:
            os.close(self._spill_fd)
            self._spill_fd = -1


# ---------------------------------------------------------------------- change tables
def read_descriptors(read: Callable[[int, int], bytes], layout: Layout, size: int) -> Descriptors:
    """Each group's per-chunk generations (None where the descriptor is missing or torn)."""
    geom = GroupGeometry(layout.block_size, layout.unit_size)
    group_bytes = geom.units_per_group * layout.unit_size
    out: Descriptors = []
    group = 0
    while True:
        start = layout.data_offset + group * group_bytes
        if start >= size:
            return out
        raw = read(layout.block_size, start)
        out.append(decode_descriptor(geom, group, raw) if len(raw) == layout.block_size else None)
        group += 1


class HistoryMismatch(KryptvaultError):
    """The container is not a later state of the copy in the backup set."""


def max_generation(descriptors: Descriptors) -> int:
    return max((max(d) for d in descriptors if d is not None and len(d)), default=0)


def _continuity_problem(src: Descriptors, old: Descriptors, old_size: int, layout: Layout,
                        since: int, src_max: int, previous: Manifest) -> str | None:
    """Why the container does not continue the last backup's history, or None. A chunk
    the change tables call unchanged since `since` must carry the same generation in the
    backup's copy; a container restored from an older copy and written again does not."""
    floor = previous.generation - (0 if previous.generation_exact else 1)
    if src_max < floor:
        return (f"its change tables end at generation {src_max}, before the last backup's "
                f"{previous.generation}")
    geom = GroupGeometry(layout.block_size, layout.unit_size)
    group_bytes = geom.units_per_group * layout.unit_size
    for group, sd in enumerate(src):
        if sd is None:
            continue
        od = old[group] if group < len(old) else None
        if od is not None and od == sd:
            continue
        existed = layout.data_offset + group * group_bytes < old_size
        if od is None and existed:
            continue  # the copy's descriptor is torn (e.g. copied live): cannot compare
        for chunk, gen in enumerate(sd):
            if 0 < gen <= since and (od is None or od[chunk] != gen):
                return f"chunk {chunk} of group {group} was written at generation {gen} in another history"
    return None


def _split_by_chunk(ranges: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    pieces: dict[int, list[tuple[int, int]]] = {}
    for offset, length in ranges:
        pos, end = offset, offset + length
        while pos < end:
            index = pos // CHUNK_SIZE
            stop = min(end, (index + 1) * CHUNK_SIZE)
            pieces.setdefault(index, []).append((pos, stop))
            pos = stop
    return pieces


def _runs(units: list[int]) -> list[tuple[int, int]]:
    """Sorted unit starts (multiples of DIFF_UNIT) → merged [start, end) runs."""
    out: list[tuple[int, int]] = []
    for u in units:
        if out and out[-1][1] == u:
            out[-1] = (out[-1][0], u + DIFF_UNIT)
        else:
            out.append((u, u + DIFF_UNIT))
    return out


# ---------------------------------------------------------------------- recovery
def _verify_chunks(fd: int, manifest: Manifest, chunks: set[int]) -> list[int]:
    bad = []
    for i in sorted(chunks):
        if i >= len(manifest.container.sha256):
            continue
        data = read_exact(fd, chunk_length(i, manifest.size), i * CHUNK_SIZE)
        if hashlib.sha256(data).digest() != manifest.container.sha256[i]:
            bad.append(i)
    return bad


def _lock_current(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise KryptvaultError(f"{path} is in use (is the backup copy mounted?)")


def roll_back(state: SetState, version: int, hook: StepHook, fd: int | None = None) -> None:
    """Undo an interrupted backup: apply the newest version's increment to current.kv
    (opened and locked here unless the caller passes its own locked `fd`)."""
    manifest = state.manifests[version]
    path = state.current_path
    own = fd is None
    if fd is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise os_error("open", path, exc)
    try:
        if own:
            _lock_current(fd, path)
        with open_increment(state, version) as inc:
            if not inc.check_trailer() or inc.size != manifest.size:
                raise BackupDamaged(
                    f"{increment_name(version)}, the undo file of an interrupted backup, is damaged; "
                    f"run 'kryptvault verify {state.path}'")
            try:
                inc.apply(fd, hook)
                fsync(fd, hook)
            except OSError as exc:
                raise os_error("roll back the interrupted backup in", state.path, exc)
            touched = {off // CHUNK_SIZE for off in inc.offsets}
            touched |= {(off + length - 1) // CHUNK_SIZE for off, length in zip(inc.offsets, inc.lengths,
                                                                                strict=True)}
            touched.add(max(0, manifest.size - 1) // CHUNK_SIZE)
            bad = _verify_chunks(fd, manifest, touched)
            if bad:
                raise BackupDamaged(
                    f"rolling back the interrupted backup left current.kv chunk(s) {bad} wrong; "
                    f"run 'kryptvault verify {state.path}'")
    finally:
        if own:
            os.close(fd)
    unlink(state.increment_path(version), hook)
    fsync_dir(state.path, hook)


def recover(state: SetState, hook: StepHook) -> list[str]:
    """Bring the set back to its last committed state after an interrupted backup."""
    notes: list[str] = []
    if state.bad_manifests:
        version, why = sorted(state.bad_manifests.items())[-1]
        raise BackupDamaged(f"the manifest of version {version} is damaged ({why}); "
                            f"run 'kryptvault verify {state.path}'")
    changed = False
    try:
        for name in state.temps:
            unlink(state.path / name, hook)
            changed = True
        if not state.manifests:
            # Nothing was ever committed: leftovers of a first backup that did not finish.
            if state.has_current:
                unlink(state.current_path, hook)
                changed = True
            for v in sorted(state.increments):
                unlink(state.increment_path(v), hook)
                changed = True
        else:
            if not state.has_current:
                raise BackupDamaged(f"{state.current_path} is missing; the backup cannot be continued")
            newest = max(state.manifests)
            oldest = min(state.manifests)
            if state.pending is not None:
                roll_back(state, state.pending, hook)
                notes.append("rolled back an interrupted backup")
            for v in sorted(state.increments):
                if v < oldest or v > newest:
                    unlink(state.increment_path(v), hook)  # left over from pruning
                    changed = True
        if changed:
            fsync_dir(state.path, hook)
    except OSError as exc:
        raise os_error("clean up the backup in", state.path, exc)
    return notes


# ---------------------------------------------------------------------- backup
def run_backup(
    container: Path,
    dest: Path,
    *,
    keep: int = DEFAULT_KEEP,
    rescan: bool = False,
    strategy: str = "auto",
    progress: Progress | None = None,
    live_hold: LiveHold | None = None,
    find_daemon: Callable[[uuid.UUID], LiveHold | None] | None = None,
    clock: Callable[[], int] = time.time_ns,
) -> BackupResult:
    """Back CONTAINER up into DEST (first time: full copy; then incremental)."""
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    hook = StepHook.from_env()
    started = time.monotonic()
    dest = Path(dest)
    with open_source(Path(container), live_hold, find_daemon) as src:
        set_path, created = set_for_backup(dest, src.vault_uuid)
        if created:
            hook.tick()
        temps = _Temps(set_path, hook)
        try:
            if created:
                fsync_dir(dest, hook)
            with locked_dir(set_path, True, f"another backup into {set_path} is running"):
                state = load_state(set_path, src.vault_uuid)
                notes = recover(state, hook)
                state = load_state(set_path, src.vault_uuid)
                known = known_lineage(Path(container), src.vault_uuid)
                if state.manifests:
                    _refuse_other_lineage(Path(container), state, known, rescan)
                if not state.manifests:
                    result = _full_backup(src, state, temps, progress, clock)
                else:
                    result = _incremental(src, state, temps, strategy, rescan, progress, clock)
                if known is not None and known != set_lineage(set_path):
                    write_set_lineage(set_path, known)  # a new set, or --full: now its history
                result.notes[:0] = notes
                result.pruned = _prune(load_state(set_path, src.vault_uuid), keep, hook)
                result.versions = load_state(set_path, src.vault_uuid).versions
        except BaseException:
            temps.cleanup()
            if created:
                with contextlib.suppress(OSError):
                    set_path.rmdir()
            raise
        temps.cleanup()
    result.seconds = time.monotonic() - started
    return result


def _refuse_other_lineage(container: Path, state: SetState, known: bytes | None, rescan: bool) -> None:
    """A container known (from its mounts here) to be of another lineage than the set's
    versions is another history of the same vault: never mixed in silently."""
    theirs = set_lineage(state.path)
    if known is None or known == theirs or rescan:
        return

    def name(lineage: bytes) -> str:
        return "the original lineage" if lineage == bytes(16) else f"lineage {lineage.hex()[:12]}"
    raise HistoryMismatch(
        f"{container} is {name(known)} of vault {state.vault_uuid} but the backup set "
        f"{state.path} holds {name(theirs)}: its versions would mix two histories; back it up "
        "to a destination of its own, or, if it now replaces the vault, pass --full"
    )


def _generation(src: Source, descriptors: Descriptors) -> tuple[int, bool]:
    if src.live_generation is not None:
        return src.live_generation, True
    return max_generation(descriptors), False


def _source_descriptors(src: Source) -> Descriptors:
    return read_descriptors(lambda n, off: src.read(n, off), src.layout, src.size)


def _full_backup(src: Source, state: SetState, temps: _Temps, progress: Progress | None,
                 clock: Callable[[], int]) -> BackupResult:
    hook = temps.hook
    size = src.size
    descriptors = _source_descriptors(src)
    generation, exact = _generation(src, descriptors)
    extents = [(0, min(size, DATA_AREA_OFFSET)), *data_extents(src.fd, DATA_AREA_OFFSET, size)]
    total = sum(length for _o, length in extents)
    pieces = _split_by_chunk(extents)
    hasher = ChunkHasher()
    tmp, fd = temps.new("current")
    written = 0
    done = 0
    try:
        try:
            os.ftruncate(fd, size)
            hook.tick()
            for index in range(chunk_count(size)):
                c0 = index * CHUNK_SIZE
                buf = bytearray(chunk_length(index, size))
                for a, b in pieces.get(index, []):
                    buf[a - c0 : b - c0] = src.read(b - a, a)
                    done += b - a
                if index in pieces:
                    _test_slow_chunk()
                hasher.update(buf)
                written += write_sparse(fd, buf, c0, hook)
                if progress is not None:
                    progress(done, total)
            fsync(fd, hook)
        finally:
            os.close(fd)
        src.end_reads()  # a live hold lost before this point discards the copy
        manifest = Manifest(
            vault_uuid=src.vault_uuid, version=1, created_ns=clock(), method="full", live=src.live,
            block_size=src.layout.block_size, header_sequence=src.header.sequence,
            generation=generation, generation_exact=exact, container=hasher.finish(), previous=None,
            source_bytes_read=src.bytes_read,
        )
        encoded = manifest.encode()
        mtmp = temps.write_file("manifest", encoded)
        rename(tmp, state.current_path, hook)
        temps.renamed(tmp)
        fsync_dir(state.path, hook)
        rename(mtmp, state.manifest_path(1), hook)
        temps.renamed(mtmp)
        fsync_dir(state.path, hook)
    except OSError as exc:
        raise os_error("write the backup into", state.path, exc)
    return BackupResult(
        src.vault_uuid, state.path, 1, "full", src.live, "new", generation, size, src.bytes_read,
        written + len(encoded), 0, len(extents), 0.0)


def _incremental(src: Source, state: SetState, temps: _Temps, strategy: str, rescan: bool,
                 progress: Progress | None, clock: Callable[[], int]) -> BackupResult:
    newest = max(state.manifests)
    previous = state.manifests[newest]
    version = newest + 1
    layout = src.layout
    notes: list[str] = []
    path = state.current_path
    try:
        cur = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error("write the backup into", state.path, exc)
    try:
        _lock_current(cur, path)
        old_size = os.fstat(cur).st_size
        if old_size != previous.size:
            raise BackupDamaged(f"{path} is {old_size} bytes but version {newest} was {previous.size}; "
                                f"run 'kryptvault verify {state.path}'")
        descriptors = _source_descriptors(src)
        src_max = max_generation(descriptors)
        generation, exact = _generation(src, descriptors)
        method = "incremental"
        ranges: list[tuple[int, int]]
        if previous.block_size != layout.block_size:
            rescan = True
            notes.append("the container's block size differs from the last backup's")
        if not rescan:
            since = previous.generation
            if not previous.generation_exact:
                # An offline copy's generation is the highest in the change tables; a commit
                # that crashed after writing them leaves them one ahead of the durable commit.
                # If that generation's commit slot changed since, that commit came later.
                slot = COMMIT_OFFSETS[previous.generation % 2]
                if src.read(COMMIT_SLOT_SIZE, slot) != read_exact(cur, COMMIT_SLOT_SIZE, slot):
                    since = max(0, since - 1)
            old_descriptors = read_descriptors(lambda n, off: read_exact(cur, n, off), layout, old_size)
            problem = _continuity_problem(descriptors, old_descriptors, old_size, layout, since, src_max,
                                          previous)
            if problem is not None:
                # A restored or forked copy (same UUID, another history): its versions would
                # mix with the vault's, and --keep would prune the vault's. Only an explicit
                # --full (the vault itself was replaced by a restored copy) goes on.
                raise HistoryMismatch(
                    f"{src.path} does not continue the history of the backup set {state.path} "
                    f"({problem}): it is a restored or forked copy of the vault; back it up to a "
                    "destination of its own, or, if it now replaces the vault, pass --full"
                )
            else:
                ranges = changed_chunks_since(src.fd, layout, since)
                src.count(len(descriptors) * layout.block_size)
        if rescan:
            method = "rescan"
            ranges = [(0, src.size)]
        ranges = _clip(ranges, src.size)
        return _apply_changes(src, state, temps, cur, previous, version, ranges, strategy, method,
                              generation, exact, notes, progress, clock)
    finally:
        os.close(cur)


def _clip(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out = [(0, min(size, DATA_AREA_OFFSET))]
    for off, length in ranges:
        lo, hi = max(off, out[-1][0] + out[-1][1]), min(off + length, size)
        if lo >= hi:
            continue
        if lo == out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], hi - out[-1][0])
        else:
            out.append((lo, hi - lo))
    return out


def _apply_changes(src: Source, state: SetState, temps: _Temps, cur: int, previous: Manifest, version: int,
                   ranges: list[tuple[int, int]], strategy: str, method: str, generation: int, exact: bool,
                   notes: list[str], progress: Progress | None, clock: Callable[[], int]) -> BackupResult:
    hook = temps.hook
    old_size, new_size = previous.size, src.size
    newest = previous.version
    mode = "in-place"
    work_fd = -1
    work_path: Path | None = None
    try:
        if strategy in ("auto", "clone", "copy"):
            work_path, work_fd = temps.new("current")
            if try_clone(cur, work_fd):
                mode = "clone"
                hook.tick()
            elif strategy == "copy":
                copy_whole_file(cur, work_fd, old_size, hook)
                mode = "copy"
            else:
                os.close(work_fd)
                work_fd = -1
                unlink(work_path, hook)
                temps.renamed(work_path)
                work_path = None
                if strategy == "clone":
                    raise UsageError(f"the filesystem of {state.path} cannot clone files (reflink); "
                                     "use --strategy in-place or copy")
            if work_fd >= 0 and new_size > old_size:
                os.ftruncate(work_fd, new_size)
                hook.tick()
        inc_path, inc_fd = temps.new("increment")
        forward = _Forward(temps, work_fd if work_fd >= 0 else None)
        try:
            writer = IncrementWriter(inc_fd, hook)
            new_sums = _patch_chunks(src, cur, previous, ranges, writer, forward, progress)
            src.end_reads()  # a live hold lost before this point discards the copy
            inc_sums = writer.finish(state.vault_uuid, newest, version, old_size, new_size)
            fsync(inc_fd, hook)
            if work_fd >= 0:
                if new_size < old_size:
                    os.ftruncate(work_fd, new_size)
                    hook.tick()
                fsync(work_fd, hook)
            manifest = Manifest(
                vault_uuid=state.vault_uuid, version=version, created_ns=clock(), method=method,
                live=src.live, block_size=src.layout.block_size, header_sequence=src.header.sequence,
                generation=generation, generation_exact=exact, container=ChunkSums(new_size, new_sums),
                previous=PreviousRef(newest, increment_name(newest), inc_sums),
                source_bytes_read=src.bytes_read,
            )
            encoded = manifest.encode()
            mtmp = temps.write_file("manifest", encoded)
            _commit(state, temps, newest, version, inc_path, mtmp, work_path, cur, forward, new_size,
                    old_size)
        finally:
            os.close(inc_fd)
            forward.close()
    except OSError as exc:
        raise os_error("write the backup into", state.path, exc)
    finally:
        if work_fd >= 0:
            os.close(work_fd)
    return BackupResult(
        state.vault_uuid, state.path, version, method, src.live, mode, generation, new_size, src.bytes_read,
        inc_sums.size + forward.bytes + len(encoded), inc_sums.size, len(ranges), 0.0, notes=notes)


def _patch_chunks(src: Source, cur: int, previous: Manifest, ranges: list[tuple[int, int]],
                  inc: IncrementWriter, forward: _Forward, progress: Progress | None) -> tuple[bytes, ...]:
    """The heart of an incremental backup: per touched 1 MiB chunk, old bytes from DEST
    (checked), new bytes from the source ranges, 4 KiB diff → increment + forward writes.
    Returns the new version's chunk checksums."""
    old_size, new_size = previous.size, src.size
    old_sums = previous.container.sha256
    pieces = _split_by_chunk(ranges)
    touched = set(pieces)
    if new_size != old_size:
        lo, hi = min(old_size, new_size), max(old_size, new_size)
        touched.update(range(lo // CHUNK_SIZE, (hi - 1) // CHUNK_SIZE + 1))
    n_new = chunk_count(new_size)
    sums: list[bytes] = list(old_sums[:n_new])
    zero_sums: dict[int, bytes] = {}
    for index in range(len(sums), n_new):  # growth past the old end: holes unless touched
        length = chunk_length(index, new_size)
        if length not in zero_sums:
            zero_sums[length] = hashlib.sha256(bytes(length)).digest()
        sums.append(zero_sums[length])
    total = sum(length for _o, length in ranges)
    done = 0
    for index in sorted(touched):
        c0 = index * CHUNK_SIZE
        old_len, new_len = chunk_length(index, old_size), chunk_length(index, new_size)
        old = read_exact(cur, old_len, c0)
        if len(old) != old_len or (old_len and hashlib.sha256(old).digest() != old_sums[index]):
            raise BackupDamaged(
                f"the backup's current.kv is damaged in chunk {index} (bytes {c0}..{c0 + old_len}); "
                "run 'kryptvault verify' on the backup, and move the damaged set aside to start a new one")
        new = bytearray(new_len)
        common = min(old_len, new_len)
        new[:common] = old[:common]
        diff_units: list[int] = []
        grow_units: list[int] = []
        if index in pieces:
            _test_slow_chunk()
        for a, b in pieces.get(index, []):
            b = min(b, c0 + new_len)
            if a >= b:
                continue
            new[a - c0 : b - c0] = src.read(b - a, a)
            done += b - a
            first = (a - c0) // DIFF_UNIT * DIFF_UNIT
            for u in range(first, b - c0, DIFF_UNIT):
                if u < common:
                    if old[u : u + DIFF_UNIT] != new[u : u + DIFF_UNIT]:
                        diff_units.append(u)
                elif new[u : u + DIFF_UNIT] != ZERO_UNIT[: len(new[u : u + DIFF_UNIT])]:
                    grow_units.append(u)
        for s, e in _runs(sorted(set(diff_units))):
            e = min(e, common)
            inc.add(c0 + s, old[s:e])
            forward.add(c0 + s, new[s:e])
        if old_len > new_len:
            inc.add(c0 + new_len, old[new_len:])
        for s, e in _runs(sorted(set(grow_units))):
            forward.add(c0 + s, new[s : min(e, new_len)])
        if new_len:
            sums[index] = hashlib.sha256(new).digest()
        if progress is not None:
            progress(done, total)
    return tuple(sums)


def _commit(state: SetState, temps: _Temps, newest: int, version: int, inc_tmp: Path, manifest_tmp: Path,
            work_path: Path | None, cur: int, forward: _Forward, new_size: int, old_size: int) -> None:
    """Make the new version current. Until the manifest is renamed into place, the renamed
    increment is an undo journal: on any failure it is applied at once (or by the next run)."""
    hook = temps.hook
    rename(inc_tmp, state.increment_path(newest), hook)
    temps.renamed(inc_tmp)
    committed = False
    replaced = False  # current.kv is no longer the file `cur` refers to
    try:
        fsync_dir(state.path, hook)
        if work_path is not None:
            rename(work_path, state.current_path, hook)
            temps.renamed(work_path)
            replaced = True
            fsync_dir(state.path, hook)
        else:
            if new_size > old_size:
                os.ftruncate(cur, new_size)
                hook.tick()
            for offset, data in forward.items():
                write_all(cur, data, offset, hook)
            if new_size < old_size:
                os.ftruncate(cur, new_size)
                hook.tick()
            fsync(cur, hook)
        rename(manifest_tmp, state.manifest_path(version), hook)
        temps.renamed(manifest_tmp)
        committed = True
        fsync_dir(state.path, hook)
    except BaseException:
        if not committed:
            with contextlib.suppress(Exception):
                fresh = load_state(state.path, state.vault_uuid)
                if fresh.pending == newest:
                    roll_back(fresh, newest, hook, None if replaced else cur)
        raise


def _prune(state: SetState, keep: int, hook: StepHook) -> list[int]:
    versions = state.versions
    drop = versions[:-keep] if len(versions) > keep else []
    try:
        for v in drop:
            unlink(state.manifest_path(v), hook)
            unlink(state.increment_path(v), hook)
        if drop:
            fsync_dir(state.path, hook)
    except OSError as exc:
        raise os_error("remove old versions from", state.path, exc)
    return drop


__all__ = [
    "DEFAULT_KEEP",
    "STRATEGIES",
    "BackupDamaged",
    "BackupResult",
    "recover",
    "roll_back",
    "run_backup",
]
