"""Version manifests of a backup set (docs/BACKUP.md, "Manifest").

A manifest is three parts, all ASCII:

    KVBACKUP-MANIFEST 1\\n
    <canonical JSON: sort_keys, indent=1, ensure_ascii>\\n
    sha256 <64 lowercase hex digits: SHA-256 of every byte before this line>\\n

It describes one version: the container as it was (size, header sequence, change-table
generation, SHA-256 of every 1 MiB chunk) and the increment file that rebuilds the
previous version from this one. Manifests are written once and never changed. A reader
accepts only the canonical encoding, so any changed byte is detected even before the
checksum line is consulted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kryptvault.errors import FormatError

MANIFEST_FORMAT = 1
MAGIC_LINE = b"KVBACKUP-MANIFEST 1\n"


def seal_manifest(magic: bytes, obj: dict[str, Any]) -> bytes:
    """The magic line, canonical JSON, and a line with the SHA-256 of both (BACKUP.md)."""
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True)
    body = magic + text.encode() + b"\n"
    return body + b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n"


def open_manifest(raw: bytes, magic: bytes, kind: str) -> bytes:
    """The JSON text of a sealed manifest, after its magic line and checksum are checked."""
    if not raw.startswith(magic):
        raise ManifestError(f"not a {kind} (bad first line)")
    if not raw.endswith(b"\n"):
        raise ManifestError("manifest is truncated")
    cut = raw.rfind(b"\n", 0, len(raw) - 1) + 1
    body, last = raw[:cut], raw[cut:]
    if not last.startswith(b"sha256 ") or len(last) != 7 + 64 + 1:
        raise ManifestError("manifest checksum line is missing or damaged")
    if hashlib.sha256(body).hexdigest().encode() != last[7:-1]:
        raise ManifestError("manifest checksum mismatch (damaged or modified)")
    return body[len(magic):]
CHUNK_SIZE = 1 << 20
METHODS = ("full", "incremental", "rescan")
MAX_MANIFEST_BYTES = 1 << 30

_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestError(FormatError):
    """A manifest does not parse or fails its checksum."""


def manifest_name(version: int) -> str:
    return f"v{version:08d}.manifest"


def increment_name(version: int) -> str:
    return f"v{version:08d}.kvinc"


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return -(-size // chunk_size)


def chunk_length(index: int, size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return max(0, min(chunk_size, size - index * chunk_size))


@dataclass(frozen=True)
class ChunkSums:
    """SHA-256 of every `chunk_size` piece of a file of `size` bytes (the last may be short)."""

    size: int
    sha256: tuple[bytes, ...]
    chunk_size: int = CHUNK_SIZE

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "chunk_size": self.chunk_size, "sha256": [h.hex() for h in self.sha256]}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ChunkSums:
        size = _int(obj, "size", where)
        chunk = _int(obj, "chunk_size", where)
        if chunk != CHUNK_SIZE:
            raise ManifestError(f"{where}: unsupported chunk size {chunk}")
        sums = obj.get("sha256")
        if not isinstance(sums, list) or len(sums) != chunk_count(size, chunk):
            raise ManifestError(f"{where}: wrong number of chunk checksums")
        for s in sums:
            if not isinstance(s, str) or not _HEX64.fullmatch(s):
                raise ManifestError(f"{where}: malformed chunk checksum")
        return cls(size, tuple(bytes.fromhex(s) for s in sums), chunk)


class ChunkHasher:
    """SHA-256 per chunk of a byte stream fed in order."""

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self._sums: list[bytes] = []
        self._h = hashlib.sha256()
        self._in_chunk = 0
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            take = min(len(view), self.chunk_size - self._in_chunk)
            self._h.update(view[:take])
            self._in_chunk += take
            self.size += take
            view = view[take:]
            if self._in_chunk == self.chunk_size:
                self._sums.append(self._h.digest())
                self._h = hashlib.sha256()
                self._in_chunk = 0

    def finish(self) -> ChunkSums:
        if self._in_chunk:
            self._sums.append(self._h.digest())
            self._h = hashlib.sha256()
            self._in_chunk = 0
        return ChunkSums(self.size, tuple(self._sums), self.chunk_size)


@dataclass(frozen=True)
class PreviousRef:
    """The increment file that rebuilds version `version` (this manifest's version - 1)."""

    version: int
    file: str
    sums: ChunkSums


@dataclass(frozen=True)
class Manifest:
    vault_uuid: uuid.UUID
    version: int
    created_ns: int
    method: str  # "full", "incremental" or "rescan" (whole container compared)
    live: bool  # copied from a mounted vault under a backup hold
    block_size: int
    header_sequence: int
    generation: int  # change-table generation this copy corresponds to
    generation_exact: bool  # True: the durable commit generation (live hold)
    container: ChunkSums
    previous: PreviousRef | None
    source_bytes_read: int

    @property
    def size(self) -> int:
        return self.container.size

    @property
    def created_text(self) -> str:
        return _iso(self.created_ns)

    def to_json(self) -> dict[str, Any]:
        container = self.container.to_json()
        container.update(
            block_size=self.block_size,
            header_sequence=self.header_sequence,
            generation=self.generation,
            generation_exact=self.generation_exact,
        )
        previous: dict[str, Any] | None = None
        if self.previous is not None:
            previous = self.previous.sums.to_json()
            previous.update(version=self.previous.version, file=self.previous.file)
        return {
            "format": MANIFEST_FORMAT,
            "vault_uuid": str(self.vault_uuid),
            "version": self.version,
            "created": _iso(self.created_ns),
            "created_ns": self.created_ns,
            "method": self.method,
            "live": self.live,
            "source_bytes_read": self.source_bytes_read,
            "container": container,
            "previous": previous,
        }

    def encode(self) -> bytes:
        return seal_manifest(MAGIC_LINE, self.to_json())

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        body = open_manifest(raw, MAGIC_LINE, "kryptvault backup manifest")
        try:
            obj = json.loads(body.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ManifestError("manifest JSON does not parse")
        if not isinstance(obj, dict):
            raise ManifestError("manifest JSON is not an object")
        manifest = cls._from_json(obj)
        if manifest.encode() != raw:
            raise ManifestError("manifest is not in canonical form")
        return manifest

    @classmethod
    def _from_json(cls, obj: dict[str, Any]) -> Manifest:
        if obj.get("format") != MANIFEST_FORMAT or isinstance(obj.get("format"), bool):
            raise ManifestError(f"unknown manifest format {obj.get('format')!r}")
        try:
            vault_uuid = uuid.UUID(str(obj.get("vault_uuid")))
        except ValueError:
            raise ManifestError("manifest has a malformed vault UUID")
        version = _int(obj, "version", "manifest")
        if version < 1:
            raise ManifestError("manifest version must be at least 1")
        method = obj.get("method")
        if method not in METHODS:
            raise ManifestError(f"manifest has unknown method {method!r}")
        live = _bool(obj, "live", "manifest")
        c = obj.get("container")
        if not isinstance(c, dict):
            raise ManifestError("manifest has no container section")
        container = ChunkSums.from_json(c, "container")
        block_size = _int(c, "block_size", "container")
        if block_size & (block_size - 1) or not 4096 <= block_size <= 1 << 20:
            raise ManifestError("container block size out of range")
        p = obj.get("previous")
        previous: PreviousRef | None = None
        if p is not None:
            if not isinstance(p, dict):
                raise ManifestError("manifest previous section is malformed")
            pv = _int(p, "version", "previous")
            if pv != version - 1 or p.get("file") != increment_name(pv):
                raise ManifestError("manifest previous section names the wrong version or file")
            previous = PreviousRef(pv, increment_name(pv), ChunkSums.from_json(p, "previous"))
        return cls(
            vault_uuid=vault_uuid,
            version=version,
            created_ns=_int(obj, "created_ns", "manifest"),
            method=str(method),
            live=live,
            block_size=block_size,
            header_sequence=_int(c, "header_sequence", "container"),
            generation=_int(c, "generation", "container"),
            generation_exact=_bool(c, "generation_exact", "container"),
            container=container,
            previous=previous,
            source_bytes_read=_int(obj, "source_bytes_read", "manifest"),
        )


def _iso(ns: int) -> str:
    stamp = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def _int(obj: Any, key: str, where: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ManifestError(f"{where}: field {key!r} is missing or not a non-negative integer")
    return value


def _bool(obj: Any, key: str, where: str) -> bool:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, bool):
        raise ManifestError(f"{where}: field {key!r} is missing or not true/false")
    return value
