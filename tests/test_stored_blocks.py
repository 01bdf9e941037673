"""st_blocks (and so `du`) counts what the container really stores, not the file size."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fs_fixtures import close_store, mounted, new_store, open_store
from needs import require_fuse

pytestmark = pytest.mark.fuse

GIB = 1 << 30
MIB = 1 << 20


def _du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_sparse_2gib_file_reports_only_its_stored_units_through_a_real_mount(tmp_path: Path) -> None:
    require_fuse()
    with mounted(tmp_path, fresh=True) as m:
        before = m.container.stat().st_size
        f = m.mountpoint / "sparse"
        with open(f, "wb") as fh:
            fh.truncate(2 * GIB)
            fh.seek(GIB)
            fh.write(os.urandom(MIB))  # 16 blocks of real data in the middle
            fh.flush()
            os.fsync(fh.fileno())
        st = os.stat(f)
        assert st.st_size == 2 * GIB
        grew = m.container.stat().st_size - before
        stored = st.st_blocks * 512
        # 1 MiB of data plus one indirect block (a few units): nowhere near 2 GiB.
        assert MIB <= stored <= MIB + 64 * 1024, stored
        assert _du_bytes(f) == stored
        assert grew < 16 * MIB
        (m.mountpoint / "empty").write_bytes(b"")
        assert os.stat(m.mountpoint / "empty").st_blocks == 0
        small = m.mountpoint / "small"
        small.write_bytes(b"x" * 100)
        os.sync()
        assert os.stat(small).st_blocks * 512 == 4096  # one allocation unit
    with mounted(tmp_path, fresh=False) as m:  # counted afresh from the stored tree
        st = os.stat(m.mountpoint / "sparse")
        assert st.st_blocks * 512 == stored
        assert _du_bytes(m.mountpoint / "sparse") == stored


def test_stored_bytes_follows_writes_truncates_and_holes(tmp_path: Path) -> None:
    store = new_store(tmp_path / "s.kv")
    try:
        oid = store.allocate_oid()
        store.truncate(oid, 0, 10 * MIB)
        assert store.stored_bytes(oid, 0) == 0
        store.write(oid, 0, 5 * MIB, b"a" * 100)  # dirty: one unit once sealed
        assert store.stored_bytes(oid, 0) == 4096
        store.commit()
        after_commit = store.stored_bytes(oid, 0)
        # the data unit plus one indirect unit, stored twice (FORMAT.md §4.2 ditto copies)
        assert after_commit == 3 * 4096
        store.write(oid, 0, 0, os.urandom(MIB))  # whole blocks, sealed at once
        assert store.stored_bytes(oid, 0) == after_commit + MIB
        store.truncate(oid, 0, 4096)
        store.commit()
        assert store.stored_bytes(oid, 0) == 4096
        store.truncate(oid, 0, 0)
        assert store.stored_bytes(oid, 0) == 0
        store.write(oid, 0, 3 * MIB, os.urandom(MIB))
        store.commit()
        live = store.stored_bytes(oid, 0)
    finally:
        close_store(store)
    store = open_store(tmp_path / "s.kv")
    try:
        assert store.stored_bytes(oid, 0) == live  # the walk at first use agrees
        assert live == MIB + 2 * 4096
    finally:
        close_store(store)
