"""Check and repair a vault offline: every block, every record, every invariant.

`check(store)` never writes. It authenticates every block reachable from the commit
record (`ObjectStore.verify()`), then walks the directory tree from the root and checks
the filesystem invariants of docs/FSCK.md: every object in use is reachable (else it is
an orphan), entries name objects in use with the entry type matching the inode, link
counts equal the entries naming an object (directories: 2 + subdirectories), directory
parent pointers match, symlink targets and extended attributes parse, special files carry
no data. Every problem names the paths affected; damage is mapped from blocks to byte
ranges of files, and a damaged directory reports the subtree it cut off (its
subdirectories still know their parent, so their paths are shown as
``/dir/(lost name #oid)/...``).

`repair(store, report)` fixes a store whose metadata is intact (it opened writable):

* a regular file with unreadable blocks is **moved** to ``/lost+found/<oid>-<name>.partial``
  (all its names are removed, so nothing under the old paths returns EIO any more); the
  unreadable blocks become holes (zeros) and ``<oid>-<name>.partial.txt`` lists the lost
  byte ranges. The readable blocks are not rewritten: the object keeps its data blocks,
  attributes and inode number; only its names change;
* a directory with unreadable blocks keeps its name and attributes; the entries that can
  still be parsed are kept (parsing resynchronises after a damaged block), the objects
  whose entries were lost are relinked into lost+found as ``#<oid>`` (a subdirectory
  brings its whole subtree);
* extended attributes: the records before the damage are kept, the rest dropped;
* a symlink whose target is unreadable is removed (noted in the log);
* orphans (in use, link count > 0, no name) are relinked as ``/lost+found/#<oid>``;
  unlinked objects (link count 0, e.g. left by a crash; a mount frees them too) are freed;
* dangling entries (object not in use or uninitialised), entries with invalid names, a
  second name for a directory and names for the root are removed; wrong entry types, link
  counts and parent pointers are corrected;
* everything done is logged in ``/lost+found/fsck-<UTC time>.txt`` when lost+found is
  used, and returned in the RepairReport. One commit at the end makes it atomic.

What is intact is not touched: healthy files keep their blocks, names and attributes.

When the metadata itself is damaged (an object-table block, an indirect block, a
malformed pointer) the store opens read-only, since free space is unknown.
`rebuild()` then copies everything readable into a fresh store (same oids, keys and
header; `kryptvault.fs.compact.copy_objects` in salvage mode) and applies the same repair
there; the CLI swaps the new container in and keeps the original as
``CONTAINER.damaged-<time>``.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kryptvault.container.groups import GroupGeometry
from kryptvault.container.pointer import POINTER_SIZE
from kryptvault.container.store import Damage, ObjectStore
from kryptvault.container.vault import StoreKeys
from kryptvault.errors import IntegrityError, KryptvaultError
from kryptvault.fs.compact import (
    Range,
    copy_header,
    copy_objects,
    finalize_container,
    merge_ranges,
)
from kryptvault.fs.directory import MAGIC as DIR_MAGIC
from kryptvault.fs.directory import NAME_MAX, REC_HEADER, Directory
from kryptvault.fs.inode import Inode

__all__ = [
    "LOST_FOUND",
    "FsckReport",
    "FsckSummary",
    "Problem",
    "RebuildRequired",
    "RepairReport",
    "check",
    "parse_directory",
    "parse_xattrs",
    "read_salvaged",
    "rebuild",
    "rebuild_container",
    "repair",
]

ROOT_INO = 1
DATA, AUX = 0, 1
LOST_FOUND = b"lost+found"
SYMLINK_MAX = 4095
WHOLE = 1 << 63  # "up to the end of the stream" when the size is unknown
_DT_DIR = stat.S_IFDIR >> 12
_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
# A directory record: oid u64 | type u8 | name_len u16 | name (kryptvault/fs/directory.py).
_DIR_REC = struct.Struct("<QBH")
# An extended attribute record: name_len u8 | value_len u32 | name | value (fs/xattr.py).
_XATTR_REC = struct.Struct("<BI")
_RESYNC_CHECK = 256  # records that must parse for a resynchronisation to be accepted


class RebuildRequired(KryptvaultError):
    """The store's metadata is damaged (it opened read-only); only `rebuild()` can repair it."""


# ---------------------------------------------------------------------- report types
@dataclass
class Problem:
    """One finding. `info` problems are not damage (the vault counts as clean)."""

    kind: str
    message: str
    paths: list[str] = field(default_factory=list)
    oid: int | None = None
    ranges: list[Range] = field(default_factory=list)
    info: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "paths": self.paths,
            "oid": self.oid,
            "lost_ranges": [list(r) for r in self.ranges],
            "info": self.info,
        }


@dataclass
class FsckSummary:
    generation: int = 0
    objects: int = 0
    directories: int = 0
    files: int = 0
    symlinks: int = 0
    special: int = 0
    file_bytes: int = 0  # sum of the sizes of regular files
    units_verified: int = 0  # allocation units of every block authenticated
    stored_bytes: int = 0
    damaged_blocks: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class FsckReport:
    problems: list[Problem]
    summary: FsckSummary
    metadata_damaged: bool  # the store opened read-only because its metadata is damaged
    damage: list[Damage]
    damaged_ranges: dict[tuple[int, int], list[Range]]  # (oid, stream) -> unreadable bytes
    reasons: dict[tuple[int, int], str]

    @property
    def clean(self) -> bool:
        return not any(not p.info for p in self.problems)

    @property
    def needs_rebuild(self) -> bool:
        """Metadata is damaged: only `rebuild` (into a new container) can repair it."""
        return self.metadata_damaged

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "needs_rebuild": self.needs_rebuild,
            "summary": self.summary.to_dict(),
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    salvaged: list[dict[str, Any]] = field(default_factory=list)  # damaged files moved
    relinked: list[dict[str, Any]] = field(default_factory=list)  # orphans put in lost+found
    lost_and_found: str | None = None
    rebuilt: bool = False
    damaged_copy: str | None = None  # where the CLI left the damaged original (rebuild)
    # What the repair could not keep under its name (docs/FSCK.md "What was lost"):
    lost_entries: int = 0  # names removed whose file/directory survives nowhere
    lost_objects: int = 0  # unreadable inodes no surviving name led to (at most this many)
    moved_to_lost_found: int = 0  # damaged files moved there and orphans relinked there

    @property
    def lost_anything(self) -> bool:
        """Something is gone or no longer under its name: never report such a repair as clean."""
        return bool(self.lost_entries or self.lost_objects or self.moved_to_lost_found or self.unrepaired)

    def loss_summary(self) -> str:
        """One line: what was lost and what moved (empty when nothing was)."""
        parts = []
        if self.lost_entries:
            n = self.lost_entries
            parts.append(f"{n} entr{'y' if n == 1 else 'ies'} (files/dirs) lost")
        if self.lost_objects:
            parts.append(
                f"up to {self.lost_objects} more object(s) lost with their unreadable inodes"
                " (no surviving name led to them)"
            )
        if self.moved_to_lost_found:
            parts.append(f"{self.moved_to_lost_found} moved to {self.lost_and_found or '/lost+found'}")
        if self.unrepaired:
            parts.append(f"{len(self.unrepaired)} not repaired")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["lost_anything"] = self.lost_anything
        return out


# ---------------------------------------------------------------------- helpers
def _overlaps(ranges: Iterable[Range], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in ranges)


def _clip(ranges: Iterable[Range], size: int) -> list[Range]:
    return [(a, min(b, size)) for a, b in ranges if a < size]


def _fmt_ranges(ranges: list[Range], size: int | None = None) -> str:
    parts = []
    for a, b in ranges:
        if b >= WHOLE:
            parts.append(f"{a}-end")
        else:
            parts.append(f"{a}-{b - 1}")
    text = ", ".join(parts) if parts else "none"
    return f"bytes {text}" + (f" of {size}" if size is not None else "")


def _join(dpath: str, name: bytes) -> str:
    return dpath.rstrip("/") + "/" + os.fsdecode(name)


def _valid_name(name: bytes) -> bool:
    return 0 < len(name) <= NAME_MAX and b"/" not in name and b"\0" not in name and name not in (b".", b"..")


def read_salvaged(
    store: ObjectStore, oid: int, stream: int, size: int | None = None
) -> tuple[bytes, list[Range]]:
    """The whole stream, with blocks that fail to authenticate read as zeros; returns
    (data, unreadable ranges). Raises IntegrityError only if the stream's size is unknown."""
    if size is None:
        size = store.stream_size(oid, stream)
    try:
        return store.read(oid, stream, 0, size), []
    except IntegrityError:
        pass
    bs = store.layout.block_size
    parts: list[bytes] = []
    lost: list[Range] = []
    for off in range(0, size, bs):
        n = min(bs, size - off)
        try:
            parts.append(store.read(oid, stream, off, n))
        except IntegrityError:
            parts.append(bytes(n))
            lost.append((off, off + n))
    return b"".join(parts), merge_ranges(lost)


class _Entry:
    __slots__ = ("name", "oid", "typ")

    def __init__(self, name: bytes, oid: int, typ: int) -> None:
        self.name, self.oid, self.typ = name, oid, typ


def _record_at(data: bytes, pos: int, lost: list[Range]) -> tuple[int, int, bytes, int] | None:
    end = len(data)
    if pos + REC_HEADER > end or _overlaps(lost, pos, pos + REC_HEADER):
        return None
    oid, typ, nlen = _DIR_REC.unpack_from(data, pos)
    stop = pos + REC_HEADER + nlen
    if nlen == 0 or nlen > NAME_MAX or stop > end or _overlaps(lost, pos, stop):
        return None
    return oid, typ, data[pos + REC_HEADER : stop], stop


def _chain_ok(data: bytes, pos: int, lost: list[Range], plausible: Callable[[int, int, bytes], bool]) -> bool:
    """Do plausible records follow each other from `pos` to the end (or to the next
    damaged range, or for _RESYNC_CHECK records)?"""
    end = len(data)
    count = 0
    while pos < end and count < _RESYNC_CHECK:
        rec = _record_at(data, pos, lost)
        if rec is None:
            return count > 0 and _overlaps(lost, pos, pos + REC_HEADER + NAME_MAX)
        oid, typ, name, stop = rec
        if not plausible(oid, typ, name):
            return False
        count += 1
        pos = stop
    return count > 0 or pos == end


def parse_directory(
    data: bytes,
    lost: list[Range] | None = None,
    plausible: Callable[[int, int, bytes], bool] | None = None,
) -> tuple[list[tuple[bytes, int, int]], list[str]]:
    """Parse a directory stream as far as it can be read: [(name, oid, type)] of the
    live records and notes on what could not be parsed. Unreadable ranges (`lost`, read
    as zeros) are skipped: parsing resumes at the first offset after them from which
    `plausible` records follow each other (without `plausible`, parsing stops there)."""
    lost = lost or []
    end = len(data)
    entries: list[tuple[bytes, int, int]] = []
    notes: list[str] = []
    if end == 0:
        return entries, notes
    names: set[bytes] = set()
    if data[:4] == DIR_MAGIC:
        pos = 4
    elif _overlaps(lost, 0, 4):
        pos = 0
    else:
        return entries, ["the directory stream has a bad magic; no entry can be trusted"]
    while pos < end:
        rec = _record_at(data, pos, lost)
        if rec is None:
            blocking = [r for r in lost if r[1] > pos and r[0] < pos + REC_HEADER + NAME_MAX]
            if not blocking:
                notes.append(f"malformed record at byte {pos}; the records after it are lost")
                break
            after = max(b for _a, b in blocking)
            resumed = None
            if plausible is not None:
                for cand in range(after, min(after + REC_HEADER + NAME_MAX + 1, end)):
                    if _chain_ok(data, cand, lost, plausible):
                        resumed = cand
                        break
            if resumed is None:
                if after < end:
                    notes.append(f"records after unreadable bytes {pos}-{after - 1} could not be recovered")
                else:
                    notes.append(f"records in unreadable bytes {pos}-{end - 1} are lost")
                break
            notes.append(
                f"records in unreadable bytes {pos}-{after - 1} are lost; parsing resumed at {resumed}"
            )
            pos = resumed
            continue
        oid, typ, name, stop = rec
        if typ:
            if name in names:
                notes.append(f"duplicate entry {os.fsdecode(name)!r} ignored")
            else:
                names.add(name)
                entries.append((name, oid, typ))
        pos = stop
    return entries, notes


def parse_xattrs(data: bytes, lost: list[Range] | None = None) -> tuple[dict[bytes, bytes], str | None]:
    """The extended attributes before the first unreadable or malformed record, and a note
    if the stream does not parse to its end."""
    lost = lost or []
    attrs: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        head = _XATTR_REC.size
        if _overlaps(lost, pos, pos + head):
            return attrs, f"records from byte {pos} on are unreadable"
        if pos + head > end:
            return attrs, f"truncated record at byte {pos}"
        nlen, vlen = _XATTR_REC.unpack_from(data, pos)
        stop = pos + head + nlen + vlen
        if nlen == 0 or stop > end:
            return attrs, f"malformed record at byte {pos}"
        if _overlaps(lost, pos, stop):
            return attrs, f"records from byte {pos} on are unreadable"
        attrs[data[pos + head : pos + head + nlen]] = data[pos + head + nlen : stop]
        pos = stop
    return attrs, None


def _dump_xattrs(attrs: dict[bytes, bytes]) -> bytes:
    out = bytearray()
    for name, value in attrs.items():
        out += _XATTR_REC.pack(len(name), len(value)) + name + value
    return bytes(out)


def _damage_span(bs: int, d: Damage) -> Range:
    if d.level < 0:
        return (0, WHOLE)
    span = bs * (bs // POINTER_SIZE) ** d.level
    return (d.index * span, (d.index + 1) * span)


def _describe_damage(d: Damage) -> str:
    if d.level < 0:
        return d.reason
    what = "data block" if d.level == 0 else f"indirect block (level {d.level})"
    return f"{what} {d.index}: {d.reason}"


# ---------------------------------------------------------------------- the model
class _Model:
    """Everything fsck knows about the tree, in memory: inodes, parsed (salvaged)
    directory entries, and the result of walking the tree from the root. Check reports
    from it; repair edits it and writes the difference back."""

    def __init__(
        self,
        store: ObjectStore,
        lost: dict[tuple[int, int], list[Range]],
        reasons: dict[tuple[int, int], str],
        *,
        lost_inodes: dict[int, str] | None = None,
        on_lost: Callable[[int, int, list[Range]], None] | None = None,
    ) -> None:
        self.store = store
        self.bs = store.layout.block_size
        self.lost = lost
        self.reasons = reasons
        self.on_lost = on_lost
        self.lost_inodes: dict[int, str] = dict(lost_inodes or {})  # oid -> why its inode is gone
        self.nodes: dict[int, Inode] = {}
        self.bad: dict[int, str] = {}  # in use, attribute blob of an unknown format
        self.blank: set[int] = set()  # in use, attribute blob never initialised
        self.entries: dict[int, list[_Entry]] = {}
        self.dir_notes: dict[int, list[str]] = {}
        self.changed_dirs: set[int] = set()
        self.xattr_fix: dict[int, tuple[dict[bytes, bytes], str]] = {}
        self.special_data: set[int] = set()
        self.bad_symlinks: dict[int, str] = {}
        self.bad_mode: set[int] = set()
        self.problems: list[Problem] = []
        self.paths: dict[int, list[str]] = {}
        self.dir_path: dict[int, str] = {}
        self.parent_of: dict[int, int] = {}
        self.reached: set[int] = set()
        self.orphan_roots: list[int] = []
        self.unlinked: list[int] = []
        self.dropped: list[str] = []  # descriptions of entries removed from the model
        self.dropped_oids: list[int] = []  # the object each of those entries named
        self.max_oid = 0

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        store = self.store
        for oid in store.iter_oids():
            self.max_oid = max(self.max_oid, oid)
            try:
                blob = store.get_attrs(oid)
            except IntegrityError as exc:
                self.lost_inodes.setdefault(oid, f"its inode is in a damaged object-table block ({exc})")
                continue
            try:
                node = Inode.unpack(oid, blob)
            except ValueError as exc:
                self.bad[oid] = str(exc)
                continue
            if node is None:
                self.blank.add(oid)
            else:
                self.nodes[oid] = node
        for oid, node in self.nodes.items():
            self._inspect(oid, node)

    def size(self, oid: int, stream: int) -> int | None:
        try:
            return self.store.stream_size(oid, stream)
        except IntegrityError:
            return None

    def _read(self, oid: int, stream: int) -> tuple[bytes, list[Range]]:
        size = self.size(oid, stream)
        if size is None:
            self.lost.setdefault((oid, stream), [(0, WHOLE)])
            return b"", [(0, WHOLE)]
        data, found = read_salvaged(self.store, oid, stream, size)
        known = self.lost.get((oid, stream), [])
        if found and not all(_overlaps(known, a, b) for a, b in found):
            if self.on_lost is not None:
                self.on_lost(oid, stream, found)
            self.lost[(oid, stream)] = merge_ranges([*known, *found])
            self.reasons.setdefault((oid, stream), "failed authentication")
        return data, _clip(self.lost.get((oid, stream), []), size)

    def _plausible(self, oid: int, typ: int, name: bytes) -> bool:
        if not name or b"/" in name or b"\0" in name:
            return False
        if typ == 0:
            return 0 < oid <= self.max_oid
        node = self.nodes.get(oid)
        return node is not None and node.dtype == typ

    def _inspect(self, oid: int, node: Inode) -> None:
        fmt = stat.S_IFMT(node.mode)
        if fmt not in _TYPES:
            self.bad_mode.add(oid)
            return
        if node.is_dir:
            data, lost = self._read(oid, DATA)
            parsed, notes = parse_directory(data, lost, self._plausible)
            self.entries[oid] = [_Entry(n, o, t) for n, o, t in parsed]
            if notes or lost:
                self.dir_notes[oid] = notes
                self.changed_dirs.add(oid)
        elif node.is_lnk:
            size = self.size(oid, DATA)
            if size is not None and (oid, DATA) not in self.lost:
                if size == 0 or size > SYMLINK_MAX:
                    self.bad_symlinks[oid] = f"target of {size} bytes"
                else:
                    data, lost = self._read(oid, DATA)
                    if not lost and b"\0" in data:
                        self.bad_symlinks[oid] = "target contains a NUL byte"
        elif not node.is_reg and (self.size(oid, DATA) or 0) > 0:
            self.special_data.add(oid)
        asize = self.size(oid, AUX)
        if asize is None or asize > 0:
            data, lost = self._read(oid, AUX)
            attrs, note = parse_xattrs(data, lost)
            if note is not None or lost:
                self.xattr_fix[oid] = (attrs, note or "unreadable")

    # ------------------------------------------------------------------ walking
    def _problem(self, kind: str, message: str, paths: list[str], oid: int | None = None, **kw: Any) -> None:
        self.problems.append(Problem(kind, message, paths, oid, **kw))

    def walk(self, start: int, start_path: str, parent: int) -> None:
        """Visit `start` (placed at `start_path`) and, for a directory, its subtree.
        Entries that cannot stand are dropped from the model (and reported)."""
        self.reached.add(start)
        self.paths.setdefault(start, []).append(start_path)
        node = self.nodes[start]
        if not node.is_dir:
            return
        self.parent_of[start] = parent
        self.dir_path[start] = start_path
        stack = [start]
        while stack:
            d = stack.pop()
            dpath = self.dir_path[d]
            kept: list[_Entry] = []
            for ent in self.entries.get(d, []):
                path = _join(dpath, ent.name)
                why = self._entry_fault(ent, path)
                if why is not None:
                    self.dropped.append(f"{path}: {why}")
                    self.dropped_oids.append(ent.oid)
                    self.changed_dirs.add(d)
                    continue
                kept.append(ent)
                child = self.nodes.get(ent.oid)
                if child is None:
                    continue  # an inode of unknown format: kept, not visited
                if ent.typ != child.dtype:
                    self._problem(
                        "wrong-type",
                        f"{path}: the entry says type {ent.typ}, the inode is type {child.dtype}",
                        [path],
                        ent.oid,
                    )
                    ent.typ = child.dtype
                    self.changed_dirs.add(d)
                if ent.oid in self.reached:
                    self.paths.setdefault(ent.oid, []).append(path)
                    continue
                self.reached.add(ent.oid)
                self.paths.setdefault(ent.oid, []).append(path)
                if child.is_dir:
                    self.parent_of[ent.oid] = d
                    self.dir_path[ent.oid] = path
                    stack.append(ent.oid)
            self.entries[d] = kept

    def _entry_fault(self, ent: _Entry, path: str) -> str | None:
        oid = ent.oid
        if not _valid_name(ent.name):
            self._problem("bad-entry", f"{path}: invalid entry name", [path], oid)
            return "invalid name"
        if oid == ROOT_INO:
            self._problem("bad-entry", f"{path}: an entry names the root directory", [path], oid)
            return "names the root directory"
        if oid in self.nodes:
            if self.nodes[oid].is_dir and oid in self.reached:
                first = self.dir_path.get(oid, "?")
                self._problem("dir-hardlink", f"{path}: a second name for the directory {first}", [path], oid)
                return f"a second name for the directory {first}"
            return None
        if oid in self.bad:
            self._problem("bad-inode", f"{path}: inode of an unknown format ({self.bad[oid]})", [path], oid)
            return None
        if oid in self.lost_inodes:
            why = self.lost_inodes[oid]
            self._problem("inode-lost", f"{path}: {why}", [path], oid)
            return why
        if oid in self.blank:
            self._problem(
                "dangling-entry", f"{path}: names object {oid}, which was never initialised", [path], oid
            )
            return f"names the uninitialised object {oid}"
        self._problem("dangling-entry", f"{path}: names object {oid}, which does not exist", [path], oid)
        return f"names object {oid}, which does not exist"

    def _orphan_path(self, oid: int) -> str:
        node = self.nodes[oid]
        if node.is_dir and node.parent in self.dir_path and node.parent != oid:
            return f"{self.dir_path[node.parent].rstrip('/')}/(lost name #{oid})"
        return f"(unreachable #{oid})"

    def analyse(self) -> None:
        self.load()
        root = self.nodes.get(ROOT_INO)
        if root is None or not root.is_dir:
            why = "missing" if ROOT_INO not in self.nodes else "not a directory"
            if ROOT_INO in self.lost_inodes:
                why = self.lost_inodes[ROOT_INO]
            self._problem("root-lost", f"the root directory is unusable ({why})", ["/"], ROOT_INO)
        else:
            self.walk(ROOT_INO, "/", ROOT_INO)
        pending = {o for o, n in self.nodes.items() if o not in self.reached and n.nlink > 0}
        while pending:
            referenced: set[int] = set()
            for o in pending:
                if self.nodes[o].is_dir:
                    referenced.update(e.oid for e in self.entries.get(o, []) if e.oid != o)
            roots = sorted(o for o in pending if o not in referenced) or [min(pending)]
            for r in roots:
                if r in self.reached:
                    continue
                path = self._orphan_path(r)
                self.orphan_roots.append(r)
                self.walk(r, path, self.nodes[r].parent if self.nodes[r].is_dir else 0)
            pending = {o for o in pending if o not in self.reached}
        self.unlinked = sorted(o for o in self.nodes if o not in self.reached)
        self._check_links()

    def counts(self) -> tuple[Counter[int], Counter[int]]:
        """(entries naming each object, subdirectory entries of each directory) over the
        kept entries of every reached directory."""
        refs: Counter[int] = Counter()
        subdirs: Counter[int] = Counter()
        for d in self.reached:
            for e in self.entries.get(d, []):
                refs[e.oid] += 1
                child = self.nodes.get(e.oid)
                if (child is not None and child.is_dir) or (child is None and e.typ == _DT_DIR):
                    subdirs[d] += 1
        return refs, subdirs

    def _check_links(self) -> None:
        refs, subdirs = self.counts()
        roots = set(self.orphan_roots)
        for o in sorted(self.reached):
            node = self.nodes[o]
            path = self.paths[o][0]
            if node.is_dir:
                want = 2 + subdirs[o]
                parent = self.parent_of.get(o, o)
                if o not in roots and node.parent != parent:
                    self._problem(
                        "wrong-parent",
                        f"{path}: parent pointer is {node.parent}, the directory is in {parent}",
                        [path],
                        o,
                    )
            else:
                want = refs[o] + (1 if o in roots else 0)
                if node.parent != 0:
                    self._problem(
                        "wrong-parent", f"{path}: non-directory with parent pointer {node.parent}", [path], o
                    )
            if node.nlink != want:
                self._problem("wrong-nlink", f"{path}: link count {node.nlink}, should be {want}", [path], o)

    # ------------------------------------------------------------------ reporting
    def object_paths(self, oid: int) -> list[str]:
        return list(self.paths.get(oid, [])) or [f"(object #{oid})"]

    def report_problems(self) -> None:
        """Problems that are not about entries: orphans, damage, content."""
        for r in self.orphan_roots:
            node = self.nodes[r]
            kind = "directory" if node.is_dir else "object"
            subtree = [p for o in self._subtree(r) for p in self.paths.get(o, [])]
            self._problem(
                "orphan", f"{self.paths[r][0]}: {kind} {r} is not reachable from the root", subtree, r
            )
        for o in self.unlinked:
            self._problem(
                "unlinked",
                f"object {o} has no name and a link count of 0 (freed on the next mount)",
                [],
                o,
                info=True,
            )
        for o in sorted(self.blank):
            if o not in self.reached:
                self._problem(
                    "unlinked",
                    f"object {o} was never initialised (freed on the next mount)",
                    [],
                    o,
                    info=True,
                )
        for o in sorted(self.bad_mode):
            self._problem(
                "bad-mode",
                f"object {o}: file type {stat.S_IFMT(self.nodes[o].mode):#o} is unknown",
                self.object_paths(o),
                o,
            )
        for o in sorted(self.bad):
            if o not in self.reached:
                self._problem("bad-inode", f"object {o}: inode of an unknown format ({self.bad[o]})", [], o)
        for o, why in sorted(self.bad_symlinks.items()):
            self._problem(
                "bad-symlink",
                f"{self.object_paths(o)[0]}: malformed symlink ({why})",
                self.object_paths(o),
                o,
            )
        for o in sorted(self.special_data):
            self._problem(
                "special-data",
                f"{self.object_paths(o)[0]}: a special file with data",
                self.object_paths(o),
                o,
            )
        for (o, stream), ranges in sorted(self.lost.items()):
            self._report_damage(o, stream, ranges)
        for o, (_attrs, note) in sorted(self.xattr_fix.items()):
            if (o, AUX) not in self.lost:
                self._problem(
                    "bad-xattrs",
                    f"{self.object_paths(o)[0]}: extended attributes: {note}",
                    self.object_paths(o),
                    o,
                )
        for o, notes in sorted(self.dir_notes.items()):
            if (o, DATA) not in self.lost and notes:
                self._problem(
                    "bad-directory", f"{self.object_paths(o)[0]}: {'; '.join(notes)}", self.object_paths(o), o
                )

    def _subtree(self, oid: int) -> list[int]:
        out = [oid]
        node = self.nodes.get(oid)
        if node is None or not node.is_dir:
            return out
        stack = [oid]
        seen = {oid}
        while stack:
            d = stack.pop()
            for e in self.entries.get(d, []):
                if e.oid in seen:
                    continue
                seen.add(e.oid)
                out.append(e.oid)
                child = self.nodes.get(e.oid)
                if child is not None and child.is_dir and self.parent_of.get(e.oid) == d:
                    stack.append(e.oid)
        return out

    def _report_damage(self, oid: int, stream: int, ranges: list[Range]) -> None:
        node = self.nodes.get(oid)
        size = self.size(oid, stream) if node is not None or oid in self.bad else None
        shown = _clip(ranges, size) if size is not None else ranges
        if not shown and size is not None:
            shown = ranges  # damage past the end of the stream
        paths = self.object_paths(oid)
        reason = self.reasons.get((oid, stream), "unreadable")
        where = _fmt_ranges(shown, size)
        if node is None:
            self._problem(
                "damaged-object",
                f"object {oid} stream {stream}: {where} unreadable ({reason})",
                paths,
                oid,
                ranges=shown,
            )
        elif stream == AUX:
            self._problem(
                "damaged-xattrs",
                f"{paths[0]}: extended attributes: {where} unreadable ({reason})",
                paths,
                oid,
                ranges=shown,
            )
        elif node.is_dir:
            kept = len(self.entries.get(oid, []))
            notes = "; ".join(self.dir_notes.get(oid, []))
            prefix = self.dir_path.get(oid, paths[0]).rstrip("/") + "/(lost name #"
            cut_off = sorted({p for ps in self.paths.values() for p in ps if p.startswith(prefix)})
            msg = f"{paths[0]}: directory {where} unreadable ({reason}); {kept} entries still readable"
            if notes:
                msg += f" ({notes})"
            if cut_off:
                msg += f"; unreachable below it: {len(cut_off)} path(s)"
            self._problem("damaged-directory", msg, paths + cut_off, oid, ranges=shown)
        elif node.is_lnk:
            self._problem(
                "damaged-symlink",
                f"{paths[0]}: symlink target unreadable ({reason})",
                paths,
                oid,
                ranges=shown,
            )
        else:
            self._problem(
                "damaged-data", f"{paths[0]}: {where} unreadable ({reason})", paths, oid, ranges=shown
            )


# ---------------------------------------------------------------------- check
def _dedupe(damage: list[Damage]) -> list[Damage]:
    seen: dict[tuple[int, int, int, int], Damage] = {}
    for d in damage:
        seen.setdefault((d.oid, d.stream, d.level, d.index), d)
    return list(seen.values())


def _units_verified(store: ObjectStore) -> int:
    st = store.statfs()
    geom = GroupGeometry(st.block_size, st.unit_size)
    groups = -(-st.total_units // geom.units_per_group)
    return max(0, st.used_units - st.pending_units - groups * geom.units_per_chunk)


def check(store: ObjectStore) -> FsckReport:
    """Verify every block and every filesystem invariant; never writes."""
    bs = store.layout.block_size
    damage = _dedupe(store.verify())
    lost: dict[tuple[int, int], list[Range]] = {}
    reasons: dict[tuple[int, int], str] = {}
    table: list[Damage] = []
    for d in damage:
        if d.oid == 0:
            table.append(d)
            continue
        key = (d.oid, d.stream)
        lost.setdefault(key, []).append(_damage_span(bs, d))
        reasons.setdefault(key, _describe_damage(d))
    for key in lost:
        lost[key] = merge_ranges(lost[key])
    model = _Model(store, lost, reasons)
    model.analyse()
    model.report_problems()
    problems = list(model.problems)
    for d in table:
        affected = sorted({p.paths[0] for p in problems if p.kind == "inode-lost" and p.paths})
        what = "object table" if d.level >= 0 else "store"
        msg = f"{what}: {_describe_damage(d)}"
        if affected:
            msg += f"; inodes lost for {len(affected)} path(s)"
        problems.append(Problem("damaged-metadata", msg, affected, 0))
    for d in store.bad_copies:
        what = "object table" if d.oid == 0 else f"object {d.oid}"
        problems.append(Problem(
            "damaged-copy",
            f"{what}: {_describe_damage(d)}; its other copy is intact, so nothing is lost "
            "('--repair' writes both copies anew)",
            [] if d.oid == 0 else model.paths.get(d.oid, [])[:1],
            d.oid,
        ))
    commit_damage = store.commit_damage
    if commit_damage is not None:
        msg = commit_damage.describe()
        if commit_damage.newest_lost:
            msg += (
                "; until 'kryptvault mount --accept-lost-commit' acknowledges it, the vault only "
                "mounts read-only, so nothing overwrites what the lost generation referenced "
                "(copy the container now to keep it)"
            )
        else:
            msg += "; the next commit rewrites it"
        problems.insert(0, Problem("damaged-commit-record", msg))
    summary = FsckSummary(generation=store.generation, damaged_blocks=len(damage))
    for oid, node in model.nodes.items():
        summary.objects += 1
        if node.is_dir:
            summary.directories += 1
        elif node.is_reg:
            summary.files += 1
            summary.file_bytes += model.size(oid, DATA) or 0
        elif node.is_lnk:
            summary.symlinks += 1
        else:
            summary.special += 1
    summary.units_verified = _units_verified(store)
    summary.stored_bytes = summary.units_verified * store.layout.unit_size
    return FsckReport(
        problems=problems,
        summary=summary,
        metadata_damaged=bool(store.open_damage),
        damage=damage,
        damaged_ranges=model.lost,
        reasons=model.reasons,
    )


# ---------------------------------------------------------------------- repair
def _punch(store: ObjectStore, oid: int, stream: int, ranges: list[Range]) -> None:
    """Replace the blocks covering `ranges` by holes without reading them: write whole
    zero blocks (an all-zero block is stored as a hole; its old units are freed), then
    restore the size (the zero tail past it is what the store keeps anyway)."""
    bs = store.layout.block_size
    size = store.stream_size(oid, stream)
    zero = bytes(bs)
    for a, b in ranges:
        for index in range(a // bs, -(-min(b, size) // bs)):
            store.write(oid, stream, index * bs, zero)
    if store.stream_size(oid, stream) != size:
        store.truncate(oid, stream, size)


class _Fixer:
    def __init__(
        self,
        store: ObjectStore,
        lost: dict[tuple[int, int], list[Range]],
        reasons: dict[tuple[int, int], str],
        out: RepairReport,
        *,
        lost_inodes: dict[int, str] | None = None,
        punch: bool,
        owner: tuple[int, int] | None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.store = store
        self.out = out
        self.now = clock()
        self.owner = owner if owner is not None else (os.getuid(), os.getgid())
        on_lost = self._punch_found if punch else None
        self.m = _Model(store, lost, reasons, lost_inodes=lost_inodes, on_lost=on_lost)
        self.changed_nodes: set[int] = set()
        self.created: set[int] = set()
        self.lf: int | None = None
        self.log: list[str] = []

    def _punch_found(self, oid: int, stream: int, ranges: list[Range]) -> None:
        _punch(self.store, oid, stream, ranges)

    def act(self, text: str) -> None:
        self.out.actions.append(text)
        self.log.append(text)

    # ------------------------------------------------------------------ steps
    def _ensure_root(self) -> bool:
        store = self.store
        if not store.oid_in_use(ROOT_INO):
            oid = store.allocate_oid()
            if oid != ROOT_INO:  # cannot happen: allocate_oid returns the lowest free oid
                store.free_oid(oid)
                self.out.unrepaired.append("the root directory is lost and could not be recreated")
                return False
        else:
            try:
                node = Inode.unpack(ROOT_INO, store.get_attrs(ROOT_INO))
            except (IntegrityError, ValueError) as exc:
                self.out.unrepaired.append(f"the root directory's inode is damaged ({exc}); cannot repair")
                return False
            if node is not None:
                if node.is_dir:
                    return True
                self.out.unrepaired.append("object 1 (the root) is not a directory; cannot repair")
                return False
            for stream in (DATA, AUX):
                store.truncate(ROOT_INO, stream, 0)
        uid, gid = self.owner
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, 2, self.now, parent=ROOT_INO)
        store.write(ROOT_INO, DATA, 0, DIR_MAGIC)
        store.set_attrs(ROOT_INO, root.pack())
        self.act("the root directory was lost: created an empty one (everything found goes to /lost+found)")
        return True

    def _new_object(self, mode: int, parent: int = 0) -> Inode:
        oid = self.store.allocate_oid()
        root = self.m.nodes[ROOT_INO]
        node = Inode(oid, mode, root.uid, root.gid, 2 if stat.S_ISDIR(mode) else 1, self.now, parent=parent)
        self.m.nodes[oid] = node
        self.changed_nodes.add(oid)
        self.created.add(oid)
        return node

    def _lost_found(self) -> int:
        if self.lf is not None:
            return self.lf
        m = self.m
        taken = {e.name: e.oid for e in m.entries[ROOT_INO]}
        name = LOST_FOUND
        i = 0
        while name in taken:
            existing = m.nodes.get(taken[name])
            if existing is not None and existing.is_dir and taken[name] in m.reached:
                self.lf = taken[name]
                self.out.lost_and_found = _join("/", name)
                return self.lf
            i += 1
            name = LOST_FOUND + f".{i}".encode()
        node = self._new_object(stat.S_IFDIR | 0o700, parent=ROOT_INO)
        self.store.write(node.oid, DATA, 0, DIR_MAGIC)
        m.entries[node.oid] = []
        m.entries[ROOT_INO].append(_Entry(name, node.oid, _DT_DIR))
        m.changed_dirs.update((ROOT_INO, node.oid))
        m.reached.add(node.oid)
        m.dir_path[node.oid] = _join("/", name)
        self.lf = node.oid
        self.out.lost_and_found = _join("/", name)
        self.act(f"created {self.out.lost_and_found}")
        return node.oid

    def _unique(self, base: bytes) -> bytes:
        lf = self._lost_found()
        taken = {e.name for e in self.m.entries[lf]}
        base = base[:NAME_MAX]
        name, i = base, 0
        while name in taken:
            i += 1
            suffix = f".{i}".encode()
            name = base[: NAME_MAX - len(suffix)] + suffix
        return name

    def _place(self, oid: int, base: bytes) -> str:
        lf = self._lost_found()
        name = self._unique(base)
        node = self.m.nodes[oid]
        self.m.entries[lf].append(_Entry(name, oid, node.dtype))
        self.m.changed_dirs.add(lf)
        self.m.reached.add(oid)
        return _join(self.out.lost_and_found or "/lost+found", name)

    def _write_file(self, base: bytes, text: str) -> str:
        node = self._new_object(stat.S_IFREG | 0o600)
        data = text.encode()
        self.store.write(node.oid, DATA, 0, data)
        return self._place(node.oid, base)

    def run(self) -> None:
        if not self._ensure_root():
            return
        m = self.m
        m.analyse()
        for text in m.dropped:
            self.act(f"removed entry {text}")
        for p in m.problems:
            if p.kind in ("wrong-type",):
                self.act(f"fixed entry type of {p.paths[0]}")
            elif p.kind == "bad-inode":
                self.out.unrepaired.append(p.message)
        for o in sorted(m.bad_mode):
            self.out.unrepaired.append(f"object {o}: unknown file type; left alone")
        for o, why in sorted(m.bad_symlinks.items()):
            self.out.unrepaired.append(f"{m.object_paths(o)[0]}: malformed symlink ({why}); left alone")
        for o in sorted(m.dir_notes):
            if m.dir_notes[o]:
                self.act(f"directory {m.object_paths(o)[0]}: {'; '.join(m.dir_notes[o])}")
        # Damaged files and symlinks lose their names; files go to lost+found.
        relocate: dict[int, list[str]] = {}
        delete: dict[int, list[str]] = {}
        for (o, stream), _ranges in sorted(m.lost.items()):
            node = m.nodes.get(o)
            if stream != DATA or node is None or o not in m.reached:
                continue  # unlinked objects are freed below, damaged or not
            if node.is_reg:
                relocate[o] = m.object_paths(o)
            elif node.is_lnk:
                delete[o] = m.object_paths(o)
        gone = set(relocate) | set(delete)
        if gone:
            for d in list(m.reached):
                ents = m.entries.get(d)
                if ents is not None and any(e.oid in gone for e in ents):
                    m.entries[d] = [e for e in ents if e.oid not in gone]
                    m.changed_dirs.add(d)
        for o, paths in sorted(relocate.items()):
            self._salvage_file(o, paths)
        for o, paths in sorted(delete.items()):
            self.act(f"removed the symlink {', '.join(paths)}: its target is unreadable")
            m.reached.discard(o)
            m.unlinked.append(o)
        for o in m.orphan_roots:
            if o in gone:
                continue
            was = m.paths[o][0]
            new = self._place(o, f"#{o}".encode())
            self.out.relinked.append({"oid": o, "was": was, "path": new})
            self.act(f"relinked {was} as {new}")
        for o, (attrs, note) in sorted(m.xattr_fix.items()):
            if o not in m.nodes:
                continue
            data = _dump_xattrs(attrs)
            if data:
                self.store.write(o, AUX, 0, data)
            self.store.truncate(o, AUX, len(data))
            self.changed_nodes.add(o)
            self.act(f"extended attributes of {m.object_paths(o)[0]}: {note}; kept {len(attrs)}")
        for o in sorted(m.special_data):
            self.store.truncate(o, DATA, 0)
            self.act(f"{m.object_paths(o)[0]}: dropped the data of a special file")
        if self.lf is None and (m.dropped or delete or m.xattr_fix):
            self._lost_found()
        self._relink_tree()
        free = [
            o for o in sorted(set(m.unlinked) | m.blank) if o not in m.reached and self.store.oid_in_use(o)
        ]
        for o in free:
            if o in m.blank:
                self.act(f"freed object {o} (never initialised)")
            elif o not in delete:
                self.act(f"freed object {o} (no name, link count 0)")
        out = self.out
        out.lost_entries = sum(1 for o in m.dropped_oids if o not in m.reached)
        out.lost_entries += sum(len(paths) for paths in delete.values())
        out.lost_objects = len(set(m.lost_inodes) - set(m.dropped_oids) - m.reached)
        out.moved_to_lost_found = len(out.salvaged) + len(out.relinked)
        if out.lost_anything:
            self.act(f"lost: {out.loss_summary()}")
        if self.lf is not None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.now / 1e9))
            self.act(f"this log: {self.out.lost_and_found}/fsck-{stamp}.txt")
            self._write_file(f"fsck-{stamp}.txt".encode(), self._log_text())
        self._persist(free)

    def _salvage_file(self, o: int, paths: list[str]) -> None:
        m = self.m
        size = m.size(o, DATA) or 0
        ranges = _clip(m.lost[(o, DATA)], size)
        last = paths[0].rsplit("/", 1)[-1] if paths else ""
        # "(unreachable #N)" / "(lost name #N)" are placeholders, not names
        name = b"" if last.startswith("(") and last.endswith(")") else os.fsencode(last)
        base = f"{o}-".encode() + name[: NAME_MAX - 40] + b".partial" if name else f"{o}.partial".encode()
        reason = m.reasons.get((o, DATA), "unreadable")
        new = self._place(o, base)
        lost_bytes = sum(b - a for a, b in ranges)
        lost_text = (
            f"{_fmt_ranges(ranges, size)} ({lost_bytes} bytes)"
            if ranges
            else "the whole content (its size could not be read)"
        )
        note = (
            "kryptvault fsck: a file with unreadable blocks\n"
            f"original path(s): {', '.join(paths) if paths else '(none: it was an orphan)'}\n"
            f"object (inode) {o}, size {size} bytes\n"
            f"lost: {lost_text}, read as zeros in {new}\n"
            f"reason: {reason}\n"
        )
        note_path = self._write_file(os.fsencode(new.rsplit("/", 1)[-1]) + b".txt", note)
        self.out.salvaged.append(
            {
                "oid": o,
                "paths": paths,
                "path": new,
                "note": note_path,
                "lost_ranges": [list(r) for r in ranges],
            }
        )
        where = ", ".join(paths) if paths else f"orphan object {o}"
        self.act(f"moved {where} to {new}: {lost_text} unreadable, now zeros ({reason})")

    def _log_text(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.now / 1e9))
        lines = [f"kryptvault fsck --repair, {stamp}", ""]
        lines += [f"- {a}" for a in self.log]
        if self.out.unrepaired:
            lines += ["", "not repaired:"] + [f"- {u}" for u in self.out.unrepaired]
        return "\n".join(lines) + "\n"

    def _relink_tree(self) -> None:
        """Walk the edited tree from the root: parent pointers and link counts follow it."""
        m = self.m
        reached = {ROOT_INO}
        parent_of = {ROOT_INO: ROOT_INO}
        stack = [ROOT_INO]
        while stack:
            d = stack.pop()
            for e in m.entries.get(d, []):
                child = m.nodes.get(e.oid)
                if e.oid in reached or child is None:
                    continue
                reached.add(e.oid)
                if child.is_dir:
                    parent_of[e.oid] = d
                    stack.append(e.oid)
        m.reached = reached
        refs, subdirs = m.counts()
        wrong_nlink = {p.oid for p in m.problems if p.kind == "wrong-nlink"}
        wrong_parent = {p.oid for p in m.problems if p.kind == "wrong-parent"}
        for o in sorted(reached):
            node = m.nodes[o]
            want_parent = parent_of[o] if node.is_dir else 0
            want_nlink = 2 + subdirs[o] if node.is_dir else refs[o]
            path = m.paths.get(o, [f"object {o}"])[0]
            if node.parent != want_parent:
                if o in wrong_parent:
                    self.act(f"{path}: parent pointer {node.parent} -> {want_parent}")
                node.parent = want_parent
                node.ctime_ns = self.now
                self.changed_nodes.add(o)
            if node.nlink != want_nlink:
                if o in wrong_nlink:
                    self.act(f"{path}: link count {node.nlink} -> {want_nlink}")
                node.nlink = want_nlink
                node.ctime_ns = self.now
                self.changed_nodes.add(o)

    def _persist(self, free: list[int]) -> None:
        m, store = self.m, self.store
        for d in sorted(m.changed_dirs):
            if d not in m.reached or d not in m.nodes:
                continue
            directory = Directory()
            for e in m.entries.get(d, []):
                directory.add(e.name, e.oid, e.typ)
            data = directory.compact()
            if not store.is_metadata(d):
                store.mark_metadata(d)  # names get a second copy (FORMAT.md §4.2)
            store.write(d, DATA, 0, data)
            store.truncate(d, DATA, len(data))
            node = m.nodes[d]
            node.mtime_ns = node.ctime_ns = self.now
            self.changed_nodes.add(d)
        for o in sorted(self.changed_nodes):
            if o in m.nodes and store.oid_in_use(o):
                store.set_attrs(o, m.nodes[o].pack())
        for o in free:
            store.free_oid(o)


def repair(
    store: ObjectStore,
    report: FsckReport | None = None,
    *,
    owner: tuple[int, int] | None = None,
) -> RepairReport:
    """Repair in place (see the module docstring) and commit. `report` is the result of
    `check(store)` (run now if None). Raises RebuildRequired when the store is read-only
    because its metadata is damaged."""
    if store.read_only:
        lost_commit = store.commit_damage
        if lost_commit is not None and lost_commit.newest_lost and not store.open_damage:
            raise KryptvaultError(
                f"{lost_commit.describe()}; a repair would write over what the lost generation "
                "referenced: acknowledge the loss first with 'kryptvault mount --accept-lost-commit'"
            )
        if store.open_damage:
            raise RebuildRequired(
                "the vault's metadata is damaged, so it must be rebuilt into a new container"
            )
        raise KryptvaultError("the store is open read-only; open it writable to repair")
    if report is None:
        report = check(store)
    out = RepairReport()
    rewritten = store.rewrite_bad_copies()
    if rewritten:
        out.actions.append(f"rewrote {rewritten} metadata block(s) that had one bad copy, from the good one")
    lost: dict[tuple[int, int], list[Range]] = {}
    for (oid, stream), ranges in report.damaged_ranges.items():
        if oid == 0 or not store.oid_in_use(oid):
            continue
        _punch(store, oid, stream, ranges)
        lost[(oid, stream)] = list(ranges)
    fixer = _Fixer(store, lost, dict(report.reasons), out, punch=True, owner=owner)
    fixer.run()
    store.commit()
    return out


def rebuild(
    source: ObjectStore,
    dest: ObjectStore,
    report: FsckReport | None = None,
    *,
    owner: tuple[int, int] | None = None,
) -> RepairReport:
    """Copy everything readable from `source` (typically open read-only with damaged
    metadata) into the empty store `dest` under the same oids, then repair `dest` as
    `repair` would, and commit it. Unreadable blocks become zeros (and their files go to
    lost+found as partial copies); objects whose inode was lost are gone, and the entries
    naming them are removed (and logged)."""
    out = RepairReport(rebuilt=True)
    copied = copy_objects(source, dest, salvage=True)
    reasons = dict(copied.reasons)
    if report is not None:
        for key, why in report.reasons.items():
            reasons.setdefault(key, why)
    lost_inodes = {
        oid: f"its inode was in a damaged object-table block and is lost ({why})"
        for oid, why in copied.skipped.items()
    }
    fixer = _Fixer(dest, dict(copied.lost), reasons, out, lost_inodes=lost_inodes, punch=False, owner=owner)
    fixer.run()
    dest.commit()
    return out


def rebuild_container(
    source_fd: int,
    dest_fd: int,
    vault_uuid: uuid.UUID,
    keys: StoreKeys,
    source: ObjectStore,
    report: FsckReport | None = None,
    *,
    owner: tuple[int, int] | None = None,
) -> RepairReport:
    """`rebuild` into a new container file on `dest_fd` (truncated first): header copied
    verbatim, a fresh store, the repaired copy, sealed with `finalize_container` (a
    generation above the source's; the source's nonce count carried over). The caller
    swaps the files."""
    layout = source.layout
    os.ftruncate(dest_fd, 0)
    copy_header(source_fd, dest_fd)
    dest = ObjectStore.create(dest_fd, layout, vault_uuid, keys.data, keys.meta)
    try:
        out = rebuild(source, dest, report, owner=owner)
    finally:
        dest.close()
    try:
        finalize_container(
            dest_fd,
            layout,
            vault_uuid,
            keys.meta,
            after_generation=source.generation,
            base_encryptions=source.encryptions,
            lineage=source.lineage,
        )
    except OSError as exc:
        raise KryptvaultError(f"cannot write the rebuilt container: {os.strerror(exc.errno or errno.EIO)}")
    return out
