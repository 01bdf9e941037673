"""POSIX behaviour of a mounted vault, checked through the kernel (real syscalls)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fs_fixtures import (  # noqa: F401  (fixtures)
    Mount,
    mdir_fixture,
    renameat2,
    shared_mount_fixture,
    utimensat,
)

pytestmark = pytest.mark.fuse

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def errno_of(fn, *args, **kw) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno or 0
    return 0


def test_basic_errors(mdir: Path) -> None:
    (mdir / "f").write_bytes(b"x")
    (mdir / "d").mkdir()
    assert errno_of(os.stat, mdir / "missing") == errno.ENOENT
    assert errno_of(os.mkdir, mdir / "d") == errno.EEXIST
    assert errno_of(os.mkdir, mdir / "f") == errno.EEXIST
    assert errno_of(os.stat, mdir / "f" / "x") == errno.ENOTDIR
    assert errno_of(os.open, mdir / "d", os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.unlink, mdir / "d") == errno.EISDIR
    assert errno_of(os.rmdir, mdir / "f") == errno.ENOTDIR
    assert errno_of(os.open, mdir / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    fd = os.open(mdir / ("n" * 255), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    assert (mdir / ("n" * 255)).exists()
    (mdir / "d" / "sub").mkdir()
    assert errno_of(os.rename, mdir / "d", mdir / "d" / "sub" / "x") == errno.EINVAL
    assert errno_of(os.rename, mdir / "f", mdir / "d") == errno.EISDIR
    assert errno_of(os.rename, mdir / "d", mdir / "f") == errno.ENOTDIR
    assert errno_of(os.link, mdir / "d", mdir / "dlink") == errno.EPERM


def test_o_excl(mdir: Path) -> None:
    p = mdir / "excl"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    assert errno_of(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) == errno.EEXIST
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_rmdir_nonempty(mdir: Path) -> None:
    (mdir / "d").mkdir()
    (mdir / "d" / "f").write_bytes(b"")
    assert errno_of(os.rmdir, mdir / "d") == errno.ENOTEMPTY
    os.unlink(mdir / "d" / "f")
    os.rmdir(mdir / "d")
    assert not (mdir / "d").exists()


def test_dir_nlink(mdir: Path) -> None:
    base = os.stat(mdir).st_nlink
    assert base == 2
    for n in "abc":
        (mdir / n).mkdir()
    (mdir / "file").write_bytes(b"")
    assert os.stat(mdir).st_nlink == 5
    os.rename(mdir / "a", mdir / "b" / "a")
    assert os.stat(mdir).st_nlink == 4 and os.stat(mdir / "b").st_nlink == 3


def test_renameat2(mdir: Path) -> None:
    (mdir / "a").write_bytes(b"A")
    (mdir / "b").write_bytes(b"B")
    with pytest.raises(OSError) as e:
        renameat2(mdir / "a", mdir / "b", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    assert (mdir / "b").read_bytes() == b"B"
    renameat2(mdir / "a", mdir / "c", RENAME_NOREPLACE)
    assert (mdir / "c").read_bytes() == b"A" and not (mdir / "a").exists()
    renameat2(mdir / "b", mdir / "c", RENAME_EXCHANGE)
    assert (mdir / "c").read_bytes() == b"B" and (mdir / "b").read_bytes() == b"A"
    os.rename(mdir / "b", mdir / "c")  # plain rename replaces
    assert (mdir / "c").read_bytes() == b"A" and not (mdir / "b").exists()


def test_rename_dir_over_empty_dir(mdir: Path) -> None:
    (mdir / "src").mkdir()
    (mdir / "src" / "f").write_bytes(b"1")
    (mdir / "dst").mkdir()
    os.rename(mdir / "src", mdir / "dst")
    assert (mdir / "dst" / "f").read_bytes() == b"1"
    (mdir / "other").mkdir()
    (mdir / "other" / "g").write_bytes(b"")
    assert errno_of(os.rename, mdir / "dst", mdir / "other") == errno.ENOTEMPTY


def test_hard_links(mdir: Path) -> None:
    a, b = mdir / "a", mdir / "b"
    a.write_bytes(b"one")
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    with open(b, "ab") as f:
        f.write(b"two")
    assert a.read_bytes() == b"onetwo"
    assert os.stat(a).st_size == 6
    os.unlink(a)
    assert os.stat(b).st_nlink == 1 and b.read_bytes() == b"onetwo"


def test_symlinks(mdir: Path) -> None:
    (mdir / "target").write_bytes(b"T")
    os.symlink("target", mdir / "rel")
    os.symlink("/nonexistent/é/ü", mdir / "dangling")
    assert os.readlink(mdir / "rel") == "target"
    assert os.readlink(mdir / "dangling") == "/nonexistent/é/ü"
    assert (mdir / "rel").read_bytes() == b"T"
    st = os.lstat(mdir / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target")
    assert not (mdir / "dangling").exists() and (mdir / "dangling").is_symlink()


def test_utimens_ns(mdir: Path) -> None:
    p = mdir / "t"
    p.write_bytes(b"")
    os.utime(p, ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    st = os.stat(p)
    assert st.st_atime_ns == 1_111_111_111_123_456_789
    assert st.st_mtime_ns == 1_222_222_222_987_654_321
    utimensat(p, (0, UTIME_OMIT), (5, 7))
    st = os.stat(p)
    assert st.st_atime_ns == 1_111_111_111_123_456_789 and st.st_mtime_ns == 5_000_000_007
    before = time.time_ns()
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(p)
    assert st.st_atime_ns >= before - 10**9 and st.st_mtime_ns == 5_000_000_007


def test_mtime_ctime_updates(mdir: Path) -> None:
    p = mdir / "f"
    p.write_bytes(b"a")
    os.utime(p, ns=(0, 0))
    os.utime(mdir, ns=(0, 0))
    with open(p, "ab") as f:
        f.write(b"b")
    assert os.stat(p).st_mtime_ns > 0
    (mdir / "new").write_bytes(b"")
    assert os.stat(mdir).st_mtime_ns > 0
    c0 = os.stat(p).st_ctime_ns
    time.sleep(0.01)
    os.chmod(p, 0o600)
    assert os.stat(p).st_ctime_ns > c0


def test_truncate(mdir: Path) -> None:
    p = mdir / "t"
    p.write_bytes(b"0123456789" * 10000)
    os.truncate(p, 12345)
    data = p.read_bytes()
    assert len(data) == 12345 and data == (b"0123456789" * 10000)[:12345]
    os.truncate(p, 200000)
    data = p.read_bytes()
    assert len(data) == 200000 and data[12345:] == bytes(200000 - 12345)
    with open(p, "r+b") as f:
        f.truncate(3)
        f.seek(0)
        assert f.read() == b"012"
    with open(p, "wb") as f:  # O_TRUNC
        pass
    assert os.stat(p).st_size == 0


def test_sparse_over_4gib(shared_mount: Mount, mdir: Path) -> None:
    p = mdir / "sparse"
    before = os.stat(shared_mount.container).st_size
    off = 5 << 30
    with open(p, "wb") as f:
        f.seek(off)
        f.write(b"Z")
        f.flush()
        os.fsync(f.fileno())
    assert os.stat(p).st_size == off + 1
    with open(p, "rb") as f:
        f.seek(off - 4096)
        assert f.read() == bytes(4096) + b"Z"
        f.seek(1 << 32)
        assert f.read(65536) == bytes(65536)
        f.seek(0)
        assert f.read(1 << 20) == bytes(1 << 20)
    grown = os.stat(shared_mount.container).st_size - before
    assert grown < 8 << 20, grown
    os.truncate(p, 10)
    assert p.read_bytes() == bytes(10)


def test_unlinked_open_file(mdir: Path) -> None:
    p = mdir / "tmp"
    with open(p, "w+b") as f:
        f.write(b"secret stuff")
        os.unlink(p)
        assert not p.exists()
        f.write(b" more")
        f.flush()
        f.seek(0)
        assert f.read() == b"secret stuff more"
        st = os.fstat(f.fileno())
        assert st.st_nlink == 0 and st.st_size == 17
        os.ftruncate(f.fileno(), 6)
        os.fchmod(f.fileno(), 0o600)
        assert os.fstat(f.fileno()).st_size == 6
        f.seek(0)
        assert f.read() == b"secret"
    assert os.listdir(mdir) == []


def test_xattrs(mdir: Path) -> None:
    p = mdir / "x"
    p.write_bytes(b"")
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.bin", bytes(range(256)) * 10)
    assert sorted(os.listxattr(p)) == ["user.bin", "user.empty", "user.one"]
    assert os.getxattr(p, "user.one") == b"1"
    assert os.getxattr(p, "user.empty") == b""
    assert os.getxattr(p, "user.bin") == bytes(range(256)) * 10
    assert errno_of(os.setxattr, p, "user.one", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, p, "user.two", b"2", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.one", b"11", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.one") == b"11"
    os.removexattr(p, "user.one")
    assert errno_of(os.getxattr, p, "user.one") == errno.ENODATA
    assert errno_of(os.removexattr, p, "user.one") == errno.ENODATA
    # size query and ERANGE through libc
    import ctypes

    from fs_fixtures import libc

    lib = libc()
    n = lib.getxattr(os.fsencode(p), b"user.bin", None, ctypes.c_size_t(0))
    assert n == 2560
    buf = ctypes.create_string_buffer(10)
    r = lib.getxattr(os.fsencode(p), b"user.bin", buf, ctypes.c_size_t(10))
    assert r == -1 and ctypes.get_errno() == errno.ERANGE
    (mdir / "d").mkdir()
    os.setxattr(mdir / "d", "user.dir", b"yes")
    assert os.getxattr(mdir / "d", "user.dir") == b"yes"


def test_statfs(shared_mount: Mount) -> None:
    s = os.statvfs(shared_mount.mountpoint)
    assert s.f_namemax == 255
    assert s.f_frsize == 4096
    assert s.f_blocks >= s.f_bfree >= s.f_bavail > 0
    assert s.f_files >= s.f_ffree > 0
    out = subprocess.run(["df", "-P", str(shared_mount.mountpoint)], capture_output=True, text=True)
    assert out.stdout.splitlines()[1].startswith("kryptvault:")
    mounts = Path("/proc/self/mounts").read_text()
    assert f"{shared_mount.mountpoint} fuse.kryptvault" in mounts


_APPENDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
line = (sys.argv[2] * 63 + "\\n").encode()
for _ in range(int(sys.argv[3])):
    os.write(fd, line)
os.close(fd)
"""


def test_o_append_two_processes(mdir: Path) -> None:
    p = mdir / "log"
    p.write_bytes(b"")
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(p), c, "400"]) for c in "AB"
    ]
    assert all(pr.wait(60) == 0 for pr in procs)
    lines = p.read_bytes().split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert len(lines) == 800
    assert all(ln in (b"A" * 63, b"B" * 63) for ln in lines)
    assert sum(ln[:1] == b"A" for ln in lines) == 400


_WRITER = """
import os, sys, hashlib
path, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path, "wb") as f:
    for i in range(n):
        f.write(hashlib.sha256(f"{seed}:{i}".encode()).digest() * 2048)
"""

_READER = """
import sys, hashlib
path, want, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(rounds):
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == want
"""


def test_concurrent_writers_and_readers(mdir: Path) -> None:
    import hashlib

    shared = mdir / "shared"
    content = os.urandom(3 << 20)
    shared.write_bytes(content)
    want = hashlib.sha256(content).hexdigest()
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(mdir / f"w{i}"), str(i), "40"])
        for i in range(4)
    ]
    readers = [
        subprocess.Popen([sys.executable, "-c", _READER, str(shared), want, "5"]) for _ in range(3)
    ]
    assert all(p.wait(120) == 0 for p in writers + readers)
    for i in range(4):
        expect = b"".join(
            hashlib.sha256(f"{i}:{j}".encode()).digest() * 2048 for j in range(40)
        )
        assert (mdir / f"w{i}").read_bytes() == expect


def test_many_entries_and_readdir(mdir: Path) -> None:
    names = {f"file-{i:05d}-{'x' * (i % 50)}" for i in range(3000)}
    for n in names:
        (mdir / n).write_bytes(n.encode())
    assert set(os.listdir(mdir)) == names
    for i, n in enumerate(sorted(names)):
        if i % 3:
            os.unlink(mdir / n)
    left = {n for i, n in enumerate(sorted(names)) if i % 3 == 0}
    assert set(os.listdir(mdir)) == left
    for n in list(left)[:50]:
        assert (mdir / n).read_bytes() == n.encode()


def test_special_files(mdir: Path) -> None:
    os.mkfifo(mdir / "fifo")
    assert stat.S_ISFIFO(os.stat(mdir / "fifo").st_mode)
    os.mknod(mdir / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(mdir / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(mdir / "sock"))
        assert stat.S_ISSOCK(os.stat(mdir / "sock").st_mode)
    finally:
        s.close()


def test_chown_and_setgid(mdir: Path) -> None:
    p = mdir / "own"
    p.write_bytes(b"")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chmod(p, 0o4755)
    assert os.stat(p).st_mode & stat.S_ISUID
    os.chown(p, 4321, -1)
    assert os.stat(p).st_uid == 4321
    (mdir / "g").mkdir()
    os.chmod(mdir / "g", 0o2775)
    os.chown(mdir / "g", -1, 4242)
    (mdir / "g" / "f").write_bytes(b"")
    (mdir / "g" / "sub").mkdir()
    assert os.stat(mdir / "g" / "f").st_gid == 4242
    assert os.stat(mdir / "g" / "sub").st_mode & stat.S_ISGID


def test_mmap_write_read(mdir: Path) -> None:
    import mmap

    p = mdir / "m"
    p.write_bytes(bytes(1 << 16))
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[100:105] = b"hello"
        m.flush()
    assert p.read_bytes()[100:105] == b"hello"
