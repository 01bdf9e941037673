"""The store's stat path (one call for size and stored bytes, an inode's roots loaded with
its attributes) and its write sizes (no write(2) over 1 MiB)."""

from __future__ import annotations

import os
from pathlib import Path

from store_support import Vault

from kryptvault.container.store import _PWRITE_MAX, _write_batches


def _write_syscalls() -> int:
    """write-family system calls of this process so far, all threads (task I/O accounting)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


def test_size_and_stored_equal_the_separate_calls_clean_dirty_and_sparse(tmp_path: Path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    plain, sparse, meta = store.allocate_oid(), store.allocate_oid(), store.allocate_oid()
    store.write(plain, 0, 0, os.urandom(200_000))
    store.write(plain, 1, 0, b"an xattr")
    store.write(sparse, 0, 5_000_000, b"tail")  # a hole before the tail
    store.mark_metadata(meta)  # two copies of its data blocks
    store.write(meta, 0, 0, os.urandom(9000))

    def separate(oid: int) -> tuple[int, int]:
        return store.stream_size(oid, 0), store.stored_bytes(oid, 0) + store.stored_bytes(oid, 1)

    for when in ("dirty", "committed", "dirty again"):
        for oid in (plain, sparse, meta):
            assert store.size_and_stored(oid) == separate(oid), (when, oid)
        if when == "dirty":
            store.commit()
        else:
            store.write(plain, 0, 100, bytes(70_000))  # zeros store less than random bytes
            store.truncate(sparse, 0, 10)
    assert store.size_and_stored(sparse) == (10, store.stored_bytes(sparse, 0))
    store.close()
    vault.close_fds()


def test_attributes_load_both_roots_so_a_reopened_store_reports_sizes_without_another_read(
    tmp_path: Path,
) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    store.set_attrs(oid, bytes(range(128)))
    store.write(oid, 0, 0, b"d" * 70_000)
    store.write(oid, 1, 0, b"x" * 300)
    store.commit()
    store.close()
    store = vault.open()
    assert store.get_attrs(oid) == bytes(range(128))
    # The roots came with the attributes: sizes are right, and the attributes (now read by
    # the cached-roots path) are unchanged.
    assert store.stream_size(oid, 0) == 70_000 and store.stream_size(oid, 1) == 300
    assert store.get_attrs(oid) == bytes(range(128))
    assert store.read(oid, 1, 0, 300) == b"x" * 300
    store.close()
    vault.close_fds()


def test_write_batches_keep_order_and_bytes_and_never_exceed_the_limit() -> None:
    bufs = [memoryview(os.urandom(n)) for n in (3 * 65536 + 7, 10, 2 * 65536, 65536 - 3)]
    for limit in (65536, 100_000, 1 << 20):
        batches = list(_write_batches(bufs, limit))
        assert all(0 < sum(len(b) for b in batch) <= limit for batch in batches)
        assert b"".join(bytes(b) for batch in batches for b in batch) == b"".join(bytes(b) for b in bufs)
    assert list(_write_batches(bufs, 1 << 20)) == [bufs]  # small enough: passed through


def test_a_long_run_of_blocks_reaches_the_file_in_writes_of_at_most_1_mib(tmp_path: Path) -> None:
    """2 MiB or larger buffered writes make the host take 2 MiB page-cache folios, which on a
    VM with free page reporting cost ~20 µs a page (README, performance)."""
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    data = os.urandom(16 << 20)
    before = _write_syscalls()
    store.write(oid, 0, 0, data)
    store.flush()
    writes = _write_syscalls() - before
    assert writes >= len(data) // _PWRITE_MAX, writes  # runs are ~4 MiB: 4-5 writes without the cap
    store.commit()
    store.close()
    store = vault.open()
    assert store.read(oid, 0, 0, len(data)) == data
    store.close()
    vault.close_fds()
