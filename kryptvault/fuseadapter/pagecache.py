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
store thread checks that and sends the store
under its lock, naming the inode it works on first. A change never waits for it (a
store can wait for page locks of reads that only the request loops can serve): it bumps
the file's version, so no later store of older data lands, and if a store of that file
is in flight right now, the caller keeps the kernel from caching the change (a direct-I/O
handle) or has the pages dropped after that store (`stale`, sent under the same lock).
Notifications run on threads of their own, never on a request loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
from collections.abc import Callable, Iterator

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
        self._storing: int | None = None  # the inode the store thread holds the lock for
        # Files changed in this session (written, truncated, opened for writing, or new)
        # get no more stores: the kernel may hold newer pages of them (dirty, or clean
        # but still on their way to the vault), which a store would overwrite.
        self._changed: set[int] = set()
        self._count_lock = threading.Lock()
        self._stores: queue.Queue[tuple[int, int, int, int, bytes, int, int] | None] = queue.Queue(
            STORE_QUEUE
        )
        # (inode, offset, length, set once sent); None ends the thread
        self._stale: queue.SimpleQueue[tuple[int, int, int, threading.Event | None] | None] = (
            queue.SimpleQueue()
        )
        self._stale_ended = False

    def threads(self) -> list[threading.Thread]:
        return [
            threading.Thread(target=self._store_loop, name="kryptvault-store", daemon=True),
            threading.Thread(target=self._stale_loop, name="kryptvault-inval", daemon=True),
        ]

    def stop(self) -> None:
        self.stores = False
        self._stores.put(None)
        self._stale.put(None)

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
        # Counted before the check, so the store thread skips this file from now on.
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
        store thread names its inode before it reads the version (both under the GIL,
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
        # Full: the store thread is behind; a later miss reads the block again.
        with contextlib.suppress(queue.Full):
            self._stores.put_nowait((ino, version, self._generation(ino), start, block, lo, hi))

    def _store_loop(self) -> None:
        pack = w.NOTIFY_STORE_OUT.pack
        while True:
            item = self._stores.get()
            if item is None or not self.stores:
                return
            ino, version, generation, start, block, lo, hi = item
            with self._lock:
                self._storing = ino
                try:
                    if (
                        self.paused
                        or ino in self._changed
                        or ino in self._writers
                        or self._versions.get(ino, 0) != version
                        or self._generation(ino) != generation
                    ):
                        continue
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
        self._stale.put((ino, offset, length, None))

    def drop_pages(self, inodes: list[int]) -> threading.Event:
        """Have the kernel write back the dirty pages of `inodes` (WRITE requests to the
        request loops) and drop all their pages; the event is set once every inode was
        done, or the thread has ended (the channel is closing: nothing is left to drop).
        A lock waits for it with a timeout, which is why this runs on a thread at all;
        a thread started at lock time took 6-21 ms to run (the TCG guest, 20 pulls)."""
        done = threading.Event()
        if not inodes:
            done.set()
            return done
        for ino in inodes[:-1]:
            self._stale.put((ino, 0, 0, None))
        self._stale.put((inodes[-1], 0, 0, done))
        if self._stale_ended:  # checked after the put: see _stale_loop's end
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

    def _stale_loop(self) -> None:
        while True:
            item = self._stale.get()
            if item is None:
                break
            ino, offset, length, done = item
            with self._lock:  # after the store in flight, if any
                self._invalidate(ino, offset, length)
            if done is not None:
                done.set()
        # Set before the queue is emptied: whoever queues after this sees it.
        self._stale_ended = True
        while True:
            try:
                item = self._stale.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[3] is not None:
                item[3].set()
