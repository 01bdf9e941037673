"""Copy-on-write encrypted object store over the data area of one container file.

docs/FORMAT.md §4 documents every byte; in short:

* objects (oid u64, 0 = the object table) own two byte streams and a 128-byte attr blob;
* a stream is a radix tree of 64 KiB blocks; block pointers carry unit, length, nonce and
  GCM tag, so every block is authenticated by its parent up to the commit record;
* nothing referenced by the last durable commit is ever overwritten; a commit writes the
  changed blocks bottom-up, syncs, then writes the alternate commit slot and syncs again;
* free space is not stored: open() walks the metadata of every tree and rebuilds it.

Thread safety: every public method holds one RLock. Sealed blocks are written to their
(fresh, unreferenced) units by one I/O thread (`_Writer`), in order; everything that reads
such units back, and every commit, waits for those writes first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
import time
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import overload

from kryptvault.container import pointer as fmt
from kryptvault.container.alloc import FRESH, UnitMap
from kryptvault.container.commit import (
    LINEAGE_SIZE,
    CommitDamage,
    CommitRecord,
    inspect_commits,
    seal_commit,
)
from kryptvault.container.groups import (
    GroupGeometry,
    changed_chunks_since,
    decode_descriptor,
    encode_descriptor,
)
from kryptvault.container.layout import COMMIT_OFFSETS, COMMIT_SLOT_SIZE, Layout
from kryptvault.crypto.aead import Aead, AuthenticationFailed
from kryptvault.crypto.secret import Secret
from kryptvault.errors import FormatError, IntegrityError, KryptvaultError

__all__ = [
    "BlockIntegrityError",
    "Damage",
    "NoSpace",
    "NonceBudgetExhausted",
    "ObjectStore",
    "StoreClosed",
    "StoreStats",
    "UnknownObject",
    "changed_chunks_since",
]

HOLE = fmt.HOLE
PTR = fmt.POINTER_SIZE
NONCE_BUDGET = 2**32  # encryptions per key with random 96-bit nonces (NIST SP 800-38D 8.3)
DEFAULT_DIRTY_LIMIT = 64 * 1024 * 1024
# The kernel's page cache holds file data too (keep_cache, block stores).
DEFAULT_CACHE_LIMIT = 24 * 1024 * 1024
MAX_STREAM_SIZE = 2**63 - 1
CRASH_ENV = "KRYPTVAULT_TEST_CRASH_AFTER_WRITES"
# One run (one pwrite, see _PWRITE_MAX) of up to this much ciphertext. Its staging buffers
# are touched page by page as runs fill them, and a new daemon's first touches fault
# (a run of small files fills them 4 KiB a file): 1 MiB halves a create's page faults
# against 4 MiB, with the same sequential write speed (measured here).
_WRITE_BATCH_BYTES = 1024 * 1024
_STAGE_BUFFERS = 2  # staging buffers of that size: one being filled, one in flight
_WRITER_IDLE_S = 2.0  # the writer's I/O thread ends after this long without work
_POOL_MAX = 64  # spare full-size block buffers kept to avoid page-fault churn
_WRITE_BATCH_IOVECS = 512
_KEEP_CLEAN_STREAMS = 4096
_DIRECT_BUDGET_MARGIN = 1 << 20
_DIRECT_MIN_BYTES = 512 * 1024  # writes this large seal their whole blocks at once
# Every metadata block (object-table blocks, indirect blocks) is stored twice, the copies
# far apart (docs/FORMAT.md §4.2 "ditto"): space estimates multiply metadata by this.
METADATA_COPIES = 2
_DITTO_MAX = 0x7FFF  # the ditto field is an i16 count of chunks
# Object-table entry flag (format 2): the object's data stream is filesystem metadata
# (a directory's entries), so its data blocks get second copies too.
ENTRY_METADATA = 0x02
# Space kept free for the commits of operations that free space (unlink, truncate): on
# a full vault they still work, and their commit makes the freed units reusable.
RESERVE_BYTES = 2 * 1024 * 1024
# Host space never counted as the vault's: the host filesystem's own metadata (extent
# blocks of the growing container) and rounding.
HOST_MARGIN_BYTES = 1024 * 1024
# Metadata blocks one change may dirty besides its data blocks: indirect blocks on the
# path of a stream up to depth 3 (files up to ~175 GiB with 64 KiB blocks), twice for a
# span crossing an indirect block, plus the object-table entry's block.
OP_META_BLOCKS = 7
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How old a look at the host's free space may be for a write that clearly fits: a fresh
# statvfs for every 4 KiB write costs more than the rest of the check.
HOST_STATFS_AGE = 0.25


class BlockIntegrityError(IntegrityError):
    """A block failed to authenticate or its pointer is malformed. Names what was hit."""

    def __init__(self, oid: int, stream: int, level: int, index: int, reason: str) -> None:
        self.oid, self.stream, self.level, self.index, self.reason = oid, stream, level, index, reason
        what = "block" if level == 0 else f"indirect block (level {level})"
        super().__init__(f"object {oid} stream {stream}: {what} {index}: {reason}")


class NonceBudgetExhausted(KryptvaultError):
    """The data or meta key has been used for 2**32 encryptions; the vault must be rekeyed."""


class UnknownObject(KryptvaultError, LookupError):
    """The oid is not in use."""


class NoSpace(OSError):
    """The container cannot grow on the host filesystem (ENOSPC). Nothing was changed."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.ENOSPC, detail)


class StoreClosed(KryptvaultError):
    """The store was closed (or failed a sync and refuses further writes)."""


@dataclass(frozen=True)
class Damage:
    oid: int
    stream: int
    level: int  # 0 = data block, >= 1 indirect block; -1 = not tied to one block
    index: int
    reason: str


@dataclass(frozen=True)
class StoreStats:
    block_size: int
    unit_size: int
    total_units: int  # size of the data area
    free_units: int  # allocatable now
    used_units: int  # total - free: live data, metadata, descriptors, frees awaiting commit
    pending_units: int  # freed in the running transaction (or held for a backup)
    objects: int
    container_bytes: int


class _Stream:
    __slots__ = (
        "depth", "dirty", "meta_dirty", "oid", "ra_next", "ra_until", "root", "size", "stream", "units",
    )

    def __init__(self, oid: int, stream: int, size: int, depth: int, root: bytes) -> None:
        self.oid = oid
        self.stream = stream
        self.size = size
        self.depth = depth
        self.root = root  # pointer to the last flushed version of block (depth, 0)
        # (level, index) -> full-size plaintext that supersedes the flushed version.
        # Invariant: if (L, i) is dirty and L < depth then (L + 1, i // fanout) is dirty.
        self.dirty: dict[tuple[int, int], bytearray] = {}
        self.meta_dirty = False  # size/depth/root differ from the table entry
        # Units of every flushed block the tree (dirty nodes included) points to; -1 until
        # `stored_units` first walks it, then kept up to date wherever a pointer changes.
        self.units = -1
        # Read-ahead (ObjectStore._read_ahead): the block a sequential read would start
        # at next, and the last block whose units the kernel was asked to fetch.
        self.ra_next = 0
        self.ra_until = -1


def _advise_willneed(fd: int, runs: list[list[int]]) -> int:
    """Ask the kernel to fetch each (offset, length) into the page cache without waiting;
    how many it took (advice only: a descriptor that takes none loses nothing)."""
    for taken, (at, length) in enumerate(runs):
        try:
            os.posix_fadvise(fd, at, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            return taken
    return len(runs)


def _ditto(flags: int) -> int:
    """The pointer's i16 ditto field (stored in the u16 at offset 10): the distance in
    chunks from copy 1 to the block's second copy, 0 for a block with one copy."""
    return flags - 0x10000 if flags & 0x8000 else flags


def _ptr_units(ptr: bytes) -> int:
    """Allocation units a block pointer's runs occupy, both copies (0 for a hole)."""
    if ptr == HOLE:
        return 0
    units, flags = fmt.POINTER.unpack_from(ptr)[1:3]
    return int(units) * (2 if flags else 1)


def _libc_function(name: str, argtypes: list[type]) -> Callable[[int, int, int, int], int] | None:
    """libc's function `name` (Linux), called without the GIL; None where unavailable."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_INT, _OFF = ctypes.c_int, ctypes.c_int64
_SYNC_FILE_RANGE = _libc_function("sync_file_range", [_INT, _OFF, _OFF, ctypes.c_uint])  # fd, off, n, flags
_FALLOCATE = _libc_function("fallocate", [_INT, _INT, _OFF, _OFF])  # fd, mode, offset, length


def _allocate(fd: int, offset: int, length: int) -> None:
    """Give [offset, offset+length) disk blocks (the file grows to cover it): fallocate(2),
    not posix_fallocate, whose fallback on filesystems without it writes every block.
    Raises OSError; EOPNOTSUPP where the host cannot preallocate."""
    if _FALLOCATE is None:  # pragma: no cover - not Linux
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    while _FALLOCATE(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait

# At most this much per write(2). A 2 MiB or larger buffered write makes the host's page
# cache take 2 MiB folios; on a VM that reports free memory to its hypervisor (virtio
# free page reporting, order 9) those come from discarded memory and cost ~20 µs per
# page to fault back in: 4 MiB pwrites into a new file ran at ~160 MB/s there, 1 MiB
# ones at 1.5-4.6 GB/s (measured on this project's 2-core VM).
_PWRITE_MAX = 1 << 20
# How far ahead of a sequential read the kernel is asked to fetch a stream's blocks:
# 2 MiB (the FUSE kernel side reads 128 KiB at a time, ahead of the application; a
# 1 MiB window gained less on this VM's disk).
_READ_AHEAD_BLOCKS = 32
# How many directory blocks an open asks the kernel to read ahead (advise_directory_readahead):
# 64 MiB at most of a vault's directories; the others are read when they are used.
_READAHEAD_DIRECTORIES = 1024


def _write_batches(
    bufs: list[memoryview] | list[bytes], limit: int = _PWRITE_MAX
) -> Iterator[list[memoryview] | list[bytes]]:
    """`bufs` cut into consecutive lists of at most `limit` bytes each (a longer buffer
    is sliced), in order; one list when all of it fits."""
    if sum(len(b) for b in bufs) <= limit:
        yield bufs
        return
    batch: list[memoryview] = []
    room = limit
    for buf in bufs:
        view = memoryview(buf)
        while len(view):
            take = view[:room]
            batch.append(take)
            view = view[len(take):]
            room -= len(take)
            if room == 0:
                yield batch
                batch, room = [], limit
    if batch:
        yield batch


class _Writer:
    """Collects sealed blocks bound for consecutive units into a staging buffer and hands
    each full run to an I/O thread: one pwrite per run, then writeback of the run is
    started (sync_file_range), so encryption and the caller's next requests overlap the
    copy into the page cache and the disk. Runs are written one at a time in the order
    they were handed over. `wait()` returns once every run is written and raises the
    first write error. Only called under the store lock; the I/O thread takes only the
    writer's own condition (and calls `store._pwrite`)."""

    __slots__ = (
        "_bufs", "_bytes", "_cond", "_error", "_free", "_nbuf", "_next", "_pending", "_queue",
        "_stage", "_start", "_store", "_thread",
    )

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[list[memoryview], int, memoryview | None] | None] = deque()
        self._free: list[memoryview] = []
        self._nbuf = 0
        self._pending = 0  # runs handed over and not yet written
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stage: memoryview | None = None
        self._bufs: list[memoryview] = []  # without Aead.seal_into: sealed buffers, gathered
        self._start = -1
        self._next = -1
        self._bytes = 0

    @property
    def busy(self) -> bool:
        """True if some sealed block may not have reached the file yet."""
        return bool(self._bytes or self._pending)

    def seal(self, unit: int, units: int, nonce: bytes, plain: memoryview, aad: bytes) -> bytes:
        """Encrypt `plain` for `unit`, queue the ciphertext, return the tag."""
        length = len(plain)
        if self._bytes and (
            unit != self._next
            or self._bytes + length > _WRITE_BATCH_BYTES
            or len(self._bufs) >= _WRITE_BATCH_IOVECS
        ):
            self.submit()
        if not self._bytes:
            self._start = unit
        seal_into = self._store._seal_into
        if seal_into is not None:
            stage = self._stage
            if stage is None:
                stage = self._stage = self._take_stage()
            out = stage[self._bytes : self._bytes + length + 16]
            seal_into(nonce, plain, aad, out)
            tag = bytes(out[length:])
        else:
            sealed = self._store._data.seal(nonce, plain, aad)
            tag = sealed[length:]
            self._bufs.append(memoryview(sealed)[:length])
        self._bytes += length
        self._next = unit + units
        return tag

    def put(self, unit: int, data: bytes) -> None:
        """Queue ciphertext sealed elsewhere (a metadata block's copies) for `unit`, after
        the run collected so far."""
        self.submit()
        offset = self._store.layout.unit_offset(unit)
        with self._cond:
            self._queue.append(([memoryview(data)], offset, None))
            self._pending += 1
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-store-writer", daemon=True)
                self._thread.start()

    def _take_stage(self) -> memoryview:
        with self._cond:
            while not self._free and self._nbuf >= _STAGE_BUFFERS:
                self._cond.wait()  # all in flight: the I/O thread returns one
            if self._free:
                return self._free.pop()
            self._nbuf += 1
        # An anonymous mapping, not a bytearray: bytearray zero-fills, so every buffer
        # would be wholly resident after the first small write, and a lock's exit tears
        # down every resident page (under TCG ~8 ms for the two). Untouched pages of a
        # mapping cost nothing until a large write fills them.
        return memoryview(mmap.mmap(-1, _WRITE_BATCH_BYTES + 16))

    def submit(self) -> None:
        """Hand the run collected so far to the I/O thread."""
        if not self._bytes:
            return
        offset = self._store.layout.unit_offset(self._start)
        stage = self._stage
        item: tuple[list[memoryview], int, memoryview | None]
        if stage is not None:
            item = ([stage[: self._bytes]], offset, stage)
            self._stage = None
        else:
            item = (self._bufs, offset, None)
            self._bufs = []
        self._bytes = 0
        with self._cond:
            self._queue.append(item)
            self._pending += 1
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-store-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        store, cond, queue = self._store, self._cond, self._queue
        while True:
            with cond:
                while not queue:
                    # Idle: end the thread (it holds the store), `submit` starts another.
                    if not cond.wait(_WRITER_IDLE_S) and not queue:
                        self._thread = None
                        return
                item = queue.popleft()
            if item is None:
                return
            bufs, offset, stage = item
            try:
                if self._error is None:
                    store._pwrite(bufs, offset)
                    if _SYNC_FILE_RANGE is not None:
                        _SYNC_FILE_RANGE(store._fd, offset, sum(len(b) for b in bufs),
                                         _SYNC_FILE_RANGE_WRITE)
            except BaseException as exc:  # reported by wait()
                self._error = exc
            finally:
                for b in bufs:
                    b.release()
                with cond:
                    if stage is not None:
                        self._free.append(stage)
                    self._pending -= 1
                    cond.notify_all()

    def wait(self) -> None:
        """Write everything sealed so far; raise the first error of any earlier write."""
        self.submit()
        if self._pending:
            with self._cond:
                while self._pending:
                    self._cond.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Wait for the I/O thread (errors are dropped: the store is closing) and end it;
        free the staging buffers."""
        with contextlib.suppress(BaseException):
            self.wait()
        with self._cond:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.append(None)
                self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.release_buffers()

    def release_buffers(self) -> None:
        """Drop the spare staging buffers (none is in flight after `wait()`)."""
        with self._cond:
            self._nbuf -= len(self._free)
            self._free.clear()
        if self._stage is not None and not self._bytes:
            self._stage = None
            with self._cond:
                self._nbuf -= 1


class ObjectStore:
    ATTR_SIZE: int = fmt.ATTR_SIZE

    # ------------------------------------------------------------------ construction
    def __init__(
        self,
        fd: int,
        layout: Layout,
        vault_uuid: uuid.UUID,
        data_key: Secret,
        meta_key: Secret,
        *,
        dirty_limit: int,
        cache_limit: int,
        read_only: bool,
    ) -> None:
        self._fd = fd
        self.layout = layout
        self._uuid = vault_uuid.bytes
        self._data = Aead(data_key)
        self._meta = Aead(meta_key)
        self._lock = threading.RLock()
        bs, us = layout.block_size, layout.unit_size
        self._bs = bs
        self._us = us
        self._upc = bs // us
        self._fanout = bs // PTR
        self._epb = bs // fmt.ENTRY_SIZE
        self._geom = GroupGeometry(bs, us)
        self._cpg = self._geom.chunks_per_group
        self._units = UnitMap(self._geom.units_per_group, self._upc)
        caps = [1]
        while caps[-1] * bs < 2**64:
            caps.append(caps[-1] * self._fanout)
        self._cap = caps  # data blocks addressable by a tree of depth d
        self._max_depth = len(caps) - 1
        self._zero = bytes(bs)
        self._zero_view = memoryview(self._zero)
        self._dirty_limit = dirty_limit
        self._cache_limit = cache_limit
        self._cache: OrderedDict[bytes, bytes | bytearray] = OrderedDict()
        self._cache_bytes = 0
        self._pool: list[bytearray] = []
        self._pool_max = max(_POOL_MAX, dirty_limit // bs)
        self._scratch = bytearray(bs + 16)
        # Optional zero-copy AEAD entry point (Aead.seal_into) when available.
        self._seal_into = getattr(self._data, "seal_into", None)
        self._aw = _Writer(self)
        # Seal whole-block writes at once (see _write_into). Off: every block stays dirty
        # until the flush, which allocates each stream's blocks together (compaction).
        self.seal_whole_blocks = True
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._dirty_streams: dict[tuple[int, int], _Stream] = {}
        self._dirty_bytes = 0
        self._flushed_bytes = 0  # ciphertext written in this transaction
        self._txn_dirty = False
        self._touched: set[int] = set()  # global chunk numbers written in this transaction
        self._descriptors: dict[int, array] = {}  # type: ignore[type-arg]
        self._inuse = bytearray(1)  # per oid: 0 free, 1 in use, 2 unknown (table damaged)
        self._table = _Stream(0, 0, fmt.ENTRY_SIZE, 0, HOLE)
        self._enc_count = 0
        self.generation = 0
        self._writes = 0
        crash = os.environ.get(CRASH_ENV)
        self._crash_after = int(crash) if crash else 0
        self._read_only = read_only
        self._failed: str | None = None
        # Why the last flush or commit could not allocate (the host disk filled up); the
        # store stays consistent and a later commit may succeed. Cleared by one that does.
        self._stalled: str | None = None
        # Every unit inside the file has disk blocks (see _grow_file): free units count
        # as room. False if a preallocation failed, then only the host's space counts.
        self._backed = True
        self._host_room: tuple[float, int] | None = None  # (monotonic time, units): statvfs
        self._open_damage: list[Damage] = []
        # (oid, stream, level, index) -> why one copy of that metadata block is bad while
        # the other one authenticated (reads fall back; fsck reports, --repair rewrites).
        self._bad_copies: dict[tuple[int, int, int, int], str] = {}
        self._meta_oids: set[int] = set()  # entries flagged ENTRY_METADATA
        self._readahead_roots: list[bytes] = []  # advise_directory_readahead, once
        self._advisor: ThreadPoolExecutor | None = None  # _read_ahead's, started on first use
        self._commit_damage: CommitDamage | None = None
        self._lost_commit_held = False  # newest record lost and not acknowledged: no writes
        self.lineage = bytes(LINEAGE_SIZE)
        self._closed = False

    @classmethod
    def create(
        cls,
        fd: int,
        layout: Layout,
        vault_uuid: uuid.UUID,
        data_key: Secret,
        meta_key: Secret,
        *,
        dirty_limit: int = DEFAULT_DIRTY_LIMIT,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> ObjectStore:
        """Write generation 1 (an object table holding only entry 0) into `fd`."""
        self = cls(fd, layout, vault_uuid, data_key, meta_key,
                   dirty_limit=dirty_limit, cache_limit=cache_limit, read_only=False)
        with self._lock:
            self._resize(self._upc + 256)  # group 0's descriptor + 1 MiB
            self._pwrite([bytes(COMMIT_SLOT_SIZE)], COMMIT_OFFSETS[0])
            self._touched.add(0)
            self._txn_dirty = True
            self.commit()
        return self

    @classmethod
    def open(
        cls,
        fd: int,
        layout: Layout,
        vault_uuid: uuid.UUID,
        data_key: Secret,
        meta_key: Secret,
        *,
        dirty_limit: int = DEFAULT_DIRTY_LIMIT,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        read_only: bool = False,
        accept_lost_commit: bool = False,
    ) -> ObjectStore:
        """Open the last durable commit. If metadata is damaged (see `open_damage`) the
        store opens read-only: free space cannot be known, so nothing may be written.
        If the newest commit record is damaged (`commit_damage`), it opens read-only too
        unless `accept_lost_commit`: the units the lost generation referenced count as
        free in the generation opened, and the first commit would reuse them."""
        self = cls(fd, layout, vault_uuid, data_key, meta_key,
                   dirty_limit=dirty_limit, cache_limit=cache_limit, read_only=read_only)
        with self._lock:
            self._load()
            damage = self._commit_damage
            if damage is not None and damage.newest_lost and not accept_lost_commit:
                self._read_only = True
                self._lost_commit_held = True
            if not self._read_only:
                self._preallocate()
        return self

    def _load(self) -> None:
        slots, self._commit_damage = inspect_commits(self._fd, self.layout, self._meta, self._uuid)
        rec = slots.latest
        self.lineage = rec.lineage
        if rec.block_size != self._bs or rec.unit_size != self._us:
            raise FormatError(
                f"commit record says block/unit size {rec.block_size}/{rec.unit_size}, "
                f"header says {self._bs}/{self._us}"
            )
        self.generation = rec.generation
        self._enc_count = rec.encryptions
        size, depth, root = fmt.unpack_root(rec.table_root)
        if depth > self._max_depth or size % fmt.ENTRY_SIZE:
            raise IntegrityError("commit record holds a malformed object-table root")
        self._table = _Stream(0, 0, size, depth, root)
        file_units = max(0, (os.fstat(self._fd).st_size - self.layout.data_offset) // self._us)
        total = rec.total_units
        if file_units < total:
            self._open_damage.append(Damage(0, 0, -1, 0,
                f"container is {total - file_units} units shorter than its last commit says"))
        self._resize(max(total, file_units), grow_file=False)
        damage = self._open_damage
        self._mark_tree(0, 0, depth, 0, root)
        n_entries = size // fmt.ENTRY_SIZE
        inuse = bytearray(max(n_entries, 1))
        epb, esz = self._epb, fmt.ENTRY_SIZE
        r0, r1 = fmt.ROOT_OFFSETS
        for b in range(-(-n_entries // epb)):
            first = b * epb
            count = min(epb, n_entries - first)
            try:
                blk = self._data_block(self._table, b)
            except BlockIntegrityError as exc:
                damage.append(Damage(0, 0, exc.level, exc.index, exc.reason))
                inuse[first : first + count] = b"\x02" * count
                continue
            if blk is None:
                continue
            for i in range(min(count, len(blk) // esz)):
                base = i * esz
                if not blk[base] & fmt.ENTRY_IN_USE:
                    continue
                oid = first + i
                if oid == 0:
                    damage.append(Damage(0, 0, -1, 0, "object-table entry 0 is marked in use"))
                    continue
                inuse[oid] = 1
                metadata = bool(blk[base] & ENTRY_METADATA)
                if metadata:
                    self._meta_oids.add(oid)
                for st, off in ((0, r0), (1, r1)):
                    _ssize, sdepth, sroot = fmt.unpack_root(blk, base + off)
                    if sdepth > self._max_depth:
                        damage.append(Damage(oid, st, -1, 0, f"stream root has depth {sdepth}"))
                        continue
                    one_block_directory = metadata and st == 0 and sdepth == 0 and sroot != HOLE
                    if one_block_directory and len(self._readahead_roots) < _READAHEAD_DIRECTORIES:
                        self._readahead_roots.append(sroot)
                    self._mark_tree(oid, st, sdepth, 0, sroot)
        self._inuse = inuse
        if damage:
            self._read_only = True

    def _ptr_problem(self, ptr: bytes) -> str | None:
        unit, units, flags, _n, _t = fmt.unpack_pointer(ptr)
        if unit == 0:
            return "malformed block pointer (hole with nonzero fields)"
        if not 1 <= units <= self._upc:
            return f"block pointer has bad stored length {units}"
        if unit + units > self._units.total:
            return f"block pointer to units {unit}+{units} beyond the container"
        if self._units.is_descriptor(unit, units):
            return f"block pointer to units {unit}+{units} overlaps a group descriptor"
        if flags:
            copy2 = unit + _ditto(flags) * self._upc
            if copy2 <= 0 or copy2 + units > self._units.total:
                return f"second copy at units {copy2}+{units} beyond the container"
            if self._units.is_descriptor(copy2, units):
                return f"second copy at units {copy2}+{units} overlaps a group descriptor"
        return None

    def _mark_tree(self, oid: int, stream: int, level: int, index: int, ptr: bytes) -> None:
        """Open-time walk: mark units of every block reachable from `ptr`; read only
        indirect blocks (and, via the caller, object-table blocks)."""
        if ptr == HOLE:
            return
        problem = self._ptr_problem(ptr)
        if problem is not None:
            self._open_damage.append(Damage(oid, stream, level, index, problem))
            return
        unit, units, flags = fmt.POINTER.unpack_from(ptr)[:3]
        runs = [unit, unit + _ditto(flags) * self._upc] if flags else [unit]
        for first in runs:
            if not self._units.mark_used(first, units):
                self._open_damage.append(
                    Damage(oid, stream, level, index, f"units {first}+{units} referenced twice"))
        if level == 0:
            return
        try:
            node = self._fetch(oid, stream, level, index, ptr)
        except BlockIntegrityError as exc:
            self._open_damage.append(Damage(oid, stream, level, index, exc.reason))
            return
        f = self._fanout
        # Ceiling division: a pointer may straddle the stored end (missing bytes are zeros).
        for c in range(min(f, -(-len(node) // PTR))):
            child = bytes(node[c * PTR : (c + 1) * PTR]).ljust(PTR, b"\0")
            if child != HOLE:
                self._mark_tree(oid, stream, level - 1, index * f + c, child)

    # ------------------------------------------------------------------ low-level I/O
    def _pwrite(self, bufs: list[memoryview] | list[bytes], offset: int) -> None:
        fd = self._fd
        for batch in _write_batches(bufs):
            total = sum(len(b) for b in batch)
            done = os.pwrite(fd, batch[0], offset) if len(batch) == 1 else os.pwritev(fd, batch, offset)
            if done != total:  # short write: finish it
                rest = b"".join(bytes(b) for b in batch)[done:]
                while rest:
                    n = os.pwrite(fd, rest, offset + done)
                    done += n
                    rest = rest[n:]
            offset += total
        self._writes += 1
        if self._writes == self._crash_after:
            os._exit(75)

    def _sync(self) -> None:
        os.fdatasync(self._fd)

    def _resize(self, total: int, *, grow_file: bool = True) -> None:
        upg, desc = self._geom.units_per_group, self._upc
        within = total % upg
        if 0 < within < desc:
            total += desc - within  # never end inside a descriptor
        if grow_file:  # first: if the file cannot grow, the unit map must not either
            self._grow_file(self.layout.unit_offset(total))
        for group in self._units.resize(total):
            self._touched.add(group * self._cpg)

    def _grow_file(self, size: int) -> None:
        """Grow the container with its disk blocks allocated, not as a sparse file: a full
        host disk then shows here, where nothing has been changed yet, instead of as a
        failed write of sealed blocks (or a failed fdatasync) in the middle of a commit."""
        fd = self._fd
        self._host_room = None
        old = os.fstat(fd).st_size
        if size <= old:
            os.ftruncate(fd, size)
            return
        try:
            _allocate(fd, old, size - old)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, old)  # give back what a partial allocation took
                raise
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, size)  # a host that cannot preallocate: sparse, as before
            self._backed = False

    def _preallocate(self) -> None:
        """Give every hole of an existing container (one grown sparse by an older version,
        or copied sparse) its disk blocks, so free units inside it are real room."""
        fd = self._fd
        start = self.layout.data_offset
        size = os.fstat(fd).st_size
        if size <= start:
            return
        try:
            _allocate(fd, start, size - start)
        except OSError:
            self._backed = False  # free units inside it may be holes: they do not count

    def _alloc(self, units: int) -> int:
        unit = self._units.alloc(units)
        while unit < 0:
            total = self._units.total
            try:
                self._resize(total + max(2 * units + self._upc, total // 8, 256))
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                try:  # the generous step does not fit: exactly what this block needs
                    self._resize(total + units + self._upc)
                except OSError as exc2:
                    if exc2.errno not in _NO_SPACE:
                        raise
                    raise NoSpace(
                        f"the disk holding the container is full ({exc2.strerror})") from None
            unit = self._units.alloc(units)
        return unit

    def _drain(self) -> None:
        """Wait until every sealed block is in the file; a failed write fails the store."""
        try:
            self._aw.wait()
        except BaseException as exc:
            self._fail(exc)
            raise

    def _take_buffer(self) -> bytearray:
        """A full-size block buffer with arbitrary content (recycled if possible).
        Only write paths may call this: read paths hold views of cached buffers, which
        the cache may have moved into the pool meanwhile."""
        return self._pool.pop() if self._pool else bytearray(self._bs)

    def _cache_put(self, ptr: bytes, plain: bytes | bytearray) -> None:
        cache = self._cache
        cache[ptr] = plain
        self._cache_bytes += len(plain)
        bs, pool = self._bs, self._pool
        while self._cache_bytes > self._cache_limit and cache:
            _k, old = cache.popitem(last=False)
            self._cache_bytes -= len(old)
            if type(old) is bytearray and len(old) == bs and len(pool) < self._pool_max:
                pool.append(old)

    def _cache_pop(self, ptr: bytes) -> bytes | bytearray | None:
        hit = self._cache.pop(ptr, None)
        if hit is not None:
            self._cache_bytes -= len(hit)
        return hit

    @overload
    def _read_disk(self, oid: int, stream: int, level: int, index: int, ptr: bytes) -> bytes | bytearray: ...
    @overload
    def _read_disk(
        self, oid: int, stream: int, level: int, index: int, ptr: bytes, into: memoryview
    ) -> memoryview: ...
    def _read_disk(
        self, oid: int, stream: int, level: int, index: int, ptr: bytes, into: memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        """Read and authenticate one block from disk: its stored form (trailing zero units
        stripped), decrypted into fresh memory or, given `into` (a block's room), into the
        start of `into` (a view of it is returned). A block with a second copy is read from
        copy 2 when copy 1 fails; the bad copy is remembered (`bad_copies`) for fsck to
        report and repair."""
        problem = self._ptr_problem(ptr)
        if problem is not None:
            raise BlockIntegrityError(oid, stream, level, index, problem)
        unit, _units, flags, _nonce, _tag = fmt.unpack_pointer(ptr)
        got = self._read_copy(oid, stream, level, index, ptr, unit, into)
        if not isinstance(got, str):
            return got
        if not flags:
            raise BlockIntegrityError(oid, stream, level, index, got)
        second = self._read_copy(oid, stream, level, index, ptr, unit + _ditto(flags) * self._upc, into)
        if isinstance(second, str):
            raise BlockIntegrityError(
                oid, stream, level, index, f"both copies are unreadable (copy 1: {got}; copy 2: {second})")
        self._bad_copies[(oid, stream, level, index)] = f"copy 1: {got}"
        return second

    def _read_copy(
        self, oid: int, stream: int, level: int, index: int, ptr: bytes, unit: int, into: memoryview | None
    ) -> bytes | bytearray | memoryview | str:
        """One copy of a block, authenticated, or why it is unreadable."""
        _unit, units, _flags, nonce, tag = fmt.unpack_pointer(ptr)
        if self._aw.busy and self._units.map[unit] == FRESH:
            self._drain()  # sealed in this transaction: its write may still be queued
        length = units * self._us
        sealed = memoryview(self._scratch)[: length + 16]
        got = os.preadv(self._fd, [sealed[:length]], self.layout.unit_offset(unit))
        if got != length:
            return "block lies past the end of the container"
        sealed[length:] = tag
        aad = fmt.block_aad(self._uuid, oid, stream, level, index, length)
        # Always fresh memory here (or the caller's `into`), never a pooled buffer: a caller
        # may still hold a view of a buffer that the cache evicted earlier in the same read.
        try:
            if into is not None:
                self._data.open_into(nonce, sealed, aad, into[:length])
                return into[:length]
            return self._data.open(nonce, sealed, aad)
        except AuthenticationFailed:
            return "failed authentication"

    def _fetch(self, oid: int, stream: int, level: int, index: int, ptr: bytes) -> bytes | bytearray:
        hit = self._cache.get(ptr)
        if hit is not None:
            self._cache.move_to_end(ptr)
            return hit
        plain = self._read_disk(oid, stream, level, index, ptr)
        self._cache_put(ptr, plain)
        return plain

    # ------------------------------------------------------------------ tree navigation
    def _ptr_of(self, s: _Stream, level: int, index: int) -> bytes:
        """The pointer to the last flushed version of block (level, index), or HOLE."""
        depth = s.depth
        if level == depth:
            return s.root if index == 0 else HOLE
        if level > depth or index >= self._cap[depth - level]:
            return HOLE
        f = self._fanout
        parent = self._node(s, level + 1, index // f)
        if parent is None:
            return HOLE
        off = (index % f) * PTR
        if off >= len(parent):
            return HOLE
        # The stored form drops trailing zero units, and 4096 is no multiple of PTR, so a
        # pointer may straddle the stored end: the missing bytes are zeros.
        return bytes(parent[off : off + PTR]).ljust(PTR, b"\0")

    def _node(self, s: _Stream, level: int, index: int) -> bytes | bytearray | None:
        """Current content of a block (dirty copy or authenticated stored form); None = hole."""
        d = s.dirty.get((level, index))
        if d is not None:
            return d
        ptr = self._ptr_of(s, level, index)
        if ptr == HOLE:
            return None
        return self._fetch(s.oid, s.stream, level, index, ptr)

    def _walked_node(self, s: _Stream, level: int, index: int, ptr: bytes) -> bytes | bytearray | None:
        """As `_node`, for a walk down the tree that already has the block's pointer;
        None also for a block that fails authentication (a walk skips what it cannot read)."""
        node = s.dirty.get((level, index))
        if node is not None or ptr == HOLE:
            return node
        try:
            return self._fetch(s.oid, s.stream, level, index, ptr)
        except BlockIntegrityError:
            return None

    def _data_block(self, s: _Stream, index: int) -> bytes | bytearray | None:
        d = s.dirty.get((0, index))
        if d is not None:
            return d
        ptr = self._data_ptr(s, index)
        if ptr == HOLE:
            return None
        return self._fetch(s.oid, s.stream, 0, index, ptr)

    def _data_ptr(self, s: _Stream, index: int) -> bytes:
        """`_ptr_of` a data block; an unreadable indirect block is reported as the data
        block's problem (the read that meets it names the block it wanted)."""
        try:
            return self._ptr_of(s, 0, index)
        except BlockIntegrityError as exc:
            raise BlockIntegrityError(
                s.oid, s.stream, 0, index,
                f"unreadable: indirect block (level {exc.level}, index {exc.index}): {exc.reason}",
            ) from None

    def _block_for_write(self, s: _Stream, level: int, index: int) -> bytearray:
        """The dirty full-size copy of a block, creating it (and its ancestors') if needed."""
        d = s.dirty.get((level, index))
        if d is not None:
            return d
        ptr = self._ptr_of(s, level, index)
        buf: bytearray
        if ptr == HOLE:
            buf = self._take_buffer()
            buf[:] = self._zero
        else:
            cur = self._cache_pop(ptr)
            if cur is None:
                cur = self._read_disk(s.oid, s.stream, level, index, ptr)
            if type(cur) is bytearray and len(cur) == self._bs:
                buf = cur
            else:
                buf = self._take_buffer()
                n = len(cur)
                buf[:n] = cur
                buf[n:] = self._zero_view[n:]
        self._make_dirty(s, level, index, buf)
        return buf

    def _make_dirty(self, s: _Stream, level: int, index: int, buf: bytearray) -> None:
        s.dirty[(level, index)] = buf
        self._dirty_bytes += self._bs
        if s is not self._table:
            self._dirty_streams[(s.oid, s.stream)] = s
        if level < s.depth:
            parent = (level + 1, index // self._fanout)
            if parent not in s.dirty:
                self._block_for_write(s, *parent)

    def _grow_depth(self, s: _Stream, last_index: int) -> None:
        while last_index >= self._cap[s.depth]:
            if s.depth >= self._max_depth:
                raise ValueError("stream offset too large")
            if s.root == HOLE and (s.depth, 0) not in s.dirty:
                s.depth += 1  # empty tree: the taller empty tree needs no node
            else:
                node = bytearray(self._bs)
                node[:PTR] = s.root
                s.root = HOLE
                s.depth += 1
                s.dirty[(s.depth, 0)] = node
                self._dirty_bytes += self._bs
            s.meta_dirty = True

    # ------------------------------------------------------------------ stream I/O
    def _write_into(self, s: _Stream, offset: int, mv: memoryview) -> None:
        n = len(mv)
        bs = self._bs
        end = offset + n
        if (end - 1) // bs >= self._cap[s.depth]:
            self._grow_depth(s, (end - 1) // bs)
        dirty = s.dirty
        # Large (streaming) writes: whole data blocks are sealed straight from the caller's
        # buffer (no copy, and the write overlaps the next requests) unless the nonce
        # budget is nearly used up: then they stay dirty and the flush refuses cleanly.
        # Smaller writes are buffered as dirty blocks (likely rewritten before the flush).
        direct = (
            n >= _DIRECT_MIN_BYTES and self.seal_whole_blocks and s is not self._table
            and self._enc_count + n // bs + _DIRECT_BUDGET_MARGIN < NONCE_BUDGET
        )
        pos = 0
        while pos < n:
            idx, boff = divmod(offset + pos, bs)
            take = min(bs - boff, n - pos)
            if direct and take == bs:
                self._seal_direct(s, idx, mv[pos : pos + bs])
                pos += take
                continue
            buf = dirty.get((0, idx))
            if buf is None:
                if take == bs:
                    fresh = self._take_buffer()
                    fresh[:] = mv[pos : pos + bs]
                    self._make_dirty(s, 0, idx, fresh)
                    pos += take
                    continue
                buf = self._block_for_write(s, 0, idx)
            buf[boff : boff + take] = mv[pos : pos + take]
            pos += take
        if end > s.size:
            s.size = end
            s.meta_dirty = True
        if s is not self._table:
            self._dirty_streams[(s.oid, s.stream)] = s
        self._txn_dirty = True

    def _seal_direct(self, s: _Stream, idx: int, plain: memoryview) -> None:
        """Seal a whole new version of data block `idx` now (copy-on-write into fresh units,
        queued on the writer) and point its parent at it; a dirty copy is dropped."""
        bs = self._bs
        parent = None
        if s.depth:  # idx < cap[depth]: _write_into grew the tree
            parent = self._block_for_write(s, 1, idx // self._fanout)
        try:
            new = self._seal(s, 0, idx, plain, self._aw)
        except NoSpace:
            raise  # nothing changed: the write fails with ENOSPC, the store stays usable
        except BaseException as exc:
            self._fail(exc)
            raise
        old_dirty = s.dirty.pop((0, idx), None)
        if old_dirty is not None:
            self._dirty_bytes -= bs
            if len(self._pool) < self._pool_max:
                self._pool.append(old_dirty)
        if parent is None:
            old, s.root = s.root, new
            s.meta_dirty = True
        else:
            off = (idx % self._fanout) * PTR
            old = bytes(parent[off : off + PTR])
            parent[off : off + PTR] = new
        if s.units >= 0:
            s.units += _ptr_units(new) - _ptr_units(old)
        if old != HOLE:
            self._cache_pop(old)
            self._free_ptr(old)

    def _read_from(self, s: _Stream, offset: int, size: int) -> bytes:
        """The bytes at [offset, offset+size), short at the end of the stream. Called under
        the lock, which keeps every block viewed here (cached, dirty or just decrypted)
        unchanged until the pieces are joined."""
        if offset >= s.size or size <= 0:
            return b""
        end = min(offset + size, s.size)
        bs = self._bs
        self._read_ahead(s, offset // bs, (end - 1) // bs)
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            idx, boff = divmod(pos, bs)
            take = min(bs - boff, end - pos)
            blk = self._data_block(s, idx)
            if blk is None:
                parts.append(self._zero_view[:take])
            else:
                have = len(blk) - boff
                if have > 0:
                    parts.append(memoryview(blk)[boff : boff + min(have, take)])
                if have < take:
                    parts.append(self._zero_view[: take - max(have, 0)])
            pos += take
        return b"".join(parts)

    def _read_ahead(self, s: _Stream, first: int, last: int) -> None:
        """A read of blocks [first, last] that continues the previous one asks the kernel
        to fetch the units of the stream's next blocks (POSIX_FADV_WILLNEED, which does not
        wait). The kernel's own read-ahead of the container cannot: a file's blocks need
        not lie in container order (every block is written copy-on-write, wherever free
        units are; a 256 MiB file written sequentially here had every 16th block ~200 MiB
        away), and each jump restarts its guess. Only the store knows the order."""
        sequential = s.ra_next - 1 <= first <= s.ra_next
        s.ra_next = last + 1
        if not sequential or s.ra_until >= last + _READ_AHEAD_BLOCKS // 2:
            return
        stop = min(last + _READ_AHEAD_BLOCKS, (s.size - 1) // self._bs)
        start, s.ra_until = max(s.ra_until, last) + 1, stop
        runs: list[list[int]] = []
        for index in range(start, stop + 1):
            if (0, index) in s.dirty:
                continue
            try:
                ptr = self._ptr_of(s, 0, index)
            except BlockIntegrityError:
                break  # the read that reaches it reports it
            if ptr == HOLE or ptr in self._cache:
                continue
            at, length = self._span(ptr)
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1][1] += length
            else:
                runs.append([at, length])
        if runs:
            # From a thread of its own: the advice fills the page cache (allocates pages,
            # submits the reads), ~90 us a call, which the request loop would wait for.
            if self._advisor is None:
                self._advisor = ThreadPoolExecutor(1, thread_name_prefix="kryptvault-readahead")
            self._advisor.submit(_advise_willneed, self._fd, runs)

    def _truncate(self, s: _Stream, size: int) -> None:
        if size == s.size:
            return
        self._txn_dirty = True
        s.meta_dirty = True
        if s is not self._table:
            self._dirty_streams[(s.oid, s.stream)] = s
        if size > s.size:
            s.size = size  # sparse: the tail of the last block is already zero
            return
        bs = self._bs
        keep = -(-size // bs)
        tail = size % bs
        if tail and keep - 1 < self._cap[s.depth]:
            idx = keep - 1
            if (0, idx) in s.dirty or self._ptr_of(s, 0, idx) != HOLE:
                buf = self._block_for_write(s, 0, idx)
                buf[tail:] = self._zero_view[tail:]
        self._drop_blocks(s, keep)
        s.size = size

    def _punch(self, s: _Stream, offset: int, length: int) -> None:
        """Zero [offset, offset+length) within the stream's size: whole data blocks become
        holes (units freed), blocks only partly covered are zeroed in place. Indirect blocks
        left empty are stored as holes by the next flush (an all-zero block stores nothing)."""
        end = min(offset + length, s.size)
        if offset >= end:
            return
        bs = self._bs
        # A last block that the range covers up to the end of the stream is whole: what lies
        # past the size reads as zero anyway.
        first, last = offset // bs, (end - 1) // bs
        cap = self._cap
        idx = first
        while idx <= last:
            # Skip what lies under the highest indirect block that is a hole (a dirty block's
            # ancestors are dirty too), so a punch over a huge sparse file stays quick.
            skip = 0
            for level in range(s.depth, 0, -1):
                n = idx // cap[level]
                if (level, n) not in s.dirty and self._ptr_of(s, level, n) == HOLE:
                    skip = (n + 1) * cap[level]
                    break
            if skip:
                idx = skip
                continue
            lo, hi = idx * bs, min((idx + 1) * bs, s.size)
            a, b = max(lo, offset), min(hi, end)
            if a == lo and b == hi:
                self._punch_block(s, idx)
            elif (0, idx) in s.dirty or self._ptr_of(s, 0, idx) != HOLE:
                buf = self._block_for_write(s, 0, idx)
                buf[a - lo : b - lo] = self._zero_view[: b - a]
            idx += 1
        self._txn_dirty = True
        if s is not self._table:
            self._dirty_streams[(s.oid, s.stream)] = s

    def _punch_block(self, s: _Stream, idx: int) -> None:
        """Make data block `idx` a hole: drop its dirty copy, free its flushed units."""
        buf = s.dirty.pop((0, idx), None)
        if buf is not None:
            self._dirty_bytes -= self._bs
            if len(self._pool) < self._pool_max:
                self._pool.append(buf)
        old = self._ptr_of(s, 0, idx)
        if old == HOLE:
            return
        if s.depth == 0:
            s.root = HOLE
            s.meta_dirty = True
        else:
            parent = self._block_for_write(s, 1, idx // self._fanout)
            off = (idx % self._fanout) * PTR
            parent[off : off + PTR] = HOLE
        if s.units >= 0:
            s.units -= _ptr_units(old)
        self._cache_pop(old)
        self._free_ptr(old)

    def _drop_blocks(self, s: _Stream, first: int) -> None:
        """Free every data block >= first (and indirect blocks left empty); shrink depth."""
        bs = self._bs
        if first == 0:
            self._free_subtree(s, s.depth, 0, s.root)
            self._dirty_bytes -= bs * len(s.dirty)
            s.dirty.clear()
            s.root = HOLE
            s.depth = 0
            s.units = 0  # also when an unreadable node hid what it pointed to
            return
        if s.depth >= 1 and first < self._cap[s.depth]:
            self._drop_from(s, s.depth, 0, first)
        cap = self._cap
        for key in [k for k in s.dirty if k[1] * cap[k[0]] >= first]:
            del s.dirty[key]
            self._dirty_bytes -= bs
        while s.depth > 0 and first <= cap[s.depth - 1]:
            node: bytes | bytearray | None = s.dirty.pop((s.depth, 0), None)
            if node is not None:
                self._dirty_bytes -= bs
            elif s.root != HOLE:
                node = self._fetch(s.oid, s.stream, s.depth, 0, s.root)
            child = bytes(node[:PTR]) if node is not None and len(node) >= PTR else HOLE
            if s.root != HOLE:
                self._free_ptr(s.root)
                if s.units >= 0:
                    s.units -= _ptr_units(s.root)
            s.root = child
            s.depth -= 1

    def _drop_from(self, s: _Stream, level: int, index: int, first: int) -> None:
        """Node (level, index) starts before `first`: drop its children at or past it."""
        f = self._fanout
        child_span = self._cap[level - 1]
        base = index * f
        c0 = first // child_span - base
        if c0 >= f:
            return
        node = self._block_for_write(s, level, index)
        last = min(f, -(-len(node.rstrip(b"\0")) // PTR))
        if (level - 1) >= 1:
            last = max(last, max((k[1] - base + 1 for k in s.dirty
                                  if k[0] == level - 1 and base <= k[1] < base + f), default=0))
        for c in range(max(c0, 0), last):
            child = base + c
            off = c * PTR
            cptr = bytes(node[off : off + PTR])
            if child * child_span >= first:
                self._free_subtree(s, level - 1, child, cptr)
                node[off : off + PTR] = HOLE
            elif level - 1 >= 1:
                self._drop_from(s, level - 1, child, first)

    def _free_subtree(self, s: _Stream, level: int, index: int, ptr: bytes) -> None:
        """Free the units of a subtree's flushed blocks (dirty copies override contents)."""
        if ptr != HOLE:
            self._free_ptr(ptr)
            if s.units >= 0:
                s.units -= _ptr_units(ptr)
        if level == 0:
            return
        node = self._walked_node(s, level, index, ptr)
        if node is None:
            return  # a hole, or unreadable: unreachable after commit; the next open reclaims these units
        f = self._fanout
        for c in range(min(f, -(-len(node) // PTR))):
            cptr = bytes(node[c * PTR : (c + 1) * PTR]).ljust(PTR, b"\0")
            child = index * f + c
            if cptr != HOLE or (level - 1 >= 1 and (level - 1, child) in s.dirty):
                self._free_subtree(s, level - 1, child, cptr)

    # ------------------------------------------------------------------ flushing
    def _seal(
        self,
        s: _Stream,
        level: int,
        index: int,
        buf: bytearray | memoryview,
        w: _Writer,
        end: int | None = None,
    ) -> bytes:
        """Encrypt one dirty block into fresh units (queued on `w`); return its pointer.
        `end`: every byte of `buf` from there on is zero (see fmt.stored_units)."""
        us = self._us
        units = fmt.stored_units(buf, us, end)
        if units == 0:
            return HOLE
        if self._enc_count >= NONCE_BUDGET:
            raise NonceBudgetExhausted(
                "the data key has reached its limit of 2**32 encryptions; "
                "rekey the vault (copy it into a new one) before writing more"
            )
        meta = bool(level) or s is self._table or (s.stream == 0 and s.oid in self._meta_oids)
        unit, ditto = self._alloc_metadata(units) if meta else (self._alloc(units), 0)
        length = units * us
        nonce = fmt.nonce_source()
        aad = fmt.block_aad(self._uuid, s.oid, s.stream, level, index, length)
        upc = self._upc
        if meta:
            # The same ciphertext twice, far apart (one nonce, one tag).
            sealed = self._data.seal(nonce, memoryview(buf)[:length], aad)
            tag = sealed[length:]
            ct = sealed[:length]
            w.put(unit, ct)
            if ditto:
                copy2 = unit + ditto * upc
                w.put(copy2, ct)
                self._flushed_bytes += length
                self._touched.add(copy2 // upc)
                self._touched.add((copy2 + units - 1) // upc)
        else:
            tag = w.seal(unit, units, nonce, memoryview(buf)[:length], aad)
        self._enc_count += 1
        self._flushed_bytes += length
        self._touched.add(unit // upc)
        self._touched.add((unit + units - 1) // upc)
        return fmt.POINTER.pack(unit, units, ditto & 0xFFFF, nonce, tag)

    def _alloc_metadata(self, units: int) -> tuple[int, int]:
        """Both runs of a metadata block -> (copy 1's unit, ditto in chunks). One copy
        goes to the lowest hole behind the next-fit cursor (preferably in the lower half
        of the data area), the other to the first run at the same chunk offset at or
        after the cursor: copy-on-write keeps freeing old metadata low in the file, so
        the copies end up far apart, one of them away from the data appended at the
        end (a truncated container keeps it). Without such a hole: `_alloc_ditto`."""
        upc = self._upc
        um = self._units
        behind = min(um.cursor, um.total)
        pat = bytes(units)
        for hi in (min(behind, um.total // 2), behind):
            hole = um.map.find(pat, upc, hi) if hi > upc else -1
            if hole < 0:
                continue
            ch, off = divmod(hole, upc)
            chunks = um.total // upc
            lo, hi_c = max(ch + 1, behind // upc), min(chunks, ch + _DITTO_MAX + 1)
            c1 = self._free_aligned(units, off, lo, hi_c, ch)
            if c1 < 0:
                continue
            first = c1 * upc + off
            um.take(first, units)
            um.take(hole, units)
            um.cursor = max(um.cursor, first + units)
            return first, ch - c1
        unit = self._alloc(units)
        return unit, self._alloc_ditto(unit, units)

    def _alloc_ditto(self, unit: int, units: int) -> int:
        """Allocate the second copy of a metadata block at `unit`: a free run at the same
        offset in another chunk. First choice: a hole (behind the next-fit cursor, so
        that sequential data stays contiguous) in the other half of the data area, else
        the lowest hole in reach; copy-on-write keeps freeing old metadata there, so
        copies drift to the start of the file, away from the data appended at its end,
        and survive a truncation. Else the first free run after copy 1 (the cursor moves
        past it), growing the file once if needed. Returns the distance in chunks (0: no
        room in reach of the i16 field; the block keeps one copy until rewritten)."""
        upc = self._upc
        c1, off = divmod(unit, upc)
        units_map = self._units
        for attempt in range(2):
            chunks = units_map.total // upc
            half = chunks // 2
            near_lo, near_hi = max(1, c1 - _DITTO_MAX), min(chunks, c1 + _DITTO_MAX + 1)
            behind = min(chunks, units_map.cursor // upc)
            other = (near_lo, min(half, behind)) if c1 >= half else (max(half, c1 + 1), min(near_hi, behind))
            for lo, hi in (other, (near_lo, min(c1, behind)), (c1 + 1, near_hi)):
                c2 = self._free_aligned(units, off, lo, hi, c1)
                if c2 >= 0:
                    first = c2 * upc + off
                    units_map.take(first, units)
                    units_map.cursor = max(units_map.cursor, first + units)
                    return c2 - c1
            if attempt == 0:
                total = units_map.total
                try:
                    self._resize(total + max(2 * units + upc, total // 8, 256))
                except OSError as exc:
                    if exc.errno not in _NO_SPACE:
                        raise
                    return 0  # the host disk is full: one copy beats a failed flush
        return 0

    def _free_aligned(self, units: int, offset: int, lo: int, hi: int, skip: int) -> int:
        """A chunk c in [lo, hi), not `skip`, whose units c*upc+offset ... +units are free; -1 if none."""
        upc = self._upc
        m = self._units.map
        pat = bytes(units)
        pos = lo * upc + offset
        end = min(hi * upc, len(m))
        while pos < end:
            found = m.find(pat, pos, end)
            if found < 0:
                return -1
            rem = (found - offset) % upc
            cand = found if rem == 0 else found + upc - rem
            if cand + units <= end and m[cand : cand + units] == pat and cand // upc != skip:
                return cand // upc
            pos = cand + 1  # the next candidate is the next aligned position
        return -1

    def _free_ptr(self, ptr: bytes) -> None:
        """Free both runs of a block pointer (reusable at once or after the next commit)."""
        unit, units, flags = fmt.POINTER.unpack_from(ptr)[:3]
        self._units.free(unit, units)
        if flags:
            self._units.free(unit + _ditto(flags) * self._upc, units)

    def _flush_stream(self, s: _Stream, *, sized: bool = False) -> None:
        """Seal the stream's dirty blocks. `sized`: no write is under way, so the stream's
        size covers every byte written and its data blocks are zero past it (a truncation
        zeroes the tail, a write extends the size): their stored end is searched from
        there, not back from the end of 64 KiB of zeros. A flush in the middle of a write
        (the dirty limit) must not: the size grows only once the write is done."""
        if s.dirty:
            f, bs = self._fanout, self._bs
            w = self._aw
            for key in sorted(s.dirty):
                level, index = key
                buf = s.dirty[key]
                end = s.size - index * bs if sized and level == 0 else None
                # Sealed first: if no unit can be had, the block stays dirty and the
                # store consistent, so a later flush (once there is space) can finish.
                new = self._seal(s, level, index, buf, w, end)
                del s.dirty[key]
                self._dirty_bytes -= bs
                if level == s.depth:
                    old, s.root = s.root, new
                else:
                    parent = s.dirty[(level + 1, index // f)]
                    off = (index % f) * PTR
                    old = bytes(parent[off : off + PTR])
                    parent[off : off + PTR] = new
                if s.units >= 0:
                    s.units += _ptr_units(new) - _ptr_units(old)
                if old != HOLE:
                    self._free_ptr(old)
                if new != HOLE and (level or s is self._table):
                    self._cache_put(new, buf)  # metadata stays cached
                elif len(self._pool) < self._pool_max:
                    self._pool.append(buf)  # written data: recycle the buffer
            s.meta_dirty = True
        if s.meta_dirty and s is not self._table:
            self._write_into(
                self._table,
                s.oid * fmt.ENTRY_SIZE + fmt.ROOT_OFFSETS[s.stream],
                memoryview(fmt.pack_root(s.size, s.depth, s.root)),
            )
            s.meta_dirty = False

    def _flush_all(self) -> None:
        # Refuse cleanly (before touching anything) if the flush could pass the budget.
        need = len(self._table.dirty) + 16
        for s in self._dirty_streams.values():
            need += len(s.dirty) + 2 * (s.depth + 1)
        if self._enc_count + need > NONCE_BUDGET:
            raise NonceBudgetExhausted(
                "the data key has reached its limit of 2**32 encryptions; "
                "rekey the vault (copy it into a new one) before writing more"
            )
        try:
            while self._dirty_streams:
                key, s = self._dirty_streams.popitem()
                try:
                    self._flush_stream(s)
                except NoSpace:
                    self._dirty_streams[key] = s  # its remaining dirty blocks
                    raise
            self._flush_stream(self._table)
            # One run for everything sealed back to back (many small files' blocks land
            # next to each other): not one write per stream.
            self._aw.submit()
        except NoSpace as exc:
            self._stalled = exc.strerror or str(exc)
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
        if len(self._streams) > _KEEP_CLEAN_STREAMS:
            self._streams.clear()

    def _write_descriptors(self, gen: int) -> None:
        by_group: dict[int, list[int]] = {}
        cpg = self._cpg
        for chunk in self._touched:
            group, c = divmod(chunk, cpg)
            by_group.setdefault(group, []).append(c)
        group_units = self._geom.units_per_group
        for group in sorted(by_group):
            offset = self.layout.unit_offset(group * group_units)
            gens = self._descriptors.get(group)
            if gens is None:
                gens = decode_descriptor(self._geom, group, os.pread(self._fd, self._bs, offset))
                if gens is None:  # missing or torn: every chunk counts as written now
                    gens = array("Q", [gen]) * cpg
                self._descriptors[group] = gens
            for c in by_group[group]:
                gens[c] = gen
            gens[0] = gen
            self._pwrite([encode_descriptor(self._geom, group, gen, gens)], offset)

    def _fail(self, exc: BaseException) -> None:
        self._failed = f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ guards
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the object store is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise StoreClosed(f"the object store failed earlier ({self._failed}); reopen the vault")
        if self._read_only:
            if self._lost_commit_held and self._commit_damage is not None:
                raise IntegrityError(
                    f"{self._commit_damage.describe()}; the vault is open read-only until "
                    "that loss is acknowledged (mount --accept-lost-commit)")
            if self._open_damage:
                raise IntegrityError(
                    "the vault's metadata is damaged, so it is open read-only; run fsck")
            raise KryptvaultError("the object store is open read-only")

    def _stream(self, oid: int, stream: int) -> _Stream:
        key = (oid, stream)
        s = self._streams.get(key)
        if s is not None:
            return s
        if stream not in (0, 1):
            raise ValueError(f"stream must be 0 or 1, not {stream}")
        if not 0 < oid < len(self._inuse) or not self._inuse[oid]:
            raise UnknownObject(f"object {oid} is not in use")
        # Both roots in one read of the entry: a stat asks for both streams' sizes.
        raw = self._table_bytes(oid * fmt.ENTRY_SIZE, fmt.ATTR_OFFSET)
        found = self._load_roots(oid, raw, stream)
        assert found is not None
        return found

    def _table_bytes(self, offset: int, size: int) -> bytes:
        """`_read_from(table, ...)` for a piece inside one block: every stat reads its
        entry, and the general loop's overhead showed in the cold `stat` benchmark."""
        t = self._table
        idx, boff = divmod(offset, self._bs)
        if offset + size > t.size or boff + size > self._bs:
            return self._read_from(t, offset, size)
        blk = self._data_block(t, idx)
        if blk is None or len(blk) < boff + size:
            return self._read_from(t, offset, size)  # a hole or a stripped zero tail
        return bytes(blk[boff : boff + size])

    def _load_roots(self, oid: int, raw: bytes, wanted: int) -> _Stream | None:
        """Cache the streams of entry `raw` not cached yet; return stream `wanted` (-1: none).
        A root of impossible depth is reported only when its stream is asked for."""
        found: _Stream | None = None
        for number, offset in enumerate(fmt.ROOT_OFFSETS):
            other = (oid, number)
            if number != wanted and other in self._streams:
                continue
            size, depth, root = fmt.unpack_root(raw, offset)
            if depth > self._max_depth:
                if number != wanted:
                    continue
                raise BlockIntegrityError(oid, wanted, depth, 0, f"stream root has depth {depth}")
            loaded = _Stream(oid, number, size, depth, root)
            self._streams[other] = loaded
            if number == wanted:
                found = loaded
        return found

    def _check_oid(self, oid: int) -> None:
        if not 0 < oid < len(self._inuse) or not self._inuse[oid]:
            raise UnknownObject(f"object {oid} is not in use")

    # ------------------------------------------------------------------ public API
    def allocate_oid(self) -> int:
        """Lowest free oid >= 1, marked in use with zeroed attrs and empty streams."""
        with self._lock:
            self._check_writable()
            oid = self._inuse.find(0, 1)
            if oid < 0:
                oid = len(self._inuse)
                self._inuse.append(0)
            entry = bytearray(fmt.ENTRY_SIZE)
            entry[0] = fmt.ENTRY_IN_USE
            self._write_into(self._table, oid * fmt.ENTRY_SIZE, memoryview(entry))
            self._inuse[oid] = 1
            self._meta_oids.discard(oid)
            for st in (0, 1):
                # Both streams empty, as the entry just written says: cached now, so the
                # create's own stat does not read the entry back and decode it.
                empty = _Stream(oid, st, 0, 0, HOLE)
                empty.units = 0
                self._streams[(oid, st)] = empty
            if self._dirty_bytes > self._dirty_limit:
                self._flush_all()
            return oid

    def free_oid(self, oid: int) -> None:
        """Free the object's blocks (reusable once the next commit is durable) and its entry."""
        with self._lock:
            self._check_writable()
            self._check_oid(oid)
            for st in (0, 1):
                self._truncate(self._stream(oid, st), 0)
                self._streams.pop((oid, st), None)
                self._dirty_streams.pop((oid, st), None)
            self._write_into(self._table, oid * fmt.ENTRY_SIZE, memoryview(bytes(fmt.ENTRY_SIZE)))
            self._inuse[oid] = 0
            self._meta_oids.discard(oid)

    def mark_metadata(self, oid: int) -> None:
        """Flag the object's data stream as filesystem metadata (a directory): from now on
        its data blocks are written with a second copy, like the object table's."""
        with self._lock:
            self._check_writable()
            self._check_oid(oid)
            if oid in self._meta_oids:
                return
            flags = bytes([fmt.ENTRY_IN_USE | ENTRY_METADATA])
            self._write_into(self._table, oid * fmt.ENTRY_SIZE, memoryview(flags))
            self._meta_oids.add(oid)

    def is_metadata(self, oid: int) -> bool:
        with self._lock:
            return oid in self._meta_oids

    def oid_in_use(self, oid: int) -> bool:
        """True for objects in use, and for oids whose table block is damaged (accessing
        those raises IntegrityError)."""
        with self._lock:
            self._check_open()
            return 0 < oid < len(self._inuse) and self._inuse[oid] != 0

    def iter_oids(self) -> Iterator[int]:
        with self._lock:
            self._check_open()
            inuse = bytes(self._inuse)
        oid = inuse.find(b"\x01", 1)
        found: list[int] = []
        while oid >= 0:
            found.append(oid)
            oid = inuse.find(b"\x01", oid + 1)
        unknown = inuse.find(b"\x02", 1)
        while unknown >= 0:
            found.append(unknown)
            unknown = inuse.find(b"\x02", unknown + 1)
        return iter(sorted(found))

    def get_attrs(self, oid: int) -> bytes:
        with self._lock:
            self._check_open()
            self._check_oid(oid)
            return self._entry_attrs(oid)

    def _entry_attrs(self, oid: int) -> bytes:
        """The attributes of an object in use; its streams' roots come with the same read
        when they are not cached yet (an inode is loaded to be used)."""
        if (oid, 0) in self._streams and (oid, 1) in self._streams:
            return self._table_bytes(oid * fmt.ENTRY_SIZE + fmt.ATTR_OFFSET, fmt.ATTR_SIZE)
        raw = self._table_bytes(oid * fmt.ENTRY_SIZE, fmt.ENTRY_SIZE)
        self._load_roots(oid, raw, -1)
        return raw[fmt.ATTR_OFFSET:]

    def set_attrs(self, oid: int, attrs: bytes) -> None:
        if len(attrs) != fmt.ATTR_SIZE:
            raise ValueError(f"attrs must be exactly {fmt.ATTR_SIZE} bytes")
        with self._lock:
            self._check_writable()
            self._check_oid(oid)
            self._write_into(self._table, oid * fmt.ENTRY_SIZE + fmt.ATTR_OFFSET, memoryview(attrs))

    def read(self, oid: int, stream: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (short at end of stream; holes read as zeros)."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        with self._lock:
            self._check_open()
            return self._read_from(self._stream(oid, stream), offset, size)

    def read_into(self, oid: int, stream: int, offset: int, out: memoryview) -> int:
        """`read` into `out` (at most len(out) bytes); the count. A whole block that is not
        cached is decrypted straight into `out` and not cached: a FUSE read of 128 KiB
        or more (the kernel's read-ahead) is a stream that the page cache keeps anyway, and
        decrypting each block into fresh memory cost an allocation, a zeroing and a cold
        copy per block, and pushed the metadata out of the block cache (a cold 256 MiB
        read, in-process: 85 -> 64 µs per 128 KiB)."""
        if offset < 0:
            raise ValueError("negative offset")
        with self._lock:
            self._check_open()
            s = self._stream(oid, stream)
            end = min(offset + len(out), s.size)
            if end <= offset:
                return 0
            bs = self._bs
            self._read_ahead(s, offset // bs, (end - 1) // bs)
            pos = offset
            while pos < end:
                index, skip = divmod(pos, bs)
                take = min(bs - skip, end - pos)
                self._block_into(s, index, skip, out[pos - offset : pos - offset + take])
                pos += take
            return end - offset

    def _block_into(self, s: _Stream, index: int, skip: int, dst: memoryview) -> None:
        """Bytes skip: skip+len(dst) of data block `index` into `dst`."""
        blk: bytes | bytearray | memoryview | None = s.dirty.get((0, index))
        if blk is None:
            ptr = self._data_ptr(s, index)
            if ptr == HOLE:
                dst[:] = self._zero_view[: len(dst)]
                return
            if skip == 0 and len(dst) == self._bs and ptr not in self._cache:
                stored = len(self._read_disk(s.oid, s.stream, 0, index, ptr, dst))
                dst[stored:] = self._zero_view[: len(dst) - stored]
                return
            blk = self._fetch(s.oid, s.stream, 0, index, ptr)
        have = max(0, min(len(blk) - skip, len(dst)))
        dst[:have] = memoryview(blk)[skip : skip + have]
        dst[have:] = self._zero_view[: len(dst) - have]

    def write(self, oid: int, stream: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset`, extending the stream (a gap reads as zeros)."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")  # e.g. ctypes buffers ("<B"), which cannot be indexed
        if offset < 0 or offset + len(mv) > MAX_STREAM_SIZE:
            raise ValueError("offset out of range")
        with self._lock:
            self._check_writable()
            s = self._stream(oid, stream)
            if len(mv):
                self._write_into(s, offset, mv)
                if self._dirty_bytes > self._dirty_limit:
                    self._flush_all()

    def truncate(self, oid: int, stream: int, size: int) -> None:
        """Set the stream size: up is sparse, down frees the blocks past the end."""
        if not 0 <= size <= MAX_STREAM_SIZE:
            raise ValueError("size out of range")
        with self._lock:
            self._check_writable()
            self._truncate(self._stream(oid, stream), size)

    def punch(self, oid: int, stream: int, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros without changing the size: whole
        blocks in it become holes (their units freed), partly covered ones are zeroed."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self._lock:
            self._check_writable()
            self._punch(self._stream(oid, stream), offset, length)

    def stream_size(self, oid: int, stream: int) -> int:
        with self._lock:
            self._check_open()
            return self._stream(oid, stream).size

    def stored_bytes(self, oid: int, stream: int) -> int:
        """Bytes the stream really occupies: the units of its data and indirect blocks as
        stored (trailing zero units stripped, holes free). A dirty data block counts as
        what it would store now, instead of its flushed version (`st_blocks`, `du`)."""
        with self._lock:
            self._check_open()
            return self._stored_bytes(self._stream(oid, stream))

    def advise_directory_readahead(self) -> int:
        """Ask the kernel to start reading the blocks of the directories the open found
        (objects flagged metadata, one block each: most directories) into the page cache
        (POSIX_FADV_WILLNEED, which does not wait): a mount's first look-ups then find
        them there instead of waiting for the disk one directory at a time. Once per open;
        the number of blocks advised, 0 where the kernel takes no advice."""
        with self._lock:
            self._check_open()
            roots, self._readahead_roots = self._readahead_roots, []
            return _advise_willneed(self._fd, [list(self._span(ptr)) for ptr in roots])

    def _span(self, ptr: bytes) -> tuple[int, int]:
        """Where a block pointer's (first) copy lies in the container: (offset, length)."""
        unit, units, _flags, _nonce, _tag = fmt.unpack_pointer(ptr)
        return self.layout.unit_offset(unit), units * self._us

    def size_and_stored(self, oid: int) -> tuple[int, int]:
        """(size of stream 0, stored bytes of both streams): what a stat needs, in one call
        because a cold `stat` of many files spends its time in per-call overhead."""
        with self._lock:
            self._check_open()
            data = self._stream(oid, 0)
            return data.size, self._stored_bytes(data) + self._stored_bytes(self._stream(oid, 1))

    def stat_object(self, oid: int) -> tuple[bytes, int, int] | None:
        """(attributes, size of stream 0, stored bytes of both streams) of an object, None if
        it is not in use: a cold `stat` of a file in one call, as `get_attrs` then
        `size_and_stored` would give."""
        with self._lock:
            self._check_open()
            if not 0 < oid < len(self._inuse) or not self._inuse[oid]:
                return None
            attrs = self._entry_attrs(oid)
            data, aux = self._stream(oid, 0), self._stream(oid, 1)
            return attrs, data.size, self._stored_bytes(data) + self._stored_bytes(aux)

    def _stored_bytes(self, s: _Stream) -> int:
        if s.units < 0:
            s.units = self._count_units(s)
        n = s.units
        if s.dirty:
            us, bs, size = self._us, self._bs, s.size
            copies = METADATA_COPIES if s.stream == 0 and s.oid in self._meta_oids else 1
            for (level, index), buf in s.dirty.items():
                if level == 0:
                    # Past the size a block is zero (a truncation zeroes its last block's
                    # tail), so the search for its last data starts at the size.
                    units = fmt.stored_units(buf, us, size - index * bs)
                    n += copies * units - _ptr_units(self._ptr_of(s, 0, index))
        return max(n, 0) * self._us

    def _count_units(self, s: _Stream) -> int:
        """Walk the tree once (indirect blocks only; dirty nodes stand in for theirs)."""
        if s.depth == 0:
            return _ptr_units(s.root)  # most files: one block, nothing to walk
        f = self._fanout
        total = 0
        stack = [(s.depth, 0, s.root)]
        while stack:
            level, index, ptr = stack.pop()
            total += _ptr_units(ptr)
            if level == 0:
                continue
            node = self._walked_node(s, level, index, ptr)
            if node is None:
                continue  # a hole, or unreadable: what it points to cannot be counted
            for c in range(min(f, -(-len(node) // PTR))):
                cptr = bytes(node[c * PTR : (c + 1) * PTR]).ljust(PTR, b"\0")
                if cptr != HOLE or (level - 1, index * f + c) in s.dirty:
                    stack.append((level - 1, index * f + c, cptr))
        return total

    def seal_data(self, oid: int) -> None:
        """Encrypt the dirty blocks of the object's data stream now (its file was closed)
        instead of at the next flush: their buffers go back to the pool at once. A run of
        small files otherwise holds one 64 KiB buffer per file until the dirty limit, and
        most of those are fresh memory (~50 us of page faults each, measured here). Best
        effort: without room or nonce budget the blocks stay dirty, and the next flush or
        commit reports that as before."""
        with self._lock:
            if self._closed or self._failed is not None or self._read_only or self._stalled:
                return
            s = self._streams.get((oid, 0))
            if s is None or not s.dirty:
                return
            need = len(self._table.dirty) + len(s.dirty) + 2 * (s.depth + 1) + 16
            if self._enc_count + need > NONCE_BUDGET:
                return
            try:
                # A closed file's stream, under the store lock: no write is under way.
                self._flush_stream(s, sized=True)
            except NoSpace:
                return
            except BaseException as exc:
                self._fail(exc)
                raise
            if not s.dirty and not s.meta_dirty:
                self._dirty_streams.pop((oid, 0), None)

    def flush(self) -> None:
        """Encrypt and write every dirty block to free units without committing."""
        with self._lock:
            self._check_writable()
            self._flush_all()
            self._drain()

    def commit(self) -> int:
        """Make every change so far durable and atomic; return the new generation.
        A no-op returning the current generation when nothing changed."""
        with self._lock:
            self._check_open()
            if not self._txn_dirty:
                return self.generation
            self._check_writable()
            gen = self.generation + 1
            if gen >= NONCE_BUDGET:
                raise NonceBudgetExhausted("the meta key has sealed 2**32 commit records; rekey the vault")
            self._flush_all()
            try:
                self._aw.wait()
                self._write_descriptors(gen)
                self._sync()
                next_oid = self._inuse.find(0, 1)
                rec = CommitRecord(
                    generation=gen,
                    block_size=self._bs,
                    unit_size=self._us,
                    table_root=fmt.pack_root(self._table.size, self._table.depth, self._table.root),
                    total_units=self._units.total,
                    encryptions=self._enc_count,
                    timestamp_ns=time.time_ns(),
                    next_oid=next_oid if next_oid > 0 else len(self._inuse),
                    lineage=self.lineage,
                )
                image = seal_commit(self._meta, self._uuid, rec, fmt.nonce_source())
                self._pwrite([image], COMMIT_OFFSETS[gen % 2])
                self._sync()
            except BaseException as exc:
                # After a failed write or fsync the page cache state is unknown: refuse
                # further writes; the last durable commit is still intact on disk.
                self._fail(exc)
                raise
            self.generation = gen
            if self._commit_damage is not None and gen % 2 == self._commit_damage.slot:
                self._commit_damage = None  # the damaged slot holds this commit now
            self._units.commit_done()
            self._touched.clear()
            self._txn_dirty = False
            self._flushed_bytes = 0
            self._stalled = None
            return gen

    # ------------------------------------------------------------------ space
    def _commit_need_units(self, data_blocks: int, meta_blocks: int) -> int:
        """THE estimate of the units a commit may still allocate for `data_blocks` data
        blocks and `meta_blocks` metadata blocks (indirect and object-table blocks) that
        are not sealed yet: every block as a full one (no credit for trailing zeros).
        Units already sealed in this transaction are allocated, so they need nothing more;
        the commit record and the group descriptors are written in place (fixed slots,
        units reserved when a group begins), so they need no units either. Metadata
        blocks are stored METADATA_COPIES times (ditto copies): adjust here, only here."""
        return (data_blocks + METADATA_COPIES * meta_blocks) * self._upc

    def _entry_blocks(self, entries: int) -> int:
        """Object-table blocks a flush may dirty to store `entries` changed entries, on
        top of those dirty already: one block each at most, plus the table's own path."""
        table = self._table
        blocks = -(-table.size // self._bs) + 1
        return min(entries, blocks) + table.depth + 1

    def _dirty_split(self) -> tuple[int, int]:
        """(data, metadata) blocks dirty now."""
        meta = len(self._table.dirty)
        data = 0
        for s in self._dirty_streams.values():
            # A directory's data blocks are stored with ditto copies, like metadata.
            copied = s.stream == 0 and s.oid in self._meta_oids
            for level, _index in s.dirty:
                if level or copied:
                    meta += 1
                else:
                    data += 1
        return data, meta

    def commit_need(self, pending_entries: int = 0) -> int:
        """Bytes of container space a commit of everything accepted so far may still need
        (`pending_entries`: object-table entries the caller has yet to write)."""
        with self._lock:
            data, meta = self._dirty_split()
            meta += self._entry_blocks(len(self._dirty_streams) + pending_entries)
            return self._commit_need_units(data, meta) * self._us

    def room(self, *, freeing: bool = False) -> int:
        """Bytes the vault can still give to commits: free units inside the container
        plus what it can grow into on the host filesystem, less the reserve that only
        space-freeing operations may use."""
        with self._lock:
            return self._room_units(freeing) * self._us

    def _room_units(self, freeing: bool, *, fresh: bool = True) -> int:
        """Room in units; `fresh=False` may use the host's free space as seen up to
        HOST_STATFS_AGE ago (a refusal is always decided on a fresh look)."""
        us = self._us
        free = self._units.free_units if self._backed else 0
        now = time.monotonic()
        cached = self._host_room
        if not fresh and cached is not None and now - cached[0] < HOST_STATFS_AGE:
            grow = cached[1]
        else:
            try:
                host = os.fstatvfs(self._fd)
                grow = max(0, host.f_bavail * host.f_frsize - HOST_MARGIN_BYTES) // us
            except OSError:
                grow = 0
            # Growth begins new groups, each with its descriptor.
            upg = self._geom.units_per_group
            grow = max(0, grow - -(-grow // upg) * self._upc)
            self._host_room = (now, grow)
        reserve = 0 if freeing else RESERVE_BYTES // us
        return free + grow - reserve

    def check_room(
        self, data_bytes: int = 0, *, pending_entries: int = 0, freeing: bool = False
    ) -> bool:
        """Whether a change that writes `data_bytes` (anywhere: one more block counted for
        a span that is not block-aligned) and the metadata on its way still leaves room to
        commit everything accepted: the test a change must pass before it is accepted.
        `freeing` changes (unlink, truncate down) may use the reserve. Cheap while the
        vault is far from full."""
        data_blocks = -(-data_bytes // self._bs) + 1 if data_bytes > 0 else 0
        with self._lock:
            entries = self._entry_blocks(len(self._dirty_streams) + pending_entries + 1)
            extra_meta = OP_META_BLOCKS + entries
            dirty = self._dirty_bytes // self._bs
            # Upper bound first (every dirty block counted as data and as metadata).
            bound = self._commit_need_units(dirty + data_blocks, dirty + extra_meta)
            if bound <= self._room_units(freeing, fresh=False):
                return True
            data, meta = self._dirty_split()
            need = self._commit_need_units(data + data_blocks, meta + extra_meta)
            return need <= self._room_units(freeing)

    @property
    def save_problem(self) -> str | None:
        """Why changes accepted so far cannot be saved (a flush or commit failed), or None.
        After a lack of space a later commit may still succeed and clear it."""
        return self._failed or self._stalled

    def dirty_bytes(self) -> int:
        """Bytes not yet committed: dirty block buffers plus ciphertext already flushed to
        free units in this transaction. Never 0 when `commit()` has something to do (an
        attribute or size change alone counts as 1), so `dirty_bytes() > 0` is the test for
        "a commit is needed"."""
        with self._lock:
            n = self._dirty_bytes + self._flushed_bytes
            return n if n or not self._txn_dirty else 1

    def buffered_bytes(self) -> int:
        """Memory held by dirty block buffers (flushed at the dirty limit)."""
        with self._lock:
            return self._dirty_bytes

    @property
    def uncommitted(self) -> bool:
        """True if `commit()` would write a new generation."""
        return self._txn_dirty

    def statfs(self) -> StoreStats:
        with self._lock:
            self._check_open()
            u = self._units
            total = u.total
            free = u.free_count()
            pending = sum(n for _u, n in u.pending) + sum(n for _u, n in u.held)
            objects = self._inuse.count(1)
            return StoreStats(
                block_size=self._bs,
                unit_size=self._us,
                total_units=total,
                free_units=free,
                used_units=total - free,
                pending_units=pending,
                objects=objects,
                container_bytes=self.layout.unit_offset(total),
            )

    def hold_reuse(self) -> int:
        """Keep every unit of the current durable commit from being reused until
        `release_reuse()`; returns that commit's generation (what a live backup copies).
        Nests."""
        with self._lock:
            self._check_open()
            self._units.hold()
            return self.generation

    def hold_reuse_with_head(self) -> tuple[int, bytes]:
        """`hold_reuse()` plus the bytes [0, data_offset) read under the same lock, so a
        live backup copies exactly the held commit (its commit slots cannot move on)."""
        with self._lock:
            generation = self.hold_reuse()
            return generation, os.pread(self._fd, self.layout.data_offset, 0)

    def release_reuse(self) -> None:
        with self._lock:
            self._units.release()

    @property
    def open_damage(self) -> list[Damage]:
        """Metadata problems found while opening (non-empty => the store is read-only)."""
        return list(self._open_damage)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def bad_copies(self) -> list[Damage]:
        """Metadata blocks with one bad copy and one good one, found by reads so far and
        by `verify()`: nothing is lost, `rewrite_bad_copies()` restores the redundancy."""
        with self._lock:
            return [Damage(o, st, lv, ix, why) for (o, st, lv, ix), why in sorted(self._bad_copies.items())]

    def rewrite_bad_copies(self) -> int:
        """Write every block of `bad_copies` anew (two fresh copies, from the good one) in
        the running transaction; the caller commits. Returns how many."""
        with self._lock:
            self._check_writable()
            done = 0
            for oid, stream, level, index in sorted(self._bad_copies):
                if oid == 0 and stream == 0:
                    s = self._table
                elif 0 < oid < len(self._inuse) and self._inuse[oid] == 1:
                    s = self._stream(oid, stream)
                else:
                    continue  # freed since: its units went back with it
                if (level, index) not in s.dirty and (
                    level > s.depth or self._ptr_of(s, level, index) == HOLE
                ):
                    continue  # truncated away since
                self._block_for_write(s, level, index)
                if s is not self._table:
                    self._dirty_streams[(s.oid, s.stream)] = s
                self._txn_dirty = True
                done += 1
            self._bad_copies.clear()
            return done

    @property
    def commit_damage(self) -> CommitDamage | None:
        """A commit slot found damaged at open (None when both are sound)."""
        return self._commit_damage

    def acknowledge_lost_commit(self) -> int:
        """The user accepted the loss of the newest generation: commit at once, which
        rewrites the damaged slot, so that the next open finds both slots sound."""
        with self._lock:
            self._check_writable()
            if self._commit_damage is None:
                return self.generation  # a commit since the open has rewritten the slot
            self._txn_dirty = True
            self._touched.add(0)
            return self.commit()

    def fork_lineage(self) -> bytes:
        """Give this container a new random lineage id, written by the next commit (which
        this makes due even with nothing else changed): from then on it is a line of
        commits of its own, with rollback records of its own (docs/TOKEN.md)."""
        with self._lock:
            self._check_writable()
            lineage = os.urandom(LINEAGE_SIZE)
            self.lineage = lineage
            self._txn_dirty = True
            self._touched.add(0)  # group 0's descriptor shows the commit (§4.6 detection)
            return lineage

    @property
    def encryptions(self) -> int:
        """Data-key encryptions so far (the nonce budget is 2**32)."""
        return self._enc_count

    def verify(self) -> list[Damage]:
        """Authenticate every block reachable from the current state (dirty copies stand in
        for their blocks); report damage and units referenced twice without raising."""
        with self._lock:
            self._check_open()
            out = list(self._open_damage)
            seen = bytearray(self._units.total)
            table = self._table
            self._verify_tree(table, seen, out)
            for oid in range(1, len(self._inuse)):
                if self._inuse[oid] != 1:
                    continue
                for st in (0, 1):
                    try:
                        s = self._streams.get((oid, st)) or self._stream(oid, st)
                    except IntegrityError as exc:
                        out.append(Damage(oid, st, -1, 0, f"stream root unreadable: {exc}"))
                        continue
                    self._verify_tree(s, seen, out)
            return out

    def _verify_tree(self, s: _Stream, seen: bytearray, out: list[Damage]) -> None:
        f = self._fanout
        dirty = s.dirty

        def visit(level: int, index: int, ptr: bytes) -> None:
            node: bytes | bytearray | None = dirty.get((level, index))
            if ptr != HOLE:
                problem = self._ptr_problem(ptr)
                if problem is not None:
                    out.append(Damage(s.oid, s.stream, level, index, problem))
                else:
                    unit, units, flags = fmt.POINTER.unpack_from(ptr)[:3]
                    copy2 = unit + _ditto(flags) * self._upc if flags else 0
                    for first in (unit, copy2) if copy2 else (unit,):
                        if seen.count(0, first, first + units) != units:
                            out.append(Damage(s.oid, s.stream, level, index,
                                              f"units {first}+{units} referenced twice"))
                        seen[first : first + units] = b"\x01" * units
                    if copy2 and node is None:
                        # Both copies are read: a bad one is repairable only if seen.
                        bad = self._read_copy(s.oid, s.stream, level, index, ptr, copy2, None)
                        if isinstance(bad, str):
                            self._bad_copies[(s.oid, s.stream, level, index)] = f"copy 2: {bad}"
                    if node is None:
                        try:
                            content = self._read_disk(s.oid, s.stream, level, index, ptr)
                        except BlockIntegrityError as exc:
                            out.append(Damage(s.oid, s.stream, level, index, exc.reason))
                            self._bad_copies.pop((s.oid, s.stream, level, index), None)  # both bad
                            return
                        if level > 0:
                            node = content
            if level == 0 or node is None:
                return
            for c in range(min(f, -(-len(node) // PTR))):
                child = index * f + c
                cptr = bytes(node[c * PTR : (c + 1) * PTR]).ljust(PTR, b"\0")
                if cptr != HOLE or (level - 1, child) in dirty:
                    visit(level - 1, child, cptr)

        visit(s.depth, 0, s.root)

    def release_memory(self) -> None:
        """Drop the clean-block cache and spare buffers (e.g. when the vault goes idle);
        dirty data is kept."""
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._pool.clear()
            if not self._aw.busy:
                self._aw.release_buffers()

    def close(self) -> None:
        """Drop caches and uncommitted changes (no implicit commit). The fd stays open:
        the caller owns it."""
        with self._lock:
            self._aw.stop()  # the caller may close the fd next: no write may be in flight
            if self._advisor is not None:
                self._advisor.shutdown(wait=True)  # nor advice about it
                self._advisor = None
            self._closed = True
            self._cache.clear()
            self._cache_bytes = 0
            self._streams.clear()
            self._dirty_streams.clear()
            self._table.dirty.clear()
            self._dirty_bytes = 0
            self._flushed_bytes = 0
            self._txn_dirty = False
            self._pool.clear()

    def abandon(self) -> None:
        """For a process about to exit (the lock): refuse every later call at once, but
        neither wait for the I/O thread nor free anything. Whatever it may still be writing
        is uncommitted, so it can be cut off at any byte (copy-on-write)."""
        self._closed = True

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

