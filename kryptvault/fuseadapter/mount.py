"""Serve a kryptvault Filesystem on a mountpoint (blocks until unmounted)."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable, Mapping

from kryptvault.fs import Filesystem
from kryptvault.fuseadapter.server import FuseServer, mount_options
from kryptvault.fuseadapter.spinner import CpuSpinner

log = logging.getLogger("kryptvault.fuse")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(
    filesystem: Filesystem,
    mountpoint: str,
    *,
    foreground: bool = True,
    allow_other: bool = False,
    fsname: str = "vault",
    extra_options: Mapping[str, str | int | bool] | None = None,
    writeback: bool = True,
    attr_timeout: float = 3600.0,
    entry_timeout: float = 3600.0,
    negative_timeout: float = 3600.0,
    commit_delay: float | None = 5.0,
    on_ready: Callable[[], None] | None = None,
    on_operations: Callable[[FuseServer], None] | None = None,
    threads: bool | int = 1,
    spin: bool | CpuSpinner = True,
    debug: bool = False,
    handle_signals: bool = True,
) -> None:
    """Mount `filesystem` on `mountpoint` and serve requests until it is unmounted
    (`fusermount3 -u`, `umount2`, or SIGINT/SIGTERM/SIGHUP when called on the main thread,
    which unmount lazily).

    Always in the foreground (`foreground=False` is refused): run it in a child process.
    `mount`/`df` show the source as ``kryptvault:<fsname>`` and the type as
    ``fuse.kryptvault``. The kernel checks permissions (`default_permissions`); without
    `allow_other` only the mounting user sees the files. `commit_delay` runs a
    CommitScheduler (None if the caller commits itself); an unmount commits what is left.
    `on_ready` is called once the kernel has initialised the mount; `on_operations` gets
    the server before mounting (the lock uses it to write back and drop cached pages).

    `writeback` (the default) turns on the kernel's writeback cache: writes land in the
    page cache and reach the vault in large batches; close, fsync and the lock write them
    back first, so what was accepted is still saved (see FuseServer.drain). Timeouts are
    long because every change reaches the vault through this one kernel mount.

    Once the kernel has initialised the mount, every object made so far is taken out of
    the cyclic garbage collector's sight (`freeze_startup_objects`).

    `handle_signals=False` leaves SIGINT/SIGTERM/SIGHUP to the caller (the mount session
    turns them into a lock). `threads` request loops read the connection (True = 2); with the GIL and one
    filesystem lock a second loop mostly helps when one request waits on the kernel.
    `spin` (the default) keeps a second CPU awake at idle priority while requests flow, so
    that answers wake their callers fast (fuseadapter/spinner.py: its gains and its cost);
    a `CpuSpinner` made earlier (its helper started before any key arrived) is used as is.
    """
    if not foreground:
        raise ValueError("serve() runs in the foreground; start it in a child process")
    if debug:
        logging.getLogger("kryptvault.fuse").setLevel(logging.DEBUG)
    loops = 2 if threads is True else max(1, int(threads))

    def ready() -> None:
        freeze_startup_objects()
        if on_ready is not None:
            on_ready()

    server = FuseServer(
        filesystem,
        mountpoint,
        options=mount_options(fsname, allow_other=allow_other, extra=dict(extra_options or {})),
        writeback=writeback,
        attr_timeout=attr_timeout,
        entry_timeout=entry_timeout,
        negative_timeout=negative_timeout,
        commit_delay=commit_delay,
        threads=loops,
        spin=spin,
        on_ready=ready,
    )
    if on_operations is not None:
        on_operations(server)
    previous: dict[signal.Signals, object] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():

        def stop(signum: int, frame: object) -> None:
            threading.Thread(target=server.stop, name="kryptvault-unmount", daemon=True).start()

        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, stop)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def freeze_startup_objects() -> None:
    """Move every object made so far into the collector's permanent generation. They are
    the process's modules and the mount's own state, which live as long as the daemon,
    and a full collection walks every tracked object while the request loop waits: in a
    vault daemon creating 8,000 small files one such pass took 12 ms here (more under
    TCG), in the middle of someone's request or of a lock. Reference counting still frees
    them when they go; only a reference cycle among them would stay, and none is made at
    start-up on purpose."""
    gc.freeze()
