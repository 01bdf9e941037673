"""fallocate(2) on a mounted vault: mode 0, KEEP_SIZE and PUNCH_HOLE|KEEP_SIZE behave like
on a local filesystem (contents and sizes compared byte for byte with a reference file),
punched whole blocks are freed, every other mode is refused with EOPNOTSUPP, results
survive a remount, a range that could not be committed is refused with ENOSPC, and a
punch works on a full disk."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_fixtures import (
    TEST_DATA_KEY,
    TEST_META_KEY,
    TEST_UUID,
    Mount,
    close_store,
    libc,
    mkfs_container,
    mounted,
    needs_fuse,
    new_store,
    open_store,
)
from loopdisk import ext4_loop_disk
from needs import require_fuse

pytestmark = needs_fuse

KIB = 1 << 10
MIB = 1 << 20
BLOCK = 64 * KIB  # the vault's default block size (kryptvault.container.layout)
KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
COLLAPSE_RANGE = 0x08
ZERO_RANGE = 0x10
INSERT_RANGE = 0x20
UNSHARE_RANGE = 0x40


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    lib = libc()
    fn = lib.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if fn(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("fallocate") is None:
        pytest.skip("needs the util-linux fallocate command")
    return subprocess.run(["fallocate", *map(str, args)], capture_output=True, text=True, check=False)


def _pattern(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Mount]:
    require_fuse()
    with mounted(tmp_path) as m:
        yield m


def test_posix_fallocate_extends_the_size_and_the_new_range_reads_as_zeros(vault: Mount) -> None:
    path = vault.mountpoint / "f"
    path.write_bytes(b"head")
    fd = os.open(path, os.O_RDWR)
    try:
        before = os.fstat(fd)
        os.posix_fallocate(fd, 1000, 3 * BLOCK + 17)
        st = os.fstat(fd)
        assert st.st_size == 1000 + 3 * BLOCK + 17
        assert st.st_mtime_ns >= before.st_mtime_ns
        # A range inside the size leaves size and data alone.
        os.posix_fallocate(fd, 0, 10)
        assert os.fstat(fd).st_size == 1000 + 3 * BLOCK + 17
        # fallocate(2) itself (glibc's posix_fallocate would emulate a refusal by writing).
        _fallocate(fd, 0, 5 * BLOCK, 3)
        assert os.fstat(fd).st_size == 5 * BLOCK + 3
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data == b"head" + bytes(5 * BLOCK - 1)


def test_keep_size_and_punch_hole_match_a_local_reference_file_byte_for_byte(
    vault: Mount, tmp_path: Path
) -> None:
    rng = random.Random(7)
    content = _pattern(rng, 5 * BLOCK + 1234)
    ours, ref = vault.mountpoint / "f", tmp_path / "ref"
    for p in (ours, ref):
        p.write_bytes(content)
        # Through the CLI (fallocate(2) with the flags util-linux passes).
        assert _cli("--keep-size", "--offset", "0", "--length", str(9 * BLOCK), p).returncode == 0
        assert _cli("--punch-hole", "--offset", "100", "--length", "5000", p).returncode == 0
        assert _cli("--punch-hole", "--offset", str(BLOCK), "--length", str(2 * BLOCK), p).returncode == 0
        # An edge-crossing punch and a punch running past the end of the file.
        assert _cli("--punch-hole", "--offset", str(4 * BLOCK - 300), "--length", "700", p).returncode == 0
        past_end = str(5 * BLOCK + 1000)
        assert _cli("--punch-hole", "--offset", past_end, "--length", str(BLOCK), p).returncode == 0
        # Mode 0 inside the file leaves the size alone; past it extends it.
        assert _cli("--offset", "10", "--length", "10", p).returncode == 0
        with open(p, "r+b") as f:
            _fallocate(f.fileno(), 0, 6 * BLOCK, 999)
    assert os.stat(ours).st_size == os.stat(ref).st_size == 6 * BLOCK + 999
    assert ours.read_bytes() == ref.read_bytes()


def test_punching_whole_blocks_frees_their_space_in_st_blocks(vault: Mount) -> None:
    path = vault.mountpoint / "f"
    data = random.Random(3).randbytes(16 * BLOCK)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 4 * BLOCK, 8 * BLOCK)
        os.fsync(fd)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    assert after.st_size == 16 * BLOCK
    # 8 of 16 incompressible blocks are gone (indirect blocks may remain: loose bound).
    assert after.st_blocks <= before - (7 * BLOCK) // 512, (before, after.st_blocks)
    assert path.read_bytes() == data[: 4 * BLOCK] + bytes(8 * BLOCK) + data[12 * BLOCK :]


@pytest.mark.parametrize(
    "mode",
    [COLLAPSE_RANGE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE, INSERT_RANGE, UNSHARE_RANGE],
    ids=["collapse", "zero", "zero-keep-size", "insert", "unshare"],
)
def test_other_modes_are_refused_with_eopnotsupp_and_change_nothing(vault: Mount, mode: int) -> None:
    path = vault.mountpoint / "f"
    data = random.Random(mode).randbytes(4 * BLOCK)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            _fallocate(fd, mode, BLOCK, BLOCK)
        assert info.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_the_fallocate_command_reports_collapse_range_as_not_supported(vault: Mount) -> None:
    path = vault.mountpoint / "f"
    path.write_bytes(bytes(4 * BLOCK))
    r = _cli("--collapse-range", "--offset", str(BLOCK), "--length", str(BLOCK), path)
    assert r.returncode != 0
    assert "not supported" in r.stderr.lower(), r.stderr
    assert os.stat(path).st_size == 4 * BLOCK


def test_fallocate_results_survive_an_unmount_and_remount(tmp_path: Path) -> None:
    require_fuse()
    data = random.Random(11).randbytes(8 * BLOCK)
    expect = bytearray(data)
    with mounted(tmp_path) as m:
        path = m.mountpoint / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDWR)
        try:
            _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 2 * BLOCK, 3 * BLOCK + 5)
            expect[2 * BLOCK : 5 * BLOCK + 5] = bytes(3 * BLOCK + 5)
            os.posix_fallocate(fd, 0, 10 * BLOCK)
            expect += bytes(2 * BLOCK)
        finally:
            os.close(fd)
    with mounted(tmp_path, fresh=False) as m:
        path = m.mountpoint / "f"
        assert path.read_bytes() == bytes(expect)
        st = os.stat(path)
        assert st.st_size == 10 * BLOCK
        # Blocks 0, 1, 5 (partly zeroed), 6, 7 stay; 2-4 and the allocated tail are holes
        # (slack for the indirect block and its copy).
        assert st.st_blocks * 512 <= 5 * BLOCK + 64 * KIB, st.st_blocks


def test_random_writes_punches_and_truncates_match_a_local_reference_file(
    vault: Mount, tmp_path: Path
) -> None:
    rng = random.Random(20261205)
    fds = [os.open(vault.mountpoint / "f", os.O_RDWR | os.O_CREAT, 0o644),
           os.open(tmp_path / "ref", os.O_RDWR | os.O_CREAT, 0o644)]
    limit = 12 * BLOCK
    try:
        for step in range(200):
            op = rng.choice(["write", "write", "punch", "keep", "alloc", "truncate"])
            off = rng.randrange(limit)
            length = rng.choice([1, 511, 4096, BLOCK, BLOCK + 1, rng.randrange(1, 3 * BLOCK)])
            data = rng.randbytes(length) if op == "write" else b""
            for fd in fds:
                if op == "write":
                    os.pwrite(fd, data, off)
                elif op == "punch":
                    _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, off, length)
                elif op == "keep":
                    _fallocate(fd, KEEP_SIZE, off, length)
                elif op == "alloc":
                    _fallocate(fd, 0, off, length)
                else:
                    os.ftruncate(fd, off)
            sizes = [os.fstat(fd).st_size for fd in fds]
            assert sizes[0] == sizes[1], (step, op, off, length)
            if step % 20 == 19 or step == 199:
                ours, ref = (os.pread(fd, sizes[0] + 1, 0) for fd in fds)
                assert ours == ref, (step, op, off, length)
    finally:
        for fd in fds:
            os.close(fd)


def test_punching_across_a_deep_sparse_tree_matches_a_reference_file(
    vault: Mount, tmp_path: Path
) -> None:
    """Blocks 300 GiB apart (three levels of indirect blocks) and a punch spanning them."""
    rng = random.Random(42)
    far = 300 << 30
    spots = [(0, rng.randbytes(3 * BLOCK)), (5000 * BLOCK + 7, rng.randbytes(2 * BLOCK)),
             (far, rng.randbytes(2 * BLOCK + 3))]
    fds = [os.open(vault.mountpoint / "f", os.O_RDWR | os.O_CREAT, 0o644),
           os.open(tmp_path / "ref", os.O_RDWR | os.O_CREAT, 0o644)]
    try:
        for fd in fds:
            for off, data in spots:
                os.pwrite(fd, data, off)
            os.fsync(fd)
        for fd in fds:
            _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, BLOCK + 5, far + BLOCK - (BLOCK + 5))
        os.fsync(fds[0])
        after = os.fstat(fds[0])
        assert after.st_size == os.fstat(fds[1]).st_size == far + 2 * BLOCK + 3
        for off, data in spots:
            ours, ref = (os.pread(fd, len(data) + 2 * BLOCK, max(0, off - BLOCK)) for fd in fds)
            assert ours == ref, off
        # Before: 9 data blocks (696 KiB with the indirect blocks). Left: block 0, the
        # first 5 bytes of block 1, and the last two far blocks (one of 3 bytes): 136 KiB,
        # plus at most 256 KiB of indirect blocks (three levels, two copies). An absolute
        # bound: under a writeback cache the kernel's st_blocks before the punch is stale.
        assert 2 * BLOCK <= after.st_blocks * 512 <= 136 * KIB + 256 * KIB, after.st_blocks
    finally:
        for fd in fds:
            os.close(fd)


def test_punching_a_huge_sparse_file_is_quick_and_leaves_its_size(vault: Mount) -> None:
    path = vault.mountpoint / "f"
    huge = 1 << 62
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a" * BLOCK, 0)
        os.pwrite(fd, b"b" * BLOCK, huge - BLOCK)
        os.pwrite(fd, b"c" * 10, 1 << 40)
        started = time.monotonic()
        _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, huge)
        os.fsync(fd)
        # Walking 2**46 block slots one by one would take days; the holes are skipped.
        assert time.monotonic() - started < 30
        assert os.fstat(fd).st_size == huge
        for off in (0, 1 << 40, huge - BLOCK):
            assert os.pread(fd, BLOCK, off) == bytes(BLOCK)
    finally:
        os.close(fd)


def test_punched_blocks_are_freed_exactly_and_the_store_verifies_after_reopen(tmp_path: Path) -> None:
    """The store's own accounting: freed units are counted free at once (no leak, no double
    free: a reopen, which rebuilds the map from the trees, finds the same count), the
    flushed and dirty blocks in the range both go, and the trees verify."""
    rng = random.Random(9)
    store = new_store(tmp_path / "s.kv")
    units = store._units
    oid = store.allocate_oid()
    far = 5000 * BLOCK  # a second level of indirect blocks
    first = rng.randbytes(6 * BLOCK)
    store.write(oid, 0, 0, first)
    store.write(oid, 0, far, rng.randbytes(3 * BLOCK))
    store.commit()
    store.write(oid, 0, 2 * BLOCK, rng.randbytes(100))  # a dirty block inside the range
    before = store.stored_bytes(oid, 0)
    store.punch(oid, 0, BLOCK, far)
    assert units.free_count() == units.map.count(0)
    # Blocks 1-5 and the first far one are gone.
    assert store.stored_bytes(oid, 0) <= before - 6 * BLOCK
    assert store.read(oid, 0, 0, 6 * BLOCK) == first[:BLOCK] + bytes(5 * BLOCK)
    tail = store.read(oid, 0, far, 3 * BLOCK)
    assert tail[:BLOCK] == bytes(BLOCK) and tail[BLOCK:] != bytes(2 * BLOCK)
    store.commit()
    free = units.free_count()
    assert free == units.map.count(0)
    close_store(store)
    store = open_store(tmp_path / "s.kv")
    try:
        assert store.verify() == []
        assert store._units.free_count() == free
        assert store.read(oid, 0, far, 3 * BLOCK) == tail
        assert store.stream_size(oid, 0) == far + 3 * BLOCK
    finally:
        close_store(store)


def test_on_a_read_only_store_every_fallocate_mode_fails_with_erofs(tmp_path: Path) -> None:
    from kryptvault.container.layout import Layout
    from kryptvault.container.store import ObjectStore
    from kryptvault.crypto.secret import Secret
    from kryptvault.fs import Filesystem, FsError

    container = tmp_path / "v.kv"
    mkfs_container(container)
    store = open_store(container)
    fs = Filesystem(store)
    _st, fh = fs.create(fs.resolve(b"/"), b"f", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, 0, b"x" * 100)
    fs.release(fh)
    fs.commit()
    close_store(store)
    fd = os.open(container, os.O_RDONLY)
    store = ObjectStore.open(fd, Layout(), TEST_UUID, Secret.from_bytes(TEST_DATA_KEY),
                             Secret.from_bytes(TEST_META_KEY), read_only=True)
    try:
        fs = Filesystem(store)
        fh = fs.open(fs.resolve(b"/f"), os.O_RDWR)
        for mode in (0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE):
            with pytest.raises(FsError) as info:
                fs.fallocate(fh, mode, 0, 2 * BLOCK)
            assert info.value.errno == errno.EROFS
        assert fs.read(fh, 0, 200) == b"x" * 100
    finally:
        store.close()
        os.close(fd)


# ---------------------------------------------------------------------- a small full disk
@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with ext4_loop_disk(tmp_path, 48) as top:
        yield top


@contextlib.contextmanager
def _vault_on(disk: Path) -> Iterator[Mount]:
    mkfs_container(disk / "v.kv")
    m = Mount(disk / "v.kv", disk.parent / "mnt", disk.parent / "mnt.log")
    m.start()
    try:
        yield m
    finally:
        rc = m.stop()
        assert rc == 0, m.log()


def test_allocating_more_than_the_disk_can_hold_is_refused_with_enospc(disk: Path) -> None:
    with _vault_on(disk) as m:
        path = m.mountpoint / "f"
        path.write_bytes(b"x")
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.posix_fallocate(fd, 0, 200 * MIB)
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as info:
                _fallocate(fd, KEEP_SIZE, 0, 200 * MIB)
            assert info.value.errno == errno.ENOSPC
            assert os.fstat(fd).st_size == 1  # nothing changed
            # What fits is granted, and the writes it promised then succeed.
            os.posix_fallocate(fd, 0, 8 * MIB)
            assert os.fstat(fd).st_size == 8 * MIB
            os.pwrite(fd, b"\xa5" * (8 * MIB), 0)
            os.fsync(fd)
        finally:
            os.close(fd)


def test_punching_a_hole_works_on_a_full_disk_and_frees_space_for_new_writes(disk: Path) -> None:
    with _vault_on(disk) as m:
        path = m.mountpoint / "big"
        chunk = random.Random(5).randbytes(MIB)
        written = 0
        with open(path, "wb", buffering=0) as f:
            # Down to the last few KiB, so that only the reserve is left.
            for piece in (MIB, BLOCK, 4 * KIB):
                with pytest.raises(OSError) as info:
                    while True:
                        f.write(chunk[:piece])
                        os.fsync(f.fileno())  # under a writeback cache the error comes here
                        written += piece
                        assert written < 100 * MIB
                assert info.value.errno == errno.ENOSPC
        size = os.stat(path).st_size
        fd = os.open(path, os.O_RDWR)
        try:
            _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 8 * MIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert os.stat(path).st_size == size
        with open(path, "rb") as f:
            assert f.read(8 * MIB) == bytes(8 * MIB)
        # The freed space takes new data.
        (m.mountpoint / "new").write_bytes(chunk * 4)
        os.sync()
        assert (m.mountpoint / "new").read_bytes() == chunk * 4
