"""What the FUSE server puts into, and takes out of, the kernel's page cache on its own.

- Block stores: a read that misses decrypts a whole 64 KiB block anyway, so the rest of
  the block is pushed into the page cache (FUSE_NOTIFY_STORE) and the next reads in it
  never reach the daemon (cold random 4 KiB reads: one miss warms sixteen pages). Only a
  read inside one block is served this way (requests.py): one that crosses into the
  next block is answered whole from both, without a store.
- Stale pages: a write through a direct-I/O handle bypasses the page cache, so the pages
  other descriptors cached for that range are dropped (FUSE_NOTIFY_INVAL_INODE).
- Drained pages: a lock has the kernel write back and drop every page of the open files
  (`drop_pages`), from the same thread, which is already running when the lock needs it.

A store overwrites whatever the page holds (a page on its way to the vault included), so
it may only land while the file cannot have pages newer than the block: only files not
changed in this session (no write, truncate, open for writing; not new under a reused
number) get stores, and nothing may change them between the read and the store. The
notification thread checks that and sends the store
under its lock, naming the inode it works on first. A change never waits for it (a
store can wait for page locks of reads that only the request loops can serve): it bumps
the file's version, so no later store of older data lands, and if a store of that file
is in flight right now, the caller keeps the kernel from caching the change (a direct-I/O
handle) or has the pages dropped after that store (`stale`, sent under the same lock).
Notifications run on one thread of their own, never on a request loop: stores and
drops in the order they were asked for, so a drop queued after a store lands after it.
One thread, not one per kind (until 2026-12-07): each thread alive at a lock is one more
for the kernel to end before the daemon is gone (~1 ms each in the TCG guest).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from kryptvault.fuseadapter import wire as w

log = logging.getLogger("kryptvault.fuse")

STORE_BLOCK = 64 * 1024
STORE_QUEUE = 16

Notify = Callable[[int, list[bytes | memoryview]], int]


class PageCacheFeed:
    def __init__(self, notify: Notify, generation: Callable[[int], int], *, stores: bool) -> None:
        self._notify = notify
        self._generation = generation
        self.stores = stores
        self.paused = False
        self._lock = threading.Lock()
        self._writers: dict[int, int] = {}  # inode -> handles open for writing
        self._versions: dict[int, int] = {}
        self._storing: int | None = None  # the inode a store is being sent for, under the lock
        # Files changed in this session (written, truncated, opened for writing, or new)
        # get no more stores: the kernel may hold newer pages of them (dirty, or clean
        # but still on their way to the vault), which a store would overwrite.
        self._changed: set[int] = set()
        self._count_lock = threading.Lock()
        # Stores and drops, in order; None ends the thread. Stores queued but not sent are
        # bounded (a thread that is behind drops offers); drops never are.
        self._work: queue.SimpleQueue[_Store | _Drop | None] = queue.SimpleQueue()
        self._stores_queued = 0
        self._ended = False

    def threads(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._run, name="kryptvault-notify", daemon=True)]

    def stop(self) -> None:
        self.stores = False
        self._work.put(None)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No store is being sent while the caller holds this (closing the channel)."""
        with self._lock:
            yield

    # ------------------------------------------------------------------ writers
    def opened(self, ino: int, writable: bool) -> bool:
        """A handle of `ino` was opened; True if it must not use the page cache for
        writes (see content_changing)."""
        if not writable:
            return False
        # Counted before the check, so the notification thread skips this file from now on.
        with self._count_lock:
            self._writers[ino] = self._writers.get(ino, 0) + 1
        return self.content_changing(ino)

    def released(self, ino: int) -> None:
        with self._count_lock:
            left = self._writers.get(ino, 0) - 1
            if left > 0:
                self._writers[ino] = left
            else:
                self._writers.pop(ino, None)

    def content_changing(self, ino: int) -> bool:
        """`ino`'s pages may change (or its number names a new file): no store of older
        data may land from now on. True if a store of `ino` may be in flight: the caller
        must keep the change out of the page cache, or drop the pages with `stale`.

        Lock-free on purpose. The version goes up before `_storing` is read, and the
        notification thread names its inode before it reads the version (both under the GIL,
        so in order): either it sees the new version and skips, or this sees it busy."""
        with self._count_lock:
            self._changed.add(ino)
            self._versions[ino] = self._versions.get(ino, 0) + 1
        return self._storing == ino

    # ------------------------------------------------------------------ stores
    def wants(self, ino: int) -> bool:
        """Whether a read of `ino` should read and offer its whole block."""
        return self.stores and not self.paused and ino not in self._changed

    def version(self, ino: int) -> int:
        return self._versions.get(ino, 0)

    def offer(self, ino: int, version: int, start: int, block: bytes, lo: int, hi: int) -> None:
        """`block` (file offset `start`) was read at `version`; bytes lo:hi went to the
        reader, the rest may go to the page cache."""
        if lo == 0 and hi >= len(block):
            return
        with self._count_lock:
            if self._stores_queued >= STORE_QUEUE:
                return  # the thread is behind: a later miss reads the block again
            self._stores_queued += 1
        self._work.put(_Store(ino, version, self._generation(ino), start, block, lo, hi))

    def _store(self, item: _Store) -> None:
        with self._count_lock:
            self._stores_queued -= 1
        if not self.stores:
            return
        ino = item.ino
        with self._lock:
            self._storing = ino
            try:
                if (
                    self.paused
                    or ino in self._changed
                    or ino in self._writers
                    or self._versions.get(ino, 0) != item.version
                    or self._generation(ino) != item.generation
                ):
                    return
                pack = w.NOTIFY_STORE_OUT.pack
                block, lo, hi, start = item.block, item.lo, item.hi, item.start
                view = memoryview(block)
                if lo > 0:
                    self._notify(w.NOTIFY_STORE, [pack(ino, start, lo, 0), view[:lo]])
                if hi < len(block):
                    rest: list[bytes | memoryview] = [
                        pack(ino, start + hi, len(block) - hi, 0),
                        view[hi:],
                    ]
                    self._notify(w.NOTIFY_STORE, rest)
            finally:
                self._storing = None

    # ------------------------------------------------------------------ stale pages
    def stale(self, ino: int, offset: int, length: int) -> None:
        """Drop `ino`'s cached pages in the range (length 0: to the end), after any store
        in flight."""
        self._work.put(_Drop(ino, offset, length, None))

    def drop_pages(self, inodes: list[int]) -> threading.Event:
        """Have the kernel write back the dirty pages of `inodes` (WRITE requests to the
        request loops) and drop all their pages; the event is set once every inode was
        done, or the thread has ended (the channel is closing: nothing is left to drop).
        A lock waits for it with a timeout, which is why this runs on a thread at all;
        a thread started at lock time took 6-21 ms to run (the TCG guest, 20 pulls). The
        lock has paused the stores first: the drops wait for at most the one in flight."""
        done = threading.Event()
        if not inodes:
            done.set()
            return done
        for ino in inodes[:-1]:
            self._work.put(_Drop(ino, 0, 0, None))
        self._work.put(_Drop(inodes[-1], 0, 0, done))
        if self._ended:  # checked after the put: see _run's end
            done.set()
        return done

    def drop_pages_now(self, inodes: list[int]) -> None:
        """`drop_pages` from the caller's thread, for a lock whose drain already had the
        dirty pages written back (or gave up on them): it takes no lock, so a store that
        hangs cannot keep the lock from going on."""
        for ino in inodes:
            self._invalidate(ino, 0, 0)

    def _invalidate(self, ino: int, offset: int, length: int) -> None:
        err = self._notify(w.NOTIFY_INVAL_INODE, [w.NOTIFY_INVAL_INODE_OUT.pack(ino, offset, length)])
        if err not in (0, errno.ENOENT):  # ENOENT: the kernel no longer has the inode
            log.debug("invalidating inode %d: errno %d", ino, err)

    def _drop(self, item: _Drop) -> None:
        with self._lock:  # after the store in flight, if any
            self._invalidate(item.ino, item.offset, item.length)
        if item.done is not None:
            item.done.set()

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                break
            if isinstance(item, _Store):
                self._store(item)
            else:
                self._drop(item)
        # Set before the queue is emptied: whoever queues after this sees it.
        self._ended = True
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Drop) and item.done is not None:
                item.done.set()


class _Store(NamedTuple):
    ino: int
    version: int
    generation: int
    start: int
    block: bytes
    lo: int
    hi: int


class _Drop(NamedTuple):
    ino: int
    offset: int
    length: int
    done: threading.Event | None  # set once sent
