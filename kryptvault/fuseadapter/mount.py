"""Serve a kryptvault Filesystem on a mountpoint with libfuse3 (blocks until unmounted)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from kryptvault.fs import Filesystem
from kryptvault.fuseadapter._mfusepy import KvFUSE
from kryptvault.fuseadapter.operations import KryptvaultOperations

log = logging.getLogger("kryptvault.fuse")


def serve(
    filesystem: Filesystem,
    mountpoint: str,
    *,
    foreground: bool = True,
    allow_other: bool = False,
    fsname: str = "vault",
    extra_options: Mapping[str, str | int | bool] | None = None,
    writeback: bool = False,
    keep_cache: bool = True,
    attr_timeout: float = 1.0,
    entry_timeout: float = 1.0,
    negative_timeout: float = 1.0,
    commit_delay: float | None = 5.0,
    on_ready: Callable[[], None] | None = None,
    on_operations: Callable[[KryptvaultOperations], None] | None = None,
    threads: bool = False,
    debug: bool = False,
) -> None:
    """Mount `filesystem` on `mountpoint` and serve requests until it is unmounted
    (`fusermount3 -u`, `umount2`, or SIGINT/SIGTERM/SIGHUP to this process).

    Always runs in the foreground: libfuse's daemonising forks, which is unsafe for a
    Python process with threads; run `serve` in a child process instead. `mount`/`df`
    show the source as ``kryptvault:<fsname>`` and the type as ``fuse.kryptvault``.
    The kernel checks permissions (`default_permissions`); without `allow_other` only
    the mounting user sees the files. `commit_delay` runs a CommitScheduler for the
    mount's lifetime (None if the caller commits itself); `destroy` commits on unmount.
    `on_ready` is called once the kernel has initialised the mount; `on_operations` gets
    the operations object before mounting (the lock sequence uses it to drop cached pages).

    `writeback` turns on the kernel's writeback cache: random small writes get ~2-3x
    faster, but it is off by default because (1) the kernel then trusts its own file
    size and mtime forever, and libfuse's path API gives each name of a hard-linked file
    its own kernel inode, so a change through one name is never seen through another;
    (2) dirty pages live in the kernel until written back, so a lock that seals the
    filesystem without a syncfs() first drops data the application already wrote.

    Attribute, entry and negative-entry timeouts of 1 s are safe because every change
    reaches the vault through this kernel mount (names of hard-linked files excepted:
    their other names are invalidated explicitly after a change).

    Requests are served by one thread unless `threads`: with the GIL and one filesystem
    lock, libfuse's worker threads only add hand-offs (single-threaded measured 20-90%
    faster on every benchmark figure, and a lower RSS; see bench/run.py).
    """
    if not foreground:
        raise ValueError("serve() runs in the foreground; start it in a child process")
    ops = KryptvaultOperations(
        filesystem,
        writeback=writeback,
        keep_cache=keep_cache,
        attr_timeout=attr_timeout,
        entry_timeout=entry_timeout,
        negative_timeout=negative_timeout,
        commit_delay=commit_delay,
        on_ready=on_ready,
    )
    if on_operations is not None:
        on_operations(ops)
    options: dict[str, str | int | bool] = {
        "fsname": f"kryptvault:{fsname}",
        "subtype": "kryptvault",
        "default_permissions": True,
        "use_ino": True,
    }
    if allow_other:
        options["allow_other"] = True
    if not threads:
        options["nothreads"] = True
    if extra_options:
        options.update(extra_options)
    KvFUSE(ops, mountpoint, raw_fi=True, foreground=True, debug=debug, **options)
