"""kryptvault.fs semantics without FUSE, over the in-memory store and the real one."""

from __future__ import annotations

import errno
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fs_fixtures import MemoryStore, close_store, new_store, open_store

from kryptvault.fs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    UTIME_NOW,
    UTIME_OMIT,
    CommitScheduler,
    Filesystem,
    FsError,
)
from kryptvault.fs.directory import Directory
from kryptvault.fs.inode import Inode
from kryptvault.fs.xattr import XATTR_CREATE, XATTR_REPLACE

R = ROOT_INO


def err(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


@pytest.fixture
def fs() -> Filesystem:
    return Filesystem.mkfs(MemoryStore(), 1000, 1000)


def mkfile(fs: Filesystem, parent: int, name: bytes, data: bytes = b"") -> int:
    st, fh = fs.create(parent, name, 0o644, 0o1, 1000, 1000)
    if data:
        fs.write(fh, 0, data)
    fs.release(fh)
    return st.ino


def test_inode_blob_roundtrip() -> None:
    n = Inode(7, stat.S_IFREG | 0o640, 1, 2, 3, 123456789012345678, rdev=99, parent=0)
    n.atime_ns = -5
    blob = n.pack()
    assert len(blob) == 128 and blob[72:] == bytes(56)
    m = Inode.unpack(7, blob)
    assert m is not None
    for f in ("mode", "uid", "gid", "nlink", "rdev", "atime_ns", "mtime_ns", "ctime_ns", "btime_ns"):
        assert getattr(m, f) == getattr(n, f)
    assert Inode.unpack(7, bytes(128)) is None


def test_directory_records_and_compaction() -> None:
    d, data = Directory.new()
    buf = bytearray(data)

    def apply(w: tuple[int, bytes]) -> None:
        off, b = w
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(b)] = b

    for i in range(500):
        apply(d.add(b"name-%d" % i, i + 10, 8))
    for i in range(500):
        if i % 3 != 1:
            apply(d.remove(b"name-%d" % i))
    apply(d.replace(b"name-1", 999, 4))
    e = Directory.load(bytes(buf))
    assert {n: (o, t) for n, o, t in e.items()} == {n: (o, t) for n, o, t in d.items()}
    assert e.get(b"name-1")[:2] == [999, 4]
    assert d.needs_compaction()
    new = d.compact()
    assert len(new) < len(buf)
    assert {n: o for n, o, _ in Directory.load(new).items()} == {n: o for n, o, _ in d.items()}


def test_create_lookup_getattr(fs: Filesystem) -> None:
    root = fs.getattr(R)
    assert stat.S_ISDIR(root.mode) and root.nlink == 2 and root.uid == 1000
    ino = mkfile(fs, R, b"a", b"hello")
    assert fs.lookup(R, b"a") == ino == fs.resolve(b"/a")
    st = fs.getattr(ino)
    assert st.size == 5 and stat.S_ISREG(st.mode) and st.nlink == 1
    with pytest.raises(FsError) as e:
        fs.create(R, b"a", 0o644, 0, 0, 0)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        fs.lookup(R, b"nope")
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        fs.create(R, b"x" * 256, 0o644, 0, 0, 0)
    assert err(e) == errno.ENAMETOOLONG
    mkfile(fs, R, b"y" * 255)
    with pytest.raises(FsError) as e:
        fs.lookup(ino, b"x")
    assert err(e) == errno.ENOTDIR


def test_dirs_nlink_rmdir(fs: Filesystem) -> None:
    a = fs.mkdir(R, b"a", 0o755, 0, 0).ino
    fs.mkdir(a, b"b", 0o755, 0, 0)
    assert fs.getattr(R).nlink == 3 and fs.getattr(a).nlink == 3
    with pytest.raises(FsError) as e:
        fs.rmdir(R, b"a")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        fs.unlink(R, b"a")
    assert err(e) == errno.EISDIR
    f = mkfile(fs, a, b"f")
    with pytest.raises(FsError) as e:
        fs.rmdir(a, b"f")
    assert err(e) == errno.ENOTDIR
    fs.unlink(a, b"f")
    fs.rmdir(a, b"b")
    fs.rmdir(R, b"a")
    assert fs.getattr(R).nlink == 2
    assert not fs.store.oid_in_use(a) and not fs.store.oid_in_use(f)
    assert [n for n, _, _ in fs.readdir(R)] == [b".", b".."]


def test_sgid_dir_inherits_group(fs: Filesystem) -> None:
    d = fs.mkdir(R, b"g", 0o2775, 0, 50).ino
    sub = fs.mkdir(d, b"s", 0o755, 7, 7)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    st, _fh = fs.create(d, b"f", 0o644, 0, 7, 7)
    assert st.gid == 50 and not st.mode & stat.S_ISGID


def test_read_write_sparse_truncate(fs: Filesystem) -> None:
    st, fh = fs.create(R, b"f", 0o644, 2, 0, 0)
    fs.write(fh, 10, b"abc")
    assert fs.read(fh, 0, 100) == bytes(10) + b"abc"
    fs.truncate(st.ino, 5)
    assert fs.read(fh, 0, 100) == bytes(5)
    fs.truncate(st.ino, 8)
    assert fs.getattr(st.ino).size == 8
    with pytest.raises(FsError) as e:
        fs.truncate(R, 0)
    assert err(e) == errno.EISDIR


def test_append(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"log", b"one\n")
    fh = fs.open(ino, 0o1 | 0o2000)  # O_WRONLY|O_APPEND
    fs.write(fh, 0, b"two\n")
    fs.release(fh)
    fh = fs.open(ino, 0)
    assert fs.read(fh, 0, 100) == b"one\ntwo\n"


def test_open_trunc(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"t", b"content")
    fh = fs.open(ino, 0o1 | 0o1000)
    assert fs.getattr(ino).size == 0
    fs.release(fh)


def test_unlinked_open_file_lives_until_release(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"f", b"data")
    fh = fs.open(ino, 0)
    fs.unlink(R, b"f")
    assert fs.read(fh, 0, 10) == b"data"
    assert fs.getattr(ino).nlink == 0
    assert fs.store.oid_in_use(ino)
    fs.release(fh)
    assert not fs.store.oid_in_use(ino)


def test_orphans_freed_on_open() -> None:
    store = MemoryStore()
    fs = Filesystem.mkfs(store, 0, 0)
    ino = mkfile(fs, R, b"f", b"data")
    fs.open(ino, 0)
    fs.unlink(R, b"f")
    fs.commit()  # "crash" with the file still open
    assert store.oid_in_use(ino)
    Filesystem(store)
    assert not store.oid_in_use(ino)


def test_hard_links(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"a", b"x")
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    fs.link(ino, d, b"b")
    assert fs.getattr(ino).nlink == 2
    assert fs.resolve(b"/d/b") == ino
    with pytest.raises(FsError) as e:
        fs.link(d, R, b"dd")
    assert err(e) == errno.EPERM
    with pytest.raises(FsError) as e:
        fs.link(ino, R, b"a")
    assert err(e) == errno.EEXIST
    fs.unlink(R, b"a")
    assert fs.getattr(ino).nlink == 1 and fs.store.oid_in_use(ino)
    fs.unlink(d, b"b")
    assert not fs.store.oid_in_use(ino)


def test_symlink(fs: Filesystem) -> None:
    st = fs.symlink(R, b"l", b"../some/where", 0, 0)
    assert stat.S_ISLNK(st.mode) and st.size == len(b"../some/where")
    assert fs.readlink(st.ino) == b"../some/where"
    with pytest.raises(FsError) as e:
        fs.readlink(R)
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        fs.symlink(R, b"m", b"", 0, 0)
    assert err(e) == errno.ENOENT


def test_rename_rules(fs: Filesystem) -> None:
    a = mkfile(fs, R, b"a", b"A")
    b = mkfile(fs, R, b"b", b"B")
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    e_ = fs.mkdir(R, b"e", 0o755, 0, 0).ino
    sub = fs.mkdir(d, b"sub", 0o755, 0, 0).ino

    def raises(code: int, *args: object) -> None:
        with pytest.raises(FsError) as e:
            fs.rename(*args)  # type: ignore[arg-type]
        assert err(e) == code

    raises(errno.EEXIST, R, b"a", R, b"b", RENAME_NOREPLACE)
    raises(errno.EISDIR, R, b"a", R, b"d")
    raises(errno.ENOTDIR, R, b"d", R, b"a")
    raises(errno.ENOTEMPTY, R, b"e", R, b"d")
    raises(errno.EINVAL, R, b"d", sub, b"x")
    raises(errno.EINVAL, R, b"d", d, b"x")
    raises(errno.ENOENT, R, b"zz", R, b"y")
    fs.rename(R, b"a", R, b"b")  # file over file
    assert fs.lookup(R, b"b") == a and not fs.store.oid_in_use(b)
    fs.rename(R, b"e", d, b"sub")  # dir over empty dir, other parent
    assert fs.lookup(d, b"sub") == e_ and not fs.store.oid_in_use(sub)
    assert fs.getattr(R).nlink == 3 and fs.getattr(d).nlink == 3
    assert fs.lookup(e_, b"..") == d
    fs.rename(d, b"sub", R, b"moved")
    assert fs.getattr(d).nlink == 2 and fs.getattr(R).nlink == 4
    # hard links to the same inode: rename is a no-op
    fs.link(a, R, b"a2")
    fs.rename(R, b"a2", R, b"b")
    assert fs.lookup(R, b"a2") == a


def test_rename_exchange(fs: Filesystem) -> None:
    f = mkfile(fs, R, b"f")
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    x = fs.mkdir(d, b"x", 0o755, 0, 0).ino
    fs.rename(R, b"f", d, b"x", RENAME_EXCHANGE)
    assert fs.lookup(R, b"f") == x and fs.lookup(d, b"x") == f
    assert fs.lookup(x, b"..") == R
    assert fs.getattr(R).nlink == 4 and fs.getattr(d).nlink == 2
    with pytest.raises(FsError) as e:
        fs.rename(R, b"f", R, b"nothing", RENAME_EXCHANGE)
    assert err(e) == errno.ENOENT


def test_times(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"f")
    before = fs.getattr(R).mtime_ns
    time.sleep(0.01)  # past a tick of the coarse clock file times come from, as on ext4
    mkfile(fs, R, b"g")
    assert fs.getattr(R).mtime_ns > before
    fs.utimens(ino, 1_000_000_001, 2_000_000_002)
    st = fs.getattr(ino)
    assert (st.atime_ns, st.mtime_ns) == (1_000_000_001, 2_000_000_002)
    fs.utimens(ino, UTIME_OMIT, UTIME_NOW)
    st2 = fs.getattr(ino)
    assert st2.atime_ns == 1_000_000_001 and st2.mtime_ns > 2_000_000_002
    c = st2.ctime_ns
    time.sleep(0.01)
    fs.chmod(ino, 0o600)
    st3 = fs.getattr(ino)
    assert st3.ctime_ns > c and stat.S_IMODE(st3.mode) == 0o600


def test_chown_rules(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"f")
    fs.chmod(ino, 0o6755)
    with pytest.raises(FsError) as e:
        fs.chown(ino, 5, -1, caller_uid=1000)
    assert err(e) == errno.EPERM
    fs.chown(ino, 1000, -1, caller_uid=0)
    with pytest.raises(FsError):
        fs.chown(ino, -1, 77, caller_uid=1000, caller_groups=(1000,))
    st = fs.chown(ino, -1, 77, caller_uid=1000, caller_groups=(1000, 77))
    assert st.gid == 77 and not st.mode & (stat.S_ISUID | stat.S_ISGID)


def test_xattrs(fs: Filesystem) -> None:
    ino = mkfile(fs, R, b"f")
    fs.setxattr(ino, b"user.a", b"1")
    with pytest.raises(FsError) as e:
        fs.setxattr(ino, b"user.a", b"2", XATTR_CREATE)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        fs.setxattr(ino, b"user.b", b"2", XATTR_REPLACE)
    assert err(e) == errno.ENODATA
    fs.setxattr(ino, b"user.b", b"")
    assert sorted(fs.listxattr(ino)) == [b"user.a", b"user.b"]
    assert fs.getxattr(ino, b"user.b") == b""
    fs.removexattr(ino, b"user.a")
    with pytest.raises(FsError) as e:
        fs.getxattr(ino, b"user.a")
    assert err(e) == errno.ENODATA
    with pytest.raises(FsError) as e:
        fs.setxattr(ino, b"user.big", bytes(65537))
    assert err(e) == errno.E2BIG


def test_commit_scheduler(fs: Filesystem) -> None:
    store = fs.store
    assert isinstance(store, MemoryStore)
    sched = CommitScheduler(fs, delay=0.3, interval=0.05)
    sched.start()
    try:
        n = store.committed
        time.sleep(0.4)
        assert store.committed == n  # nothing to do
        mkfile(fs, R, b"f", b"x")
        t0 = time.monotonic()
        while store.committed == n and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        assert store.committed == n + 1
        assert time.monotonic() - t0 < 0.6
    finally:
        sched.stop()


def test_the_commit_scheduler_runs_handed_jobs_in_order_on_its_thread_until_stopped(fs: Filesystem) -> None:
    sched = CommitScheduler(fs, delay=0.3, interval=0.05)
    ran: list[tuple[int, str]] = []
    release = threading.Event()

    def note(i: int) -> Callable[[], None]:
        return lambda: ran.append((i, threading.current_thread().name))

    def wait_for_release() -> None:
        release.wait(5)  # keeps the thread busy a moment

    def fail() -> None:
        raise RuntimeError("a failing job does not end the thread")

    assert not sched.run_soon(note(9))  # not started: nothing would run it
    sched.start()
    try:
        assert sched.run_soon(wait_for_release)
        for i in range(3):
            assert sched.run_soon(note(i))
        assert sched.run_soon(fail)
        assert sched.run_soon(note(3))
        assert ran == []
        release.set()
    finally:
        sched.stop()  # every job accepted before the stop has run when it returns
    assert ran == [(i, "kryptvault-commit") for i in range(4)]
    assert not sched.run_soon(note(9))
    time.sleep(0.1)
    assert len(ran) == 4


def test_statfs(fs: Filesystem) -> None:
    s = fs.statfs()
    assert s.namemax == 255 and s.blocks == 1 << 20 and 0 < s.bfree <= s.blocks


def test_real_store_persistence(tmp_path: Path) -> None:
    path = tmp_path / "c.kv"
    store = new_store(path)
    fs = Filesystem.mkfs(store, 0, 0)
    d = fs.mkdir(R, b"dir", 0o700, 0, 0).ino
    ino = mkfile(fs, d, b"file", b"payload" * 1000)
    fs.setxattr(ino, b"user.k", b"v")
    fs.symlink(d, b"ln", b"file", 0, 0)
    fs.commit()
    close_store(store)
    store = open_store(path)
    fs = Filesystem(store)
    ino2 = fs.resolve(b"/dir/file")
    assert ino2 == ino
    fh = fs.open(ino2, 0)
    assert fs.read(fh, 0, 10**6) == b"payload" * 1000
    assert fs.getxattr(ino2, b"user.k") == b"v"
    assert fs.readlink(fs.resolve(b"/dir/ln")) == b"file"
    assert stat.S_IMODE(fs.getattr(d).mode) == 0o700
    close_store(store)


def test_removed_open_directory_keeps_its_number(fs: Filesystem) -> None:
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    fs.opendir(d)
    fs.rmdir(R, b"d")
    assert fs.readdir_from(d, 0, False) == []
    assert fs.mkdir(R, b"e", 0o755, 0, 0).ino != d  # not reused while open
    fs.releasedir(d)
    assert not fs.store.oid_in_use(d)


def test_readdir_cookies_survive_removal(fs: Filesystem) -> None:
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    for i in range(600):
        mkfile(fs, d, b"file-%03d" % i)
    fs.opendir(d)
    seen: list[bytes] = []
    cookie = 0
    while True:
        batch = fs.readdir_from(d, cookie, True)[:25]
        if not batch:
            break
        for name, c, _st in batch:
            if name not in (b".", b".."):
                seen.append(name)
                fs.unlink(d, name)  # rm -rf style: delete while reading
            cookie = c
    fs.releasedir(d)
    assert len(seen) == 600 and len(set(seen)) == 600
    assert fs.readdir(d)[2:] == []


class _SealFails(MemoryStore):
    def seal_data(self, oid: int) -> None:
        raise OSError(errno.EIO, "the container cannot be read")


def test_a_failure_while_sealing_a_closed_file_in_the_background_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """idle_work runs in the FUSE request loop and the backlog's seal in a close: neither
    may end the loop or fail the close (the store's own state reports the failure)."""
    from kryptvault.fs.filesystem import _SEAL_BACKLOG

    fs = Filesystem.mkfs(_SealFails(), 1000, 1000)
    for i in range(_SEAL_BACKLOG + 2):  # past the backlog: the close seals too
        mkfile(fs, R, b"f%d" % i, b"data")
    assert fs.idle_work() is True
    while fs.idle_work():
        pass
    failures = [r for r in caplog.records if "encrypting a closed file's data failed" in r.getMessage()]
    assert len(failures) == _SEAL_BACKLOG + 2
