"""Offline compaction: copy the live tree of one container into a fresh, tightly packed one.

The object store never shrinks its file (docs/FORMAT.md §4.9): space freed by
deleted files is reused, but the container keeps its peak size. `compact()` writes a new
container holding only what is live and the CLI (`kryptvault compact`) swaps it in
atomically. The same copier also rebuilds a container whose metadata is damaged
(`kryptvault.fs.fsck.rebuild`), zero-filling what cannot be read.

What is preserved, exactly: every object with its **object id** (= inode number), its
128-byte attribute blob (mode, owner, times, link count, parent), both streams (file data,
directory entries, symlink target; extended attributes) byte for byte, sparseness (all-zero
blocks stay holes), the vault UUID, block size and keys, and the header bytes
[0, 32 KiB) (both header copies: keyslots, KDF parameters, sequence). Hard links survive
because directory entries name objects by oid and the oids do not change.

What changes: block placement (packed from the start of the data area, object after
object in directory-tree order, each stream's data blocks contiguous and ascending, then
its indirect blocks), the nonces (every block is re-encrypted), the commit generation
(raised above the source's) and the group descriptors (every chunk marked as written at
that generation, so an incremental backup taken from the old file copies everything).
Objects that no directory names and whose link count is 0 (files unlinked while open
before a crash; a mount frees them anyway) and objects whose attributes were never
initialised are not copied.

Nonce budget: the data key stays the same, so the new container's commit record carries
the source's encryption count plus the copy's own (docs/FORMAT.md §4.11).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kryptvault.container import pointer
from kryptvault.container.commit import CommitRecord, read_latest_commit, seal_commit
from kryptvault.container.groups import GroupGeometry, encode_descriptor
from kryptvault.container.layout import COMMIT_OFFSETS, Layout
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import StoreKeys
from kryptvault.crypto.aead import Aead
from kryptvault.crypto.secret import Secret
from kryptvault.errors import IntegrityError, KryptvaultError
from kryptvault.fs.directory import Directory
from kryptvault.fs.inode import Inode

__all__ = [
    "HEADER_BYTES",
    "CompactStats",
    "CopyResult",
    "Range",
    "compact",
    "copy_header",
    "copy_objects",
    "finalize_container",
    "merge_ranges",
    "tree_order",
]

ROOT_INO = 1
DATA, AUX = 0, 1
STREAMS = (DATA, AUX)
# Both header copies. The commit slots that follow them (32-40 KiB) belong to the store
# and are written by the new store itself; [40, 64) KiB is zero.
HEADER_BYTES = COMMIT_OFFSETS[0]
_READ_BLOCKS = 16  # read 16 blocks (1 MiB at 64 KiB blocks) per call
_BATCH_BYTES = 32 * 1024 * 1024  # below the store's 64 MiB dirty limit

Range = tuple[int, int]  # [start, end) in bytes of a stream


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass
class CopyResult:
    """What `copy_objects` did. In salvage mode `lost` holds the ranges that could not
    be read (they read as zeros in the copy) and `skipped` the objects whose attributes
    could not be read (not copied at all)."""

    objects: int = 0
    data_bytes: int = 0  # bytes of non-hole blocks written
    lost: dict[tuple[int, int], list[Range]] = field(default_factory=dict)
    reasons: dict[tuple[int, int], str] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    not_copied: list[int] = field(default_factory=list)  # unlinked / uninitialised objects


@dataclass(frozen=True)
class CompactStats:
    bytes_before: int
    bytes_after: int
    objects: int
    data_bytes: int
    generation: int

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, int]:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "saved": self.saved,
            "objects": self.objects,
            "data_bytes": self.data_bytes,
            "generation": self.generation,
        }


# ---------------------------------------------------------------------- tree order
def _load_directory(store: ObjectStore, oid: int) -> Directory | None:
    try:
        size = store.stream_size(oid, DATA)
        return Directory.load(store.read(oid, DATA, 0, size) if size else b"")
    except (IntegrityError, ValueError):
        return None


def tree_order(store: ObjectStore, oids: Iterable[int]) -> list[int]:
    """`oids` in depth-first directory-tree order from the root (each directory before
    its entries, entries in directory order); objects no readable directory names come
    last, by oid."""
    wanted = set(oids)
    order: list[int] = []
    seen: set[int] = set()
    stack = [ROOT_INO]
    while stack:
        oid = stack.pop()
        if oid in seen or oid not in wanted:
            continue
        seen.add(oid)
        order.append(oid)
        try:
            node = Inode.unpack(oid, store.get_attrs(oid))
        except (IntegrityError, ValueError):
            continue
        if node is None or not node.is_dir:
            continue
        d = _load_directory(store, oid)
        if d is not None:
            children = [child for _name, child, _typ in d.items()]
            stack.extend(reversed(children))
    order.extend(sorted(wanted - seen))
    return order


# ---------------------------------------------------------------------- stream copy
def _write_nonzero(dest: ObjectStore, oid: int, stream: int, offset: int, data: bytes, bs: int) -> int:
    """Write the blocks of `data` (which starts block-aligned at `offset`) that are not all
    zero, merging neighbours into one call; return the bytes written."""
    n = len(data)
    if data.count(0) == n:
        return 0
    zero = bytes(bs)
    written = 0
    run = -1
    pos = 0
    while pos < n:
        end = min(pos + bs, n)
        nonzero = data[pos:end] != zero[: end - pos]
        if nonzero and run < 0:
            run = pos
        elif not nonzero and run >= 0:
            dest.write(oid, stream, offset + run, data[run:pos])
            written += pos - run
            run = -1
        pos = end
    if run >= 0:
        dest.write(oid, stream, offset + run, data[run:])
        written += n - run
    return written


def _salvage_read(
    source: ObjectStore, oid: int, stream: int, offset: int, size: int, bs: int, lost: list[Range]
) -> tuple[bytes, str | None]:
    """Read block by block; unreadable blocks become zeros and are added to `lost`."""
    parts: list[bytes] = []
    reason: str | None = None
    pos = offset
    end = offset + size
    while pos < end:
        n = min(bs - pos % bs, end - pos)
        try:
            parts.append(source.read(oid, stream, pos, n))
        except IntegrityError as exc:
            parts.append(bytes(n))
            lost.append((pos, pos + n))
            reason = reason or str(exc)
        pos += n
    return b"".join(parts), reason


def _copy_stream(
    source: ObjectStore, dest: ObjectStore, oid: int, stream: int, salvage: bool, result: CopyResult
) -> None:
    bs = source.layout.block_size
    try:
        size = source.stream_size(oid, stream)
    except IntegrityError as exc:
        if not salvage:
            raise
        result.lost[(oid, stream)] = [(0, 1 << 63)]
        result.reasons[(oid, stream)] = str(exc)
        return
    lost: list[Range] = []
    reason: str | None = None
    chunk = _READ_BLOCKS * bs
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        try:
            data = source.read(oid, stream, pos, n)
        except IntegrityError:
            if not salvage:
                raise
            data, why = _salvage_read(source, oid, stream, pos, n, bs, lost)
            reason = reason or why
        result.data_bytes += _write_nonzero(dest, oid, stream, pos, data, bs)
        pos += n
    if dest.stream_size(oid, stream) != size:
        dest.truncate(oid, stream, size)
    if lost:
        result.lost[(oid, stream)] = merge_ranges(lost)
        result.reasons[(oid, stream)] = reason or "unreadable"


def copy_objects(
    source: ObjectStore,
    dest: ObjectStore,
    *,
    salvage: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CopyResult:
    """Copy every object of `source` into the empty store `dest` under the same oid.

    Without `salvage` any unreadable block raises IntegrityError (nothing is lost
    silently). With `salvage`, objects whose attributes cannot be read are skipped and
    unreadable blocks are copied as zeros; both are listed in the result. Objects with an
    uninitialised attribute blob or a link count of 0 are not copied unless salvaging
    (fsck decides about those)."""
    result = CopyResult()
    attrs: dict[int, bytes] = {}
    for oid in source.iter_oids():
        try:
            blob = source.get_attrs(oid)
        except IntegrityError as exc:
            if not salvage:
                raise
            result.skipped[oid] = str(exc)
            continue
        if not salvage:
            try:
                node = Inode.unpack(oid, blob)
            except ValueError:
                attrs[oid] = blob  # an attribute format we do not know: copy it opaquely
                continue
            if node is None or (node.nlink == 0 and oid != ROOT_INO):
                result.not_copied.append(oid)
                continue
        attrs[oid] = blob
    if not attrs:
        return result
    # Keep every oid: allocate_oid() hands out the lowest free oid, so take them all up
    # to the highest one and give the gaps back at the end.
    top = max(attrs)
    placeholders: list[int] = []
    while True:
        oid = dest.allocate_oid()
        if oid not in attrs:
            placeholders.append(oid)
        if oid >= top:
            break
    for oid, blob in attrs.items():
        dest.set_attrs(oid, blob)
        if source.is_metadata(oid):
            dest.mark_metadata(oid)
    order = tree_order(source, attrs)
    # The store flushes the most recently dirtied stream first; writing each batch in
    # reverse therefore puts the objects on disk in tree order.
    batch: list[int] = []
    batch_bytes = 0
    done = 0

    def run(objs: list[int]) -> None:
        # Whole blocks would otherwise be sealed as they are written, before the partial
        # tail blocks and indirect blocks that the flush allocates.
        dest.seal_whole_blocks = False
        try:
            for o in reversed(objs):
                for stream in (AUX, DATA):
                    _copy_stream(source, dest, o, stream, salvage, result)
            dest.flush()
        finally:
            dest.seal_whole_blocks = True

    for oid in order:
        batch.append(oid)
        for stream in STREAMS:
            with contextlib.suppress(IntegrityError):
                batch_bytes += source.stream_size(oid, stream)
        if batch_bytes >= _BATCH_BYTES:
            run(batch)
            done += len(batch)
            if progress is not None:
                progress(done, len(order))
            batch, batch_bytes = [], 0
    if batch:
        run(batch)
        done += len(batch)
        if progress is not None:
            progress(done, len(order))
    for oid in placeholders:
        dest.free_oid(oid)
    result.objects = len(attrs)
    return result


# ---------------------------------------------------------------------- container level
def copy_header(source_fd: int, dest_fd: int) -> None:
    """Copy both header copies (keyslots and all) verbatim."""
    raw = os.pread(source_fd, HEADER_BYTES, 0)
    if len(raw) != HEADER_BYTES:
        raise KryptvaultError("the container is shorter than its header")
    os.pwrite(dest_fd, raw, 0)


def _high_water(fd: int, layout: Layout, total_units: int) -> int:
    """Units up to and including the last one that holds anything but zeros.

    Free units of a new store are never written (the file grows by ftruncate), while
    every stored block is ciphertext and every descriptor has a magic, so the last
    non-zero unit bounds everything the store references (a unit of ciphertext that is
    all zeros has probability 2**-32768)."""
    us = layout.unit_size
    end = layout.unit_offset(total_units)
    step = 1 << 20
    pos = end
    while pos > layout.data_offset:
        start = max(layout.data_offset, pos - step)
        buf = os.pread(fd, pos - start, start)
        kept = len(buf.rstrip(b"\0"))
        if kept:
            last = start + kept
            return -(-(last - layout.data_offset) // us)
        pos = start
    return 0


def finalize_container(
    fd: int,
    layout: Layout,
    vault_uuid: uuid.UUID,
    meta_key: Secret,
    *,
    after_generation: int,
    base_encryptions: int,
    trim: bool = True,
    lineage: bytes | None = None,
) -> int:
    """Seal a freshly copied container so it can replace an older one. Returns its size.

    * The data area is trimmed to its last used unit (the store grows its file in steps
      of up to 1/8 and a new store leaves the tail unwritten).
    * The commit record is rewritten, into both slots, with a generation above
      `after_generation` (the source's), the trimmed size and the encryption count
      `base_encryptions` + the copy's own: the data key is the source's, so its nonce
      budget continues.
    * Every group descriptor is rewritten with every chunk at that generation, so a
      key-less incremental backup based on the old container copies all of the new one.
    """
    meta = Aead(meta_key)
    rec = read_latest_commit(fd, meta, vault_uuid.bytes)
    geom = GroupGeometry(layout.block_size, layout.unit_size)
    upg, desc = geom.units_per_group, geom.units_per_chunk
    total = rec.total_units
    if trim:
        hw = _high_water(fd, layout, total)
        within = hw % upg
        if 0 < within < desc:
            hw += desc - within  # never end inside a descriptor
        total = max(desc, min(total, hw))
    generation = max(rec.generation, after_generation) + 2
    for group in range(-(-total // upg)):
        gens = array("Q", [generation]) * geom.chunks_per_group
        os.pwrite(fd, encode_descriptor(geom, group, generation, gens), layout.unit_offset(group * upg))
    for gen in (generation - 1, generation):
        image = seal_commit(
            meta,
            vault_uuid.bytes,
            CommitRecord(
                generation=gen,
                block_size=rec.block_size,
                unit_size=rec.unit_size,
                table_root=rec.table_root,
                total_units=total,
                encryptions=base_encryptions + rec.encryptions,
                timestamp_ns=time.time_ns(),
                next_oid=rec.next_oid,
                # The copy continues the source's lineage (its rollback records).
                lineage=rec.lineage if lineage is None else lineage,
            ),
            pointer.nonce_source(),
        )
        os.pwrite(fd, image, COMMIT_OFFSETS[gen % 2])
    size = layout.unit_offset(total)
    os.ftruncate(fd, size)
    os.fsync(fd)
    return size


def _compare(source: ObjectStore, dest: ObjectStore, copied: set[int]) -> None:
    """Structural check of a copy before it may replace the original."""
    damage = dest.verify()
    if damage:
        raise IntegrityError(
            f"the compacted copy fails verification ({damage[0].reason}); nothing was replaced"
        )
    if set(dest.iter_oids()) != copied:
        raise IntegrityError("the compacted copy holds other objects than the original; nothing was replaced")
    for oid in copied:
        if dest.get_attrs(oid) != source.get_attrs(oid):
            raise IntegrityError(f"object {oid}: attributes differ in the copy; nothing was replaced")
        for stream in STREAMS:
            if dest.stream_size(oid, stream) != source.stream_size(oid, stream):
                raise IntegrityError(f"object {oid}: stream sizes differ in the copy; nothing was replaced")


def compact(
    source_fd: int,
    dest_fd: int,
    layout: Layout,
    vault_uuid: uuid.UUID,
    keys: StoreKeys,
    *,
    progress: Callable[[int, int], None] | None = None,
    dest_keys: StoreKeys | None = None,
) -> CompactStats:
    """Write a compacted copy of the container open on `source_fd` into `dest_fd` (an
    empty or disposable file; it is truncated first). The source is only read. Raises
    IntegrityError if any block of the source is damaged (run fsck --repair first): a
    compaction never drops data. The caller fsyncs nothing more and swaps the files.

    `dest_keys` (rekey): seal the copy under these keys instead of `keys`. The copy's
    nonce budget then starts afresh (a new data key), and the header copied verbatim
    still wraps the old master key: the caller must overwrite it."""
    before = os.fstat(source_fd).st_size
    out_keys = keys if dest_keys is None else dest_keys
    source = ObjectStore.open(source_fd, layout, vault_uuid, keys.data, keys.meta, read_only=True)
    try:
        if source.open_damage:
            raise IntegrityError(
                f"the vault is damaged ({source.open_damage[0].reason}); run 'kryptvault fsck --repair' first"
            )
        lost = source.commit_damage
        if lost is not None and lost.newest_lost:
            # The copy would replace the only file that still holds the lost generation.
            raise IntegrityError(
                f"{lost.describe()}; acknowledge the loss first with 'kryptvault mount --accept-lost-commit'"
            )
        os.ftruncate(dest_fd, 0)
        copy_header(source_fd, dest_fd)
        dest = ObjectStore.create(dest_fd, layout, vault_uuid, out_keys.data, out_keys.meta)
        try:
            try:
                result = copy_objects(source, dest, progress=progress)
            except IntegrityError as exc:
                raise IntegrityError(
                    f"the vault is damaged ({exc}); run 'kryptvault fsck --repair' first"
                ) from exc
            dest.commit()
        finally:
            dest.close()
        size = finalize_container(
            dest_fd,
            layout,
            vault_uuid,
            out_keys.meta,
            after_generation=source.generation,
            lineage=source.lineage,
            base_encryptions=source.encryptions if dest_keys is None else 0,
        )
        check = ObjectStore.open(dest_fd, layout, vault_uuid, out_keys.data, out_keys.meta, read_only=True)
        try:
            if check.open_damage:
                raise IntegrityError("the compacted copy does not open cleanly; nothing was replaced")
            _compare(source, check, set(result_oids(source, result)))
            generation = check.generation
        finally:
            check.close()
    finally:
        source.close()
    return CompactStats(before, size, result.objects, result.data_bytes, generation)


def result_oids(source: ObjectStore, result: CopyResult) -> list[int]:
    """The oids `copy_objects` copied (every in-use oid but the skipped/not copied ones)."""
    leave = set(result.skipped) | set(result.not_copied)
    return [oid for oid in source.iter_oids() if oid not in leave]
