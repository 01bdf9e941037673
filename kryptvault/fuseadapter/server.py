"""The vault's FUSE server: the kernel protocol spoken on /dev/fuse, no libfuse in between.

Why not libfuse (through mfusepy or pyfuse3): measured here with a no-op filesystem,
random 4 KiB pwrite, gocryptfs = 1.0x: mfusepy on libfuse 3.14 0.72x, pyfuse3 0.33x,
+ FUSE_HANDLE_KILLPRIV_V2 1.07x, + KILLPRIV_V2 and the writeback cache 24.8x. libfuse 3.14
(Debian 12, Ubuntu 24.04) cannot negotiate KILLPRIV_V2 (its INIT reply is built from a
fixed list; 3.17.1 added it), and without it the kernel asks getxattr("security.capability")
before every write(2). Its path API also gives every name of a hard-linked file its own
kernel inode, which makes the writeback cache unsafe. Speaking the protocol ourselves (as
go-fuse and Rust's fuser do) negotiates what the vault needs on every kernel: the writeback
cache, KILLPRIV_V2 (suid/sgid cleared in requests.py), POSIX ACLs with DONT_MASK,
readdirplus, parallel directory operations, 1 MiB requests, cached symlinks, no FLUSH
round trip, long entry/attribute timeouts (every change comes through this mount) and one
kernel inode per vault inode (node id = inode number, generation bumped when a number is
freed). `fusermount3` still makes the mount, so ordinary users can mount (channel.py).

Requests are served by `threads` loops reading the same descriptor; each request runs to
completion under the filesystem's one lock. While requests flow, an idle-priority helper
process keeps a second CPU from halting, so that answers wake their callers without waiting
for a halted CPU (spinner.py, with the figures; a process, so that the key-holding one has
no idle-priority thread to hold up its exit). Notifications (cache invalidation, the lock's
write-back of dirty pages) are written from other threads, never from a loop that the
kernel may be waiting on.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kryptvault.fs import CommitScheduler, Filesystem
from kryptvault.fuseadapter import channel
from kryptvault.fuseadapter import wire as w
from kryptvault.fuseadapter.requests import Requests
from kryptvault.fuseadapter.spinner import BULK_REQUEST, CpuSpinner

log = logging.getLogger("kryptvault.fuse")

MAX_WRITE = 1 << 20
BUFFER_SIZE = MAX_WRITE + 4096
# After a request, a loop asks for the next one this long before it sleeps in poll(): a
# request of a burst (ls, tar, a build) follows within microseconds, while waking a
# sleeping loop on an idle CPU costs tens of them. Measured here (quiet machine, bare
# look-ups of absent names / small files created): sleeping at once 14,800/s and 1,660/s;
# 0.2 ms 38,100/s and 2,690/s; 0.5 ms 37,900/s and 2,900/s; 2 ms 33,000/s and 2,410/s
# (gocryptfs's Go runtime spins the same way). The cost is CPU time during bursts only.
SPIN_SECONDS = 0.0005
# While a lock writes dirty pages back, only what that write-back (and closing files)
# needs is served; everything else gets EIO, like after the seal.
_DRAIN_ALLOWED = frozenset(
    {w.WRITE, w.READ, w.RELEASE, w.RELEASEDIR, w.FORGET, w.BATCH_FORGET, w.INTERRUPT, w.FLUSH}
)
_BULK_OPCODES = frozenset({w.READ, w.WRITE})  # fuse_read_in and fuse_write_in: size at 16
_TIMES_ONLY = (
    w.FATTR_ATIME | w.FATTR_MTIME | w.FATTR_ATIME_NOW | w.FATTR_MTIME_NOW | w.FATTR_CTIME
    | w.FATTR_FH | w.FATTR_LOCKOWNER
)  # fmt: skip


class FuseServer(Requests):
    """Serves one Filesystem on one mountpoint; `run()` blocks until it is unmounted."""

    def __init__(
        self,
        fs: Filesystem,
        mountpoint: str,
        *,
        options: Iterable[str] = (),
        writeback: bool = True,
        attr_timeout: float = 3600.0,
        entry_timeout: float = 3600.0,
        negative_timeout: float = 3600.0,
        commit_delay: float | None = 5.0,
        threads: int = 1,
        store_blocks: bool = True,
        spin: bool | CpuSpinner = True,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            fs,
            writeback=writeback,
            attr_timeout=attr_timeout,
            entry_timeout=entry_timeout,
            negative_timeout=negative_timeout,
            store_blocks=store_blocks,
        )
        self.mountpoint = mountpoint
        self.options = list(options)
        self.commit_delay = commit_delay
        self.threads = max(1, threads)
        self.on_ready = on_ready
        self.spin = spin
        self.spinner: CpuSpinner | None = None
        self.scheduler: CommitScheduler | None = None
        self.negotiated = 0
        self.kernel_minor = 0
        self._fd = -1
        self._stopping = False
        self._draining = False

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        self._fd = channel.mount(self.mountpoint, self.options)
        os.set_blocking(self._fd, False)  # see _read_request
        workers = [
            threading.Thread(target=self._loop, args=(False,), name=f"kryptvault-fuse-{i}", daemon=True)
            for i in range(1, self.threads)
        ]
        workers += self.feed.threads()
        try:
            if isinstance(self.spin, CpuSpinner):
                self.spinner = self.spin
            elif self.spin:
                self.spinner = CpuSpinner.for_this_machine()
            for t in workers:
                t.start()
            self._loop(True)
        finally:
            self._stopping = True
            self.feed.stop()
            if self.spinner is not None:
                self.spinner.close()
            self._finish()

    def stop(self) -> None:
        """End `run()` by unmounting (lazily: files still open keep being served)."""
        channel.unmount(self.mountpoint)

    def _finish(self) -> None:
        with self.feed.quiet():
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        if self.fs.sealed:
            # A lock took the mount away and ends the process itself: a commit here
            # would only take CPU from its last steps.
            return
        if self.scheduler is not None:
            self.scheduler.stop(commit=False)
            self.scheduler = None
        self.fs.close()

    def _loop(self, lead: bool) -> None:
        """Serve requests until unmounted. The `lead` loop alone drives the spinner."""
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        unpack = w.IN_HEADER.unpack_from
        handlers = self.handlers
        waiter = select.poll()
        waiter.register(self._fd, select.POLLIN)
        spinner = self.spinner if lead else None
        bulk_size = w.READ_IN.unpack_from
        while True:
            try:
                n = self._read_request(buf, waiter, spinner)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                if e.errno != errno.ENODEV and not self._stopping:  # ENODEV: unmounted
                    log.error("reading /dev/fuse failed: %s", e)
                self._stopping = True
                return
            if n == 0:
                self._stopping = True
                return
            _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = unpack(buf)
            body = view[40:n]
            if spinner is not None:
                spinner.on_request(opcode in _BULK_OPCODES and bulk_size(body)[2] >= BULK_REQUEST)
            handler = handlers.get(opcode)
            if handler is None:
                self._special(opcode, unique, nodeid, body)
                continue
            if self._draining and opcode not in _DRAIN_ALLOWED and not self._drain_setattr_ok(opcode, body):
                self._error(unique, errno.EIO)
                continue
            try:
                out = handler(nodeid, uid, gid, pid, body)
            except OSError as e:
                err = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
                self._error(unique, err)
                continue
            except Exception:
                log.exception("FUSE request %d failed", opcode)
                self._error(unique, errno.EIO)
                continue
            finally:
                body.release()
            self._reply(unique, out)

    def _read_request(self, buf: bytearray, waiter: select.poll, spinner: CpuSpinner | None) -> int:
        """The next request into `buf` (its length). The descriptor is non-blocking:
        with nothing queued, ask again for SPIN_SECONDS before sleeping in poll(). A
        burst of requests ends with that sleep, and so does the spinner's work."""
        readv = os.readv
        ready = waiter.poll
        clock = time.perf_counter
        idle_work = self.fs.idle_work
        while True:
            try:
                return readv(self._fd, [buf])
            except BlockingIOError:
                pass
            # Ask with poll(0), not readv: every EAGAIN from readv builds an exception, and
            # its message (strerror, gettext, locale decoding) cost ~10 % of the daemon's
            # CPU in a cold `stat` run and delayed the answer to a request arriving meanwhile.
            # Not while a lock runs: its threads need the CPU more than a burst does.
            until = clock() + (0.0 if self._draining else SPIN_SECONDS)
            while clock() < until:
                if ready(0):
                    break
                if not self._draining:
                    # Nothing waiting: the moment for background work (a closed file's
                    # encryption, loading the inodes beside a cold look-up), one short
                    # step at a time, which would otherwise delay the next request.
                    idle_work()
            else:
                if not self._draining:
                    while idle_work():
                        pass
                if spinner is not None:
                    spinner.rest()
                ready()
                if spinner is not None and not self._draining:
                    spinner.burst()

    def _drain_setattr_ok(self, opcode: int, body: memoryview) -> bool:
        # The kernel's write-back of file times (after the pages) is part of the data.
        return opcode == w.SETATTR and not (w.SETATTR_IN.unpack_from(body)[0] & ~_TIMES_ONLY)

    def _special(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        try:
            if opcode == w.FORGET:
                self._forget(nodeid, w.FORGET_IN.unpack_from(body)[0])
            elif opcode == w.BATCH_FORGET:
                count = w.BATCH_FORGET_IN.unpack_from(body)[0]
                for i in range(count):
                    node, n = w.FORGET_ONE.unpack_from(body, 8 + 16 * i)
                    self._forget(node, n)
            elif opcode == w.INTERRUPT:
                pass  # every request runs to completion quickly; nothing to cancel
            elif opcode == w.INIT:
                self._init(unique, body)
            elif opcode == w.DESTROY:
                self._reply(unique, b"")
            elif opcode == w.FLUSH:
                # ENOSYS once: the kernel stops sending FLUSH (it still writes dirty pages
                # back and reports their errors at close without us).
                self._error(unique, errno.ENOSYS)
            else:
                self._error(unique, errno.ENOSYS)
        finally:
            body.release()

    # ------------------------------------------------------------------ replies
    def _reply(self, unique: int, out: Any) -> None:
        try:
            if out is None:
                return
            if isinstance(out, list):
                size = 16 + sum(len(p) for p in out)
                os.writev(self._fd, [w.OUT_HEADER.pack(size, 0, unique), *out])
            else:
                os.writev(self._fd, [w.OUT_HEADER.pack(16 + len(out), 0, unique), out])
        except OSError as e:
            self._write_failed(e)

    def _error(self, unique: int, err: int) -> None:
        try:
            os.write(self._fd, w.OUT_HEADER.pack(16, -err, unique))
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        # ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
        if e.errno not in (errno.ENOENT, errno.ENODEV) and not self._stopping:
            log.error("replying on /dev/fuse failed: %s", e)

    def _notify(self, code: int, parts: list[bytes | memoryview]) -> int:
        """Send a notification; 0 or the errno the kernel answered."""
        size = 16 + sum(len(p) for p in parts)
        if self._fd < 0:
            return errno.EBADF
        try:
            os.writev(self._fd, [w.OUT_HEADER.pack(size, code, 0), *parts])
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    # ------------------------------------------------------------------ INIT
    def _init(self, unique: int, body: memoryview) -> None:
        fields = w.INIT_IN.unpack_from(bytes(body[:20]).ljust(20, b"\0"))
        major, minor, max_readahead, flags, _flags2 = fields
        if major != w.KERNEL_MAJOR:
            # Answer with our version; a kernel of another major retries or gives up.
            self._reply(unique, w.INIT_OUT.pack(w.KERNEL_MAJOR, w.KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            return
        want = (
            w.ASYNC_READ
            | w.ATOMIC_O_TRUNC
            | w.BIG_WRITES
            | w.DONT_MASK
            | w.DO_READDIRPLUS
            | w.READDIRPLUS_AUTO
            | w.PARALLEL_DIROPS
            | w.POSIX_ACL
            | w.MAX_PAGES
            | w.CACHE_SYMLINKS
            | w.HANDLE_KILLPRIV_V2
        )
        if self.writeback:
            want |= w.WRITEBACK_CACHE
        want &= flags
        if not want & w.WRITEBACK_CACHE:
            self.writeback = False
        self.negotiated = want
        self.kernel_minor = minor
        reply = w.INIT_OUT.pack(
            w.KERNEL_MAJOR,
            min(minor, w.KERNEL_MINOR),
            min(max_readahead, MAX_WRITE),
            want,
            64,  # max_background: write-back and readahead requests in flight
            48,  # congestion_threshold
            MAX_WRITE,
            1,  # time granularity: nanoseconds
            MAX_WRITE // 4096,
            0,
            0,
        )
        self._reply(unique, reply)
        log.debug("FUSE 7.%d, kernel flags %#x, negotiated %#x", minor, flags, want)
        if self.commit_delay is not None:
            self.scheduler = CommitScheduler(self.fs, self.commit_delay)
            self.scheduler.start()
        if self.on_ready is not None:
            self.on_ready()

    # ------------------------------------------------------------------ the lock's part
    def open_inodes(self) -> list[int]:
        with self._state_lock:
            return list(self._opens)

    def drain(self, timeout: float) -> bool:
        """First step of a lock: refuse new work except the write-back of dirty pages,
        then have the kernel write back (and drop) the pages of every open file. True if
        that finished within `timeout` (past it the lock goes on; aborting the
        connection ends what is still waiting)."""
        self._draining = True
        self.feed.paused = True
        if self.spinner is not None:
            self.spinner.halt()
        if not self.writeback:
            return True
        return self.feed.drop_pages(self.open_inodes()).wait(timeout)

    def invalidate_open_files(self) -> None:
        """Drop cached plaintext of open files (lock step, before the abort): an aborted
        connection still serves page-cache hits to descriptors already open."""
        self.feed.drop_pages_now(self.open_inodes())


def mount_options(fsname: str, *, allow_other: bool, extra: dict[str, str | int | bool] | None) -> list[str]:
    options = [
        f"fsname=kryptvault:{fsname}",
        "subtype=kryptvault",
        "default_permissions",
        "nosuid",
        "nodev",
    ]
    if allow_other:
        options.append("allow_other")
    for key, value in (extra or {}).items():
        if key == "nothreads":  # an mfusepy-era option: one loop is the default here
            continue
        if value is True:
            options.append(key)
        elif value not in (False, None):
            options.append(f"{key}={value}")
    return options
