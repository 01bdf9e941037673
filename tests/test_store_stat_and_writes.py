"""The store's stat path (one call for size and stored bytes, an inode's roots loaded with
its attributes), its write sizes (no write(2) over 1 MiB), the stored length of a block
(trailing zero units stripped) and the sealing of a closed file's data."""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import random
import time
from pathlib import Path

import pytest
from fs_fixtures import close_store, new_store, open_store
from store_support import DEFAULT, Vault, pattern

from kryptvault.container.pointer import stored_units, unpack_pointer
from kryptvault.container.store import _PWRITE_MAX, BlockIntegrityError, _write_batches
from kryptvault.fs import ROOT_INO, Filesystem
from kryptvault.fs.filesystem import _SEAL_BACKLOG


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
    assert writes >= len(data) // _PWRITE_MAX, writes  # no write(2) of more than 1 MiB
    store.commit()
    store.close()
    store = vault.open()
    assert store.read(oid, 0, 0, len(data)) == data
    store.close()
    vault.close_fds()


def _units_by_definition(buf: bytes, unit_size: int) -> int:
    units = -(-len(buf) // unit_size)
    while units and not any(buf[(units - 1) * unit_size : units * unit_size]):
        units -= 1
    return units


def test_stored_units_strip_exactly_the_trailing_zero_units_of_any_block() -> None:
    rng = random.Random(5)
    for _ in range(1500):
        size = rng.choice(
            [65536, 16384, rng.randrange(0, 70_000), 512 * rng.randrange(0, 130), rng.randrange(20)]
        )
        block = bytearray(size)
        for _ in range(rng.randrange(4)):
            if size:
                block[rng.randrange(size)] = rng.randrange(1, 256)
        for unit_size in (512, 4096, 16384, 1000, 3):
            want = _units_by_definition(bytes(block), unit_size)
            for form in (block, bytes(block), memoryview(block)):
                assert stored_units(form, unit_size) == want, (size, unit_size, type(form))
            # Told where the zeros start (a stream's size inside its last block).
            nonzero = [i for i, b in enumerate(block) if b]
            end = rng.randrange(nonzero[-1] + 1, size + 1) if nonzero else rng.randrange(size + 1)
            assert stored_units(block, unit_size, end) == want, (size, unit_size, end)


def test_a_closed_files_data_is_sealed_when_idle_and_an_open_one_waits(tmp_path: Path) -> None:
    """A closed file's dirty block is encrypted into units when the request loop is idle
    (Filesystem.idle_work), so its buffer is reused by the next file instead of every
    small file holding a fresh 64 KiB buffer until the dirty limit; a file still open
    keeps its block dirty (it may be written again)."""
    store = new_store(tmp_path / "c")
    fs = Filesystem.mkfs(store, 0, 0)
    store.commit()
    free = store.statfs().free_units
    _closed, fh = fs.create(ROOT_INO, b"closed", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, 0, b"c" * 2048)
    _still_open, fh_open = fs.create(ROOT_INO, b"open", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh_open, 0, b"o" * 2048)
    fs.release(fh)
    assert store.statfs().free_units == free  # closed, but nothing was idle yet
    assert fs.idle_work() is False  # one closed file: done, nothing more waiting
    sealed = free - store.statfs().free_units
    assert sealed == -(-2048 // store.statfs().unit_size)  # the closed file's 2 KiB, and only that
    fs.release(fh_open)
    fs.idle_work()
    assert free - store.statfs().free_units == 2 * sealed
    fs.commit()
    close_store(store)
    store = open_store(tmp_path / "c")
    fs = Filesystem(store)
    for name, byte in ((b"closed", b"c"), (b"open", b"o")):
        ino = fs.lookup(ROOT_INO, name)
        assert store.read(ino, 0, 0, 4096) == byte * 2048
    close_store(store)


def test_closed_files_of_every_shape_are_sealed_whole_and_read_back_exactly(tmp_path: Path) -> None:
    """The idle seal of a closed file looks for its blocks' stored end from the file's
    size on (no write is under way then): sizes around unit and block boundaries, a hole
    before the data, a tail zeroed by a truncation and a sparse tail must all come back
    byte for byte after a commit and a reopen, each block stored in exactly the units up
    to its last non-zero byte."""
    store = new_store(tmp_path / "c")
    fs = Filesystem.mkfs(store, 0, 0)
    store.commit()
    unit, block = store.statfs().unit_size, 65536
    rng = random.Random(11)
    want: dict[bytes, bytes] = {}
    shapes = [1, unit - 1, unit, unit + 1, block - 1, block, block + 1, 3 * block + 5]
    for size in shapes:
        want[b"plain%d" % size] = rng.randbytes(size)
    want[b"hole"] = bytes(block + 100) + rng.randbytes(3000)  # data after a hole
    cut = rng.randbytes(2 * block)
    want[b"cut"] = cut[: block + 700]  # truncated down: the tail left behind is zeroed
    want[b"sparse"] = cut[:900] + bytes(block)  # extended by truncate: zeros past the data
    for name, data in want.items():
        free = store.statfs().free_units
        _st, fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
        if name == b"hole":
            fs.write(fh, block + 100, data[block + 100 :])
        elif name == b"cut":
            fs.write(fh, 0, cut)
            fs.truncate(_st.ino, len(data))
        elif name == b"sparse":
            fs.write(fh, 0, data[:900])
            fs.truncate(_st.ino, len(data))
        else:
            fs.write(fh, 0, data)
        fs.release(fh)
        while fs.idle_work():
            pass
        if len(data) <= block:  # one data block, no pointer block: its units are all
            assert free - store.statfs().free_units == _units_by_definition(data, unit), name
    fs.commit()
    close_store(store)
    store = open_store(tmp_path / "c")
    fs = Filesystem(store)
    for name, data in want.items():
        ino = fs.lookup(ROOT_INO, name)
        assert store.read(ino, 0, 0, len(data) + block) == data, name
    close_store(store)


def test_without_idle_moments_closed_files_wait_in_a_bounded_backlog(tmp_path: Path) -> None:
    store = new_store(tmp_path / "c")
    fs = Filesystem.mkfs(store, 0, 0)
    store.commit()
    unit = store.statfs().unit_size
    free = store.statfs().free_units
    files = _SEAL_BACKLOG + 10
    for i in range(files):
        _st, fh = fs.create(ROOT_INO, b"f%d" % i, 0o644, os.O_WRONLY, 0, 0)
        fs.write(fh, 0, b"x" * unit)
        fs.release(fh)
    assert free - store.statfs().free_units == 10  # the oldest ten, one unit each
    while fs.idle_work():
        pass
    assert free - store.statfs().free_units == files
    close_store(store)


def test_read_gives_the_data_of_clean_dirty_and_sparse_blocks_and_keeps_it_after_later_writes(
    tmp_path: Path,
) -> None:
    """`read` joins pieces of decrypted blocks, dirty blocks and holes; what it returns is
    the caller's: a later write to a dirty block (a mutable buffer) does not change it."""
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    data = bytearray(os.urandom(300_000))
    store.write(oid, 0, 0, data)
    store.truncate(oid, 0, 400_000)  # a sparse tail
    data += bytes(100_000)
    store.commit()
    store.write(oid, 0, 70_000, b"dirty" * 1000)  # one block dirty again
    data[70_000:75_000] = b"dirty" * 1000
    rng = random.Random(3)
    for _ in range(200):
        offset, size = rng.randrange(420_000), rng.randrange(1, 200_000)
        assert store.read(oid, 0, offset, size) == bytes(data[offset : offset + size])
    before = store.read(oid, 0, 65_536, 131_072)
    store.write(oid, 0, 65_536, bytes(131_072))  # the dirty block's buffer changes now
    assert before == bytes(data[65_536 : 65_536 + 131_072])
    store.close()
    vault.close_fds()


def test_read_into_gives_what_read_gives_for_clean_dirty_sparse_and_partial_ranges(tmp_path: Path) -> None:
    """FUSE reads of 64 KiB and more are decrypted straight into the request loop's buffer:
    every byte the buffer is given must be what `read` returns, holes and stripped zero
    tails written as zeros over whatever the buffer held before."""
    bs = DEFAULT.block_size
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    data = bytearray(os.urandom(5 * bs + 1000))
    data[bs + 100 : 2 * bs] = bytes(bs - 100)  # a block whose stored form is cut short
    store.write(oid, 0, 0, data)
    store.truncate(oid, 0, 9 * bs)  # a sparse tail
    data += bytes(9 * bs - len(data))
    store.commit()
    store.write(oid, 0, 3 * bs + 5, b"dirty" * 1000)  # one block dirty again
    data[3 * bs + 5 : 3 * bs + 5005] = b"dirty" * 1000
    out = memoryview(bytearray(4 * bs))
    rng = random.Random(5)
    ranges = [(i * bs, bs) for i in range(10)] + [(0, 4 * bs), (bs, 3 * bs), (8 * bs + 10, bs)]
    ranges += [(rng.randrange(10 * bs), rng.randrange(1, 4 * bs)) for _ in range(200)]
    for offset, size in ranges:
        out[:] = b"\xee" * len(out)
        n = store.read_into(oid, 0, offset, out[:size])
        expected = store.read(oid, 0, offset, size)
        assert n == len(expected) == len(data[offset : offset + size])
        assert bytes(out[:n]) == expected == bytes(data[offset : offset + size])
    store.close()
    vault.close_fds()


def test_whole_blocks_read_into_a_buffer_stay_out_of_the_block_cache(tmp_path: Path) -> None:
    """A sequential read streams through; caching its blocks would only push the
    metadata (directories, inode table, indirect blocks) out of the cache."""
    bs = DEFAULT.block_size
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    store.write(oid, 0, 0, os.urandom(8 * bs))
    store.commit()
    store.close()
    store = vault.open()
    out = memoryview(bytearray(8 * bs))
    assert store.read_into(oid, 0, 0, out) == 8 * bs
    s = store._stream(oid, 0)
    assert not any(store._ptr_of(s, 0, i) in store._cache for i in range(8))
    store.read_into(oid, 0, 100, out[: bs - 200])  # part of a block: read through the cache
    assert store._ptr_of(s, 0, 0) in store._cache
    store.close()
    vault.close_fds()


def test_a_damaged_block_read_into_a_buffer_leaves_zeros_there_not_its_plaintext(tmp_path: Path) -> None:
    """AES-GCM decrypts before it checks the tag: a block whose ciphertext was altered has
    mostly its true plaintext in the buffer when the check fails. The buffer is the FUSE
    reply's; what fails to authenticate must not stay in it."""
    bs = DEFAULT.block_size
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    plain = pattern(oid, 4 * bs)
    store.write(oid, 0, 0, plain)
    store.commit()
    unit = unpack_pointer(store._ptr_of(store._stream(oid, 0), 0, 2))[0]
    store.close()
    with open(vault.path, "r+b") as f:
        f.seek(DEFAULT.unit_offset(unit) + 100)
        byte = f.read(1)
        f.seek(DEFAULT.unit_offset(unit) + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    store = vault.open()
    out = memoryview(bytearray(b"\xee" * (2 * bs)))
    with pytest.raises(BlockIntegrityError):
        store.read_into(oid, 0, bs, out)
    assert bytes(out[:bs]) == plain[bs : 2 * bs]  # the block before it, read first
    assert bytes(out[bs:]) == bytes(bs)
    store.close()
    vault.close_fds()


def _tree_with_a_full_directory(tmp_path: Path, files: int) -> tuple[int, list[bytes]]:
    """A committed vault with directory "d" holding `files` files of distinct sizes."""
    store = new_store(tmp_path / "c")
    fs = Filesystem.mkfs(store, 0, 0)
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    names = [b"f%d" % i for i in range(files)]
    for i, name in enumerate(names):
        _st, fh = fs.create(d, name, 0o644, os.O_WRONLY, 0, 0)
        fs.write(fh, 0, b"x" * i)
        fs.release(fh)
    fs.commit()
    close_store(store)
    return d, names


def test_idle_moments_load_the_inodes_beside_a_cold_lookup_with_their_true_sizes(tmp_path: Path) -> None:
    """`ls -l`, `find` and `du` stat a directory's entries one after another: the first cold
    look-up queues its siblings, and idle moments load them, so their own look-ups find
    them cached; what they report is what a cold look-up reports."""
    d, names = _tree_with_a_full_directory(tmp_path, 40)
    store = open_store(tmp_path / "c")
    fs = Filesystem(store)
    first = fs.lookup_stat(d, names[0])
    assert first.size == 0
    cached_before = set(fs._inodes)
    steps = 0
    while fs.idle_work():
        steps += 1
    assert steps == len(names) - 2  # one inode per call: the request loop waits for one at most
    siblings = {fs.lookup(d, name) for name in names[1:]}
    assert siblings.isdisjoint(cached_before) and siblings <= set(fs._inodes)
    warmed = [fs.lookup_stat(d, name) for name in names]
    close_store(store)
    store = open_store(tmp_path / "c")
    cold = Filesystem(store)
    assert [(s.ino, s.size, s.blocks, s.mode, s.mtime_ns) for s in warmed] == [
        (s.ino, s.size, s.blocks, s.mode, s.mtime_ns) for s in (cold.lookup_stat(d, n) for n in names)
    ]
    close_store(store)


def test_metadata_read_ahead_does_not_bring_back_a_file_unlinked_meanwhile(tmp_path: Path) -> None:
    d, names = _tree_with_a_full_directory(tmp_path, 10)
    store = open_store(tmp_path / "c")
    fs = Filesystem(store)
    fs.lookup_stat(d, names[0])
    fs.unlink(d, names[5])
    while fs.idle_work():
        pass
    try:
        fs.lookup_stat(d, names[5])
    except OSError as e:
        assert e.errno == errno.ENOENT
    else:
        raise AssertionError("an unlinked name was found again")
    assert [fs.lookup_stat(d, n).size for n in names if n != names[5]] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    close_store(store)


def test_a_store_failure_during_metadata_read_ahead_ends_it_without_raising(tmp_path: Path) -> None:
    """Background work has nobody to report to: a failing store stops the read-ahead, and
    the look-up that needs the inode meets the error itself."""
    d, names = _tree_with_a_full_directory(tmp_path, 10)
    store = open_store(tmp_path / "c")
    fs = Filesystem(store)
    fs.lookup_stat(d, names[0])
    store.close()
    assert fs.idle_work() is False
    assert fs.idle_work() is False  # nothing left queued
    try:
        fs.lookup_stat(d, names[3])
    except Exception as e:  # the store's own error, as without the read-ahead
        assert "closed" in str(e)
    else:
        raise AssertionError("a closed store answered a cold look-up")
    close_store(store)  # its fd; closing twice is allowed


def test_opening_a_vault_asks_the_kernel_to_read_its_directories_ahead_once(tmp_path: Path) -> None:
    """The first look-ups after a mount would each wait for the disk to bring one
    directory's block: the open found them all (objects flagged metadata), and the
    filesystem asks the kernel to fetch them meanwhile (POSIX_FADV_WILLNEED)."""
    store = new_store(tmp_path / "c")
    fs = Filesystem.mkfs(store, 0, 0)
    for i in range(5):
        d = fs.mkdir(ROOT_INO, b"d%d" % i, 0o755, 0, 0).ino
        _st, fh = fs.create(d, b"f", 0o644, os.O_WRONLY, 0, 0)
        fs.write(fh, 0, b"not a directory" * 100)
        fs.release(fh)
    fs.commit()
    close_store(store)
    store = open_store(tmp_path / "c")
    assert store.advise_directory_readahead() == 6  # the root and d0..d4, not the files
    assert store.advise_directory_readahead() == 0  # once per open
    close_store(store)
    store = open_store(tmp_path / "c")
    Filesystem(store)  # a mount's filesystem asks
    assert store.advise_directory_readahead() == 0
    close_store(store)


def _resident(path: Path, ranges: list[tuple[int, int]]) -> list[bool]:
    """Whether every page of each (offset, length) of a file is in the page cache (mincore
    on a private mapping of it: its pages are the page cache's until written)."""
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        base = ctypes.addressof(anchor)
        out = []
        for offset, length in ranges:
            start = offset - offset % page
            pages = -(-(offset + length - start) // page)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(base + start), ctypes.c_size_t(pages * page), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            out.append(all(v & 1 for v in vec))
        return out
    finally:
        del anchor
        mapping.close()


def test_a_sequential_read_has_the_kernel_fetch_the_streams_next_blocks_wherever_they_lie(
    tmp_path: Path,
) -> None:
    """Blocks are written copy-on-write, wherever free units are, so a file's next block
    may lie anywhere in the container and the kernel's own read-ahead (forward from the
    last read) misses it. Here each block lies *before* the previous one: a read of the
    first two blocks must get the following ones fetched all the same."""
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    blocks = 40
    bs = store.layout.block_size
    for index in reversed(range(blocks)):  # one commit each: block 39 gets the lowest units
        store.write(oid, 0, index * bs, os.urandom(bs))
        store.commit()
    store.close()
    vault.close_fds()

    store = vault.open()
    s = store._stream(oid, 0)

    def units_of(index: int) -> tuple[int, int]:
        unit, units, _f, _n, _t = unpack_pointer(store._ptr_of(s, 0, index))
        return store.layout.unit_offset(unit), units * store.layout.unit_size

    later = [units_of(i) for i in range(10, 31)]
    assert all(b[0] < a[0] for a, b in itertools.pairwise(later)), "layout is not reversed"
    with open(vault.path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if any(_resident(vault.path, later)):
        pytest.skip("this filesystem keeps the container cached (tmpfs?): nothing to observe")
    assert store.read(oid, 0, 0, bs) and store.read(oid, 0, bs, bs)  # blocks 0 and 1, in order
    deadline = time.monotonic() + 5
    while not all(_resident(vault.path, later)):
        assert time.monotonic() < deadline, _resident(vault.path, later)
        time.sleep(0.01)
    store.close()
    vault.close_fds()
