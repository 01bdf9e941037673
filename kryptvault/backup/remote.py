"""Write-once backup sets on rclone remotes (docs/BACKUP.md §12).

    REMOTE:path/<vault-uuid>/chunks/<sha256 hex>          1 MiB of the encrypted container
    REMOTE:path/<vault-uuid>/versions/vNNNNNNNN.manifest  one per version, uploaded last

Chunks are named by the SHA-256 of their bytes, so a chunk the remote already holds is
never uploaded again, and nothing is ever overwritten. A version exists once its
manifest is there: it is uploaded under a temporary name and renamed into place after
every chunk it names. Pruning (`--keep`) deletes old manifests, then every chunk that no
remaining manifest names, only after the new manifest was read back. A run killed at any
point leaves every earlier version whole; the next run lists what the remote holds and
uploads only what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kryptvault.backup.engine import HistoryMismatch, _test_slow_chunk
from kryptvault.backup.fsutil import StepHook
from kryptvault.backup.manifest import (
    CHUNK_SIZE,
    ManifestError,
    chunk_count,
    chunk_length,
    open_manifest,
    seal_manifest,
)
from kryptvault.backup.source import LiveHold, open_source
from kryptvault.backup.transport import RcloneTransport, RemoteError, join, open_remote, scratch_dir
from kryptvault.backup.verify import VerifyReport, describe_region
from kryptvault.errors import IntegrityError, KryptvaultError, UsageError
from kryptvault.session.lineages import known_lineage
from kryptvault.session.paths import state_dir

Progress = Callable[[int, int], None]
REMOTE_FORMAT = 1
MAGIC_LINE = b"KVBACKUP-REMOTE-MANIFEST 1\n"
CHUNKS = "chunks"
VERSIONS = "versions"
BATCH_BYTES = 32 << 20  # chunks staged locally per rclone upload/download run
# TEST-ONLY: KRYPTVAULT_TEST_REMOTE_BATCH_MIB=N stages N MiB per rclone run, so that kill
# tests see several upload steps in a small vault. Never set it otherwise.
TEST_BATCH_ENV = "KRYPTVAULT_TEST_REMOTE_BATCH_MIB"
MAX_MANIFEST_BYTES = 256 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
ORIGINAL_LINEAGE = bytes(16)
_MANIFEST_NAME = re.compile(r"v(\d{8,})\.manifest")
_TMP_MANIFEST = re.compile(r"v\d{8,}\.manifest\.tmp-[0-9a-f]+")
ZERO_CHUNK = bytes(CHUNK_SIZE)


def batch_bytes() -> int:
    raw = os.environ.get(TEST_BATCH_ENV)
    return int(raw) << 20 if raw else BATCH_BYTES


def manifest_name(version: int) -> str:
    return f"v{version:08d}.manifest"


@dataclass(frozen=True)
class RemoteManifest:
    vault_uuid: uuid.UUID
    version: int
    created_ns: int
    live: bool
    size: int
    block_size: int
    header_sequence: int
    chunks: tuple[str, ...]
    source_bytes_read: int
    uploaded_chunks: int
    uploaded_bytes: int
    lineage: bytes = ORIGINAL_LINEAGE

    def to_json(self) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_ns // 1_000_000_000))
        return {
            "format": REMOTE_FORMAT,
            "vault_uuid": str(self.vault_uuid),
            "version": self.version,
            "created": stamp,
            "created_ns": self.created_ns,
            "live": self.live,
            "lineage": self.lineage.hex(),
            "source_bytes_read": self.source_bytes_read,
            "container": {
                "size": self.size,
                "block_size": self.block_size,
                "header_sequence": self.header_sequence,
                "chunk_size": CHUNK_SIZE,
                "chunks": list(self.chunks),
            },
            "upload": {"chunks": self.uploaded_chunks, "bytes": self.uploaded_bytes},
        }

    @property
    def created_text(self) -> str:
        return str(self.to_json()["created"])

    def encode(self) -> bytes:
        return seal_manifest(MAGIC_LINE, self.to_json())

    @classmethod
    def decode(cls, raw: bytes) -> RemoteManifest:
        body = open_manifest(raw, MAGIC_LINE, "kryptvault remote backup manifest")
        try:
            obj = json.loads(body.decode("ascii"))
            c = obj["container"]
            u = obj["upload"]
            manifest = cls(
                vault_uuid=uuid.UUID(obj["vault_uuid"]),
                version=_int(obj["version"]),
                created_ns=_int(obj["created_ns"]),
                live=_bool(obj["live"]),
                size=_int(c["size"]),
                block_size=_int(c["block_size"]),
                header_sequence=_int(c["header_sequence"]),
                chunks=tuple(_hex(h) for h in c["chunks"]),
                source_bytes_read=_int(obj["source_bytes_read"]),
                uploaded_chunks=_int(u["chunks"]),
                uploaded_bytes=_int(u["bytes"]),
                lineage=bytes.fromhex(_hex32(obj["lineage"])),
            )
            fmt, chunk_size = obj["format"], c["chunk_size"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"manifest content is malformed ({type(exc).__name__}: {exc})")
        if fmt != REMOTE_FORMAT or chunk_size != CHUNK_SIZE:
            raise ManifestError(f"unknown manifest format {fmt!r} or chunk size {chunk_size!r}")
        if manifest.version < 1 or len(manifest.chunks) != chunk_count(manifest.size):
            raise ManifestError("manifest version or chunk list is out of range")
        if manifest.encode() != raw:
            raise ManifestError("manifest is not in canonical form")
        return manifest


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true/false")
    return value


def _hex32(value: object) -> str:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise ValueError("the lineage is not 32 lowercase hex digits")
    return value


def _hex(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError("a chunk name is not 64 lowercase hex digits")
    return value


# ------------------------------------------------------------------ the set on a remote
@dataclass
class RemoteSet:
    transport: RcloneTransport
    vault_uuid: uuid.UUID
    manifests: dict[int, RemoteManifest] = field(default_factory=dict)
    bad_manifests: dict[int, str] = field(default_factory=dict)
    temp_manifests: list[str] = field(default_factory=list)
    chunk_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.transport.display

    @property
    def newest(self) -> int | None:
        return max(self.manifests) if self.manifests else None

    @property
    def highest_number(self) -> int:
        return max([0, *self.manifests, *self.bad_manifests])


def _load(transport: RcloneTransport, vault_uuid: uuid.UUID, *, first_contact: bool = False) -> RemoteSet:
    state = RemoteSet(transport, vault_uuid)
    names = transport.list(VERSIONS, first_contact=first_contact)
    wanted: dict[str, int] = {}
    for name in sorted(names):
        m = _MANIFEST_NAME.fullmatch(name)
        if m is None:
            if _TMP_MANIFEST.fullmatch(name):
                state.temp_manifests.append(name)
            continue
        if names[name] > MAX_MANIFEST_BYTES:
            state.bad_manifests[int(m.group(1))] = "manifest is implausibly large"
            continue
        wanted[name] = int(m.group(1))
    with scratch_dir("manifests") as stage_dir:
        stage = Path(stage_dir)
        transport.get_files(sorted(wanted), VERSIONS, stage)  # one rclone run for all of them
        for name, version in wanted.items():
            try:
                manifest = RemoteManifest.decode((stage / name).read_bytes())
            except FileNotFoundError:
                state.bad_manifests[version] = "manifest could not be downloaded"
                continue
            except ManifestError as exc:
                state.bad_manifests[version] = str(exc)
                continue
            if manifest.version != version or manifest.vault_uuid != vault_uuid:
                state.bad_manifests[version] = "manifest names another version or vault than its file name"
                continue
            state.manifests[version] = manifest
    state.chunk_sizes = transport.list(CHUNKS)
    return state


def find_remote_set(dest: str | os.PathLike[str]) -> tuple[RcloneTransport, uuid.UUID]:
    """DEST is the remote directory holding one vault's set, or that set itself."""
    base = open_remote(dest)
    tail = base.root.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    with contextlib.suppress(ValueError):
        vault = uuid.UUID(tail)
        if str(vault) == tail:
            return base, vault
    found = [uuid.UUID(n) for n in base.list("", dirs=True, first_contact=True) if _is_uuid(n)]
    if not found:
        raise UsageError(f"{base.display} holds no kryptvault backup")
    if len(found) > 1:
        raise UsageError(f"{base.display} holds backups of {len(found)} vaults; name one: "
                         + ", ".join(join(base.display, str(v)) for v in found))
    return base.child(str(found[0])), found[0]


def _is_uuid(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


@contextlib.contextmanager
def _local_lock(root: str) -> Iterator[None]:
    """Two backups into one remote set from this machine would race on version numbers
    and pruning."""
    locks = state_dir() / "remote-locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    path = locks / (hashlib.sha256(root.encode()).hexdigest()[:32] + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KryptvaultError(f"a backup into {root} is already running")
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ backup
@dataclass
class RemoteBackupResult:
    vault_uuid: uuid.UUID
    set_display: str
    version: int
    versions: list[int]
    pruned: list[int]
    live: bool
    container_size: int
    source_bytes_read: int
    chunks_total: int
    chunks_uploaded: int
    bytes_uploaded: int
    chunks_pruned: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    method: str = "chunks"

    def to_json(self) -> dict[str, object]:
        return {
            "vault_uuid": str(self.vault_uuid),
            "backup": self.set_display,
            "version": self.version,
            "versions": self.versions,
            "pruned": self.pruned,
            "method": self.method,
            "live": self.live,
            "container_size": self.container_size,
            "source_bytes_read": self.source_bytes_read,
            "chunks": self.chunks_total,
            "chunks_uploaded": self.chunks_uploaded,
            "bytes_uploaded": self.bytes_uploaded,
            "chunks_pruned": self.chunks_pruned,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


def run_remote_backup(
    container: Path, dest: str | os.PathLike[str], *, keep: int,
    progress: Progress | None = None, live_hold: LiveHold | None = None,
    replace_history: bool = False, on_chunks: Callable[[int, int, int], None] | None = None,
) -> RemoteBackupResult:
    """`on_chunks(done, to upload so far, total)` follows the chunks as they are read."""
    started = time.monotonic()
    hook = StepHook.from_env()
    base = open_remote(dest)
    with open_source(container, live_hold) as src:
        vault = src.vault_uuid
        transport = base.child(str(vault))
        with _local_lock(transport.root):
            state = _load(transport, vault, first_contact=True)
            version = state.highest_number + 1
            lineage = _lineage_for(container, state, replace_history)
            have = dict(state.chunk_sizes)
            names: list[str] = []
            uploaded = 0
            upload_bytes = 0
            with scratch_dir("upload") as stage_dir:
                stage = Path(stage_dir)
                staged: list[str] = []
                staged_bytes = 0

                def flush() -> None:
                    nonlocal staged, staged_bytes
                    if not staged:
                        return
                    transport.put_files(stage, staged, CHUNKS)
                    hook.tick()
                    for n in staged:
                        have[n] = (stage / n).stat().st_size
                        (stage / n).unlink()
                    staged, staged_bytes = [], 0

                total = chunk_count(src.size)
                batch = batch_bytes()
                for i in range(total):
                    length = chunk_length(i, src.size)
                    data = src.read(length, i * CHUNK_SIZE)
                    _test_slow_chunk()
                    digest = hashlib.sha256(data).hexdigest()
                    names.append(digest)
                    new = not (have.get(digest) == length or digest in staged)
                    if on_chunks is not None:
                        on_chunks(i + 1, uploaded + new, total)
                    if progress is not None:
                        progress(i * CHUNK_SIZE + length, src.size)
                    if not new:
                        continue
                    # A same-named object of another size is the torso of a killed upload.
                    (stage / digest).write_bytes(data)
                    staged.append(digest)
                    staged_bytes += length
                    uploaded += 1
                    upload_bytes += length
                    if staged_bytes >= batch:
                        flush()
                flush()
            src.end_reads()  # a live hold that lapsed raises here: no manifest, nothing kept
            manifest = RemoteManifest(
                vault_uuid=vault, version=version, created_ns=time.time_ns(), live=src.live,
                size=src.size, block_size=src.header.layout.block_size,
                header_sequence=src.header.sequence, chunks=tuple(names),
                source_bytes_read=src.bytes_read, uploaded_chunks=uploaded, uploaded_bytes=upload_bytes,
                lineage=lineage)
            _commit_manifest(transport, manifest, hook)
            state.manifests[version] = manifest
            state.chunk_sizes = have
            pruned, chunks_pruned, notes = _prune(transport, state, keep, hook)
            kept = sorted(v for v in state.manifests if v not in pruned)
            return RemoteBackupResult(
                vault_uuid=vault, set_display=transport.display, version=version, versions=kept,
                pruned=pruned, live=src.live, container_size=src.size, source_bytes_read=src.bytes_read,
                chunks_total=len(names), chunks_uploaded=uploaded, bytes_uploaded=upload_bytes,
                chunks_pruned=chunks_pruned, seconds=time.monotonic() - started, notes=notes)


def _lineage_for(container: Path, state: RemoteSet, replace_history: bool) -> bytes:
    """The lineage the new version records. A container known here (from its mounts or a
    fork) to be of another lineage than the set's newest version is another history of
    the vault: refused unless it now replaces the vault's history (docs/BACKUP.md §9)."""
    newest = state.newest
    theirs = state.manifests[newest].lineage if newest is not None else None
    known = known_lineage(Path(container), state.vault_uuid)
    if known is None:
        return theirs if theirs is not None else ORIGINAL_LINEAGE
    if theirs is None or known == theirs or replace_history:
        return known

    def name(lineage: bytes) -> str:
        return "the original lineage" if lineage == ORIGINAL_LINEAGE else f"lineage {lineage.hex()[:12]}"
    raise HistoryMismatch(
        f"{container} is {name(known)} of vault {state.vault_uuid} but {state.display} holds "
        f"{name(theirs)}: its versions would mix two histories; back it up to a destination of "
        "its own, or, if it now replaces the vault, pass --full"
    )


def _commit_manifest(transport: RcloneTransport, manifest: RemoteManifest, hook: StepHook) -> None:
    """The commit point: the manifest appears under its name whole, or not at all
    (a rename on WebDAV/SFTP/local, a server-side copy on object stores)."""
    raw = manifest.encode()
    final = manifest_name(manifest.version)
    temp = f"{final}.tmp-{os.urandom(4).hex()}"
    transport.put_bytes(VERSIONS, temp, raw)
    hook.tick()
    if final in transport.list(VERSIONS):  # another machine's backup took the number meanwhile
        raise RemoteError(f"version {manifest.version} appeared in {transport.display} during this backup "
                          "(is another machine backing this vault up there?); nothing was replaced")
    transport.move(VERSIONS, temp, final)
    hook.tick()
    if transport.get_bytes(VERSIONS, final) != raw:
        raise RemoteError(f"the manifest of version {manifest.version} in {transport.display} "
                          "did not read back as written")


def _prune(transport: RcloneTransport, state: RemoteSet, keep: int,
           hook: StepHook) -> tuple[list[int], int, list[str]]:
    """Old manifests first, then unreferenced chunks: a kill between the two leaves only
    chunks that the next prune removes. `state` is what this backup listed, plus its own
    manifest and uploads (it holds the set's lock, so nothing else changed it)."""
    notes: list[str] = []
    numbers = sorted(set(state.manifests) | set(state.bad_manifests))
    oldest = numbers[-keep:][0]  # a damaged manifest counts: it may be a kept version
    kept = [v for v in state.manifests if v >= oldest]
    doomed = [v for v in numbers if v < oldest]
    stale = list(state.temp_manifests)
    transport.delete(VERSIONS, [manifest_name(v) for v in doomed] + stale)
    if doomed or stale:
        hook.tick()
    damaged = [v for v in state.bad_manifests if v >= oldest]
    if damaged:
        # Its chunks are unknown: deleting any chunk could take one of its version's.
        notes.append("kept every chunk: manifest(s) of version " + ", ".join(map(str, damaged))
                     + " are damaged (see 'kryptvault verify')")
        return doomed, 0, notes
    referenced = {h for v in kept for h in state.manifests[v].chunks}
    orphans = sorted(n for n in state.chunk_sizes if n not in referenced)
    transport.delete(CHUNKS, orphans)
    if orphans:
        hook.tick()
    return doomed, len(orphans), notes


# ------------------------------------------------------------------ list / verify / restore
def load_remote_set(dest: str | os.PathLike[str]) -> RemoteSet:
    transport, vault = find_remote_set(dest)
    # No lock: nothing a reader reads is ever changed, only deleted by pruning.
    state = _load(transport, vault, first_contact=True)
    if not state.manifests and not state.bad_manifests:
        raise UsageError(f"{transport.display} holds no backup version")
    return state


def _chunk_users(state: RemoteSet) -> dict[str, list[tuple[int, int]]]:
    users: dict[str, list[tuple[int, int]]] = {}
    for v, m in sorted(state.manifests.items()):
        for i, h in enumerate(m.chunks):
            users.setdefault(h, []).append((v, i))
    return users


def _where(state: RemoteSet, users: list[tuple[int, int]]) -> str:
    """Every (version, chunk) that holds these bytes, and what of the container they are."""
    v, i = users[0]
    m = state.manifests[v]
    length = chunk_length(i, m.size)
    places = ", ".join(f"version {uv} chunk {ui}" for uv, ui in users[:4])
    if len(users) > 4:
        places += f" and {len(users) - 4} more"
    return (f"{places}: bytes {i * CHUNK_SIZE}..{i * CHUNK_SIZE + length}, "
            f"{describe_region(i * CHUNK_SIZE, length, m.block_size)}")


def _batches(items: list[str], sizes: dict[str, int]) -> Iterator[list[str]]:
    batch: list[str] = []
    total = 0
    for item in items:
        batch.append(item)
        total += sizes.get(item, CHUNK_SIZE)
        if total >= batch_bytes():
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def verify_remote(dest: str | os.PathLike[str], progress: Progress | None = None) -> VerifyReport:
    """Every manifest and every chunk they name, by hash: no key needed."""
    state = load_remote_set(dest)
    report = VerifyReport(Path(state.display), state.vault_uuid, sorted(state.manifests), None)
    for v, reason in sorted(state.bad_manifests.items()):
        report.add(f"{VERSIONS}/{manifest_name(v)}", reason)
    for name in state.temp_manifests:
        report.notes.append(f"{VERSIONS}/{name} is left from an interrupted backup "
                            "(the next backup removes it)")
    users = _chunk_users(state)
    wanted = sorted(users)
    unreferenced = [n for n in state.chunk_sizes if n not in users]
    if unreferenced:
        report.notes.append(f"{len(unreferenced)} chunk(s) no version names (from an interrupted backup "
                            "or pruning; the next backup removes them)")
    present: list[str] = []
    for h in wanted:
        expected = chunk_length(users[h][0][1], state.manifests[users[h][0][0]].size)
        if h not in state.chunk_sizes:
            report.add(f"{CHUNKS}/{h}", f"is missing [{_where(state, users[h])}]")
        elif state.chunk_sizes[h] != expected:
            report.add(f"{CHUNKS}/{h}", f"has {state.chunk_sizes[h]} bytes instead of {expected} "
                       f"[{_where(state, users[h])}]")
        else:
            present.append(h)
    total = sum(state.chunk_sizes[h] for h in present)
    done = 0
    with scratch_dir("verify") as stage_dir:
        stage = Path(stage_dir)
        for batch in _batches(present, state.chunk_sizes):
            state.transport.get_files(batch, CHUNKS, stage)
            for h in batch:
                path = stage / h
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    report.add(f"{CHUNKS}/{h}", f"could not be downloaded [{_where(state, users[h])}]")
                    continue
                path.unlink()
                report.checked_bytes += len(data)
                done += len(data)
                if hashlib.sha256(data).hexdigest() != h:
                    report.add(f"{CHUNKS}/{h}",
                               f"content does not match its name [{_where(state, users[h])}]")
                if progress is not None:
                    progress(done, total)
    return report


@dataclass
class RemoteRestoreResult:
    vault_uuid: uuid.UUID
    version: int
    newest: int
    manifest: RemoteManifest
    target: Path
    bytes_downloaded: int

    def to_json(self) -> dict[str, object]:
        return {
            "vault_uuid": str(self.vault_uuid),
            "version": self.version,
            "newest": self.newest,
            "backed_up": self.manifest.created_text,
            "container_size": self.manifest.size,
            "target": str(self.target),
            "bytes_downloaded": self.bytes_downloaded,
        }


def pick_remote_version(state: RemoteSet, version: int | None) -> int:
    if version is None:
        if state.newest is None:
            raise IntegrityError(f"{state.display} holds no readable version (every manifest is damaged)")
        return state.newest
    if version in state.bad_manifests:
        raise IntegrityError(f"the manifest of version {version} is damaged: {state.bad_manifests[version]}")
    if version not in state.manifests:
        have = ", ".join(map(str, sorted(state.manifests))) or "none"
        raise UsageError(f"{state.display} has no version {version} (versions: {have})")
    return version


def write_remote_version(state: RemoteSet, version: int, fd: int, progress: Progress | None = None) -> None:
    """Every chunk of the version, checked against its name before it is written."""
    manifest = state.manifests[version]
    os.ftruncate(fd, manifest.size)
    with scratch_dir("restore") as stage_dir:
        stage = Path(stage_dir)
        indices = list(range(len(manifest.chunks)))
        step = max(1, batch_bytes() // CHUNK_SIZE)
        for first in range(0, len(indices), step):
            part = indices[first:first + step]
            wanted = sorted({manifest.chunks[i] for i in part})
            state.transport.get_files(wanted, CHUNKS, stage)
            for i in part:
                h = manifest.chunks[i]
                try:
                    data = (stage / h).read_bytes()
                except FileNotFoundError:
                    raise IntegrityError(f"{CHUNKS}/{h} (version {version} chunk {i}) is missing "
                                         f"from {state.display}") from None
                if len(data) != chunk_length(i, manifest.size) or hashlib.sha256(data).hexdigest() != h:
                    raise IntegrityError(f"{CHUNKS}/{h} (version {version} chunk {i}) in {state.display} "
                                         "is damaged: its content does not match its name")
                if data != ZERO_CHUNK[:len(data)]:  # zeros stay a hole
                    os.pwrite(fd, data, i * CHUNK_SIZE)
                if progress is not None:
                    progress(i * CHUNK_SIZE + len(data), manifest.size)
            for h in wanted:
                with contextlib.suppress(FileNotFoundError):
                    (stage / h).unlink()
    os.fsync(fd)


def run_remote_restore(dest: str | os.PathLike[str], version: int | None, target: Path, *,
                       force: bool = False, progress: Progress | None = None) -> RemoteRestoreResult:
    from kryptvault.backup.restore import _target_lock, new_container_file, restore_target

    target = Path(target)
    parent = restore_target(target, force)
    state = load_remote_set(dest)
    wanted = pick_remote_version(state, version)
    with _target_lock(target), new_container_file(target, parent) as fd:
        write_remote_version(state, wanted, fd, progress)
    newest = state.newest
    assert newest is not None
    return RemoteRestoreResult(state.vault_uuid, wanted, newest, state.manifests[wanted], target,
                               state.transport.bytes_down)


@contextlib.contextmanager
def materialized_remote(dest: str | os.PathLike[str], version: int | None) -> Iterator[tuple[int, Path]]:
    """The version downloaded into a private temporary file (for verify --full)."""
    state = load_remote_set(dest)
    wanted = pick_remote_version(state, version)
    with scratch_dir("version") as tmp:
        path = tmp / "version.kv"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_remote_version(state, wanted, fd)
        finally:
            os.close(fd)
        yield wanted, path


__all__ = [
    "RemoteBackupResult",
    "RemoteManifest",
    "RemoteRestoreResult",
    "RemoteSet",
    "load_remote_set",
    "materialized_remote",
    "run_remote_backup",
    "run_remote_restore",
    "verify_remote",
]
