"""A daemon served by kryptvault.fuseadapter.serve keeps its start-up objects (modules, the
mounted filesystem's state) out of the cyclic collector: a full collection walks every
tracked object while the request loop waits (12 ms measured in a vault daemon after a few
thousand small files; ten times that under TCG, where the lock runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fs_fixtures import ROOT_DIR, TESTS_DIR, force_unmount

pytestmark = pytest.mark.fuse

# on_ready runs when the kernel has initialised the mount; it reports what the collector
# still sees then, against what it saw just before serving.
_CHILD = """
import gc, os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from fs_fixtures import MemoryStore
from kryptvault.fs import Filesystem
from kryptvault.fuseadapter import serve
fs = Filesystem.mkfs(MemoryStore(), os.getuid(), os.getgid())
gc.collect()  # what is left lives on: none of it can be freed before the freeze
before = len(gc.get_objects())
def ready():
    print(before, len(gc.get_objects()), gc.get_freeze_count(), flush=True)
serve(fs, sys.argv[1], on_ready=ready, commit_delay=None)
"""


def test_start_up_objects_are_out_of_the_collectors_sight_once_mounted(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = _CHILD.format(tests=str(TESTS_DIR), root=str(ROOT_DIR))
    proc = subprocess.Popen([sys.executable, "-c", code, str(mnt)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and proc.poll() is None, "never mounted"
            time.sleep(0.02)
    finally:
        force_unmount(mnt)
        proc.wait(timeout=20)
    before, tracked, frozen = (int(x) for x in line.split())
    assert before > 10_000  # a daemon's imports alone
    # Everything made before serving is frozen (a few may still go by reference count
    # before the freeze, and serving makes some more)...
    assert frozen >= before * 9 // 10
    assert tracked < before // 10  # ...and no longer walked by a collection
