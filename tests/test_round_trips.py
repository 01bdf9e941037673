"""Requests the kernel sends for everyday operations, counted on a real mount served in
this process: a request the design avoids must stay avoided (each is a round trip through
the kernel, the cost that decides small-file benchmarks)."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fs_fixtures import MemoryStore, force_unmount
from needs import require_fuse

from kryptvault.fs import Filesystem
from kryptvault.fs.filesystem import file_time_ns
from kryptvault.fuseadapter import wire as w
from kryptvault.fuseadapter.server import FuseServer, mount_options

pytestmark = pytest.mark.fuse


class Served:
    def __init__(self, mountpoint: Path, seen: collections.Counter[int]) -> None:
        self.root = mountpoint
        self.seen = seen


@pytest.fixture(name="served")
def served_fixture(tmp_path: Path) -> Iterator[Served]:
    """A fresh vault (in memory) served from a thread, every request's opcode counted on
    its way to its handler."""
    require_fuse()
    fs = Filesystem.mkfs(MemoryStore(), os.getuid(), os.getgid())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = mount_options("t", allow_other=False, extra=None)
    server = FuseServer(fs, str(mnt), options=options, commit_delay=None)
    seen: collections.Counter[int] = collections.Counter()

    def counted(op: int, handler: Callable[..., Any]) -> Callable[..., Any]:
        def handle(*args: Any) -> Any:
            seen[op] += 1
            return handler(*args)

        return handle

    for op, handler in list(server.handlers.items()):
        server.handlers[op] = counted(op, handler)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        assert time.monotonic() < deadline and thread.is_alive(), "the mount never appeared"
        time.sleep(0.01)
    try:
        yield Served(mnt, seen)
    finally:
        server.stop()
        thread.join(10)
        force_unmount(mnt)


def test_a_small_file_written_at_once_has_no_times_to_write_back_at_close(served: Served) -> None:
    """Under the writeback cache the kernel stamps a write's mtime itself and writes the
    times back (SETATTR) at close unless they already equal its coarse clock. A new
    file's times come from that clock, so a file created and written within one tick
    (1-4 ms) costs no SETATTR; before, every such file cost one."""
    files = 40
    d = served.root / "d"
    d.mkdir()
    served.seen.clear()
    for i in range(files):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * 2048)
        finally:
            os.close(fd)
    assert served.seen[w.WRITE] >= files  # the data did reach the filesystem
    # A clock tick between CREATE and the write makes one legitimately: far fewer than half.
    assert served.seen[w.SETATTR] < files // 2, dict(served.seen)


def test_file_times_follow_the_kernels_clock_and_a_later_write_still_moves_them(served: Served) -> None:
    before = file_time_ns()
    p = served.root / "f"
    p.write_bytes(b"first")
    after = file_time_ns()
    st = os.stat(p)
    assert before <= st.st_mtime_ns <= after and before <= st.st_ctime_ns <= after
    time.sleep(0.02)  # past a tick: the kernel must stamp the next write
    with open(p, "ab") as f:
        f.write(b" second")
    later = os.stat(p)
    assert later.st_mtime_ns > st.st_mtime_ns and later.st_size == len(b"first second")
