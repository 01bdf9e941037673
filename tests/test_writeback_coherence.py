"""What the kernel's writeback cache must not break (issue 13), checked on a real mount.

With the writeback cache the kernel, not the daemon, keeps a file's size, mtime and dirty
pages, so every name of a hard-linked file must be the same kernel inode or a change
through one name goes unseen through another; and with FUSE_HANDLE_KILLPRIV_V2 the
filesystem, not the kernel, clears set-user-ID and set-group-ID on write, truncate and
chown. These tests hold the mount to that: hard-link coherence (data, size, mtime, mode,
link count, while files are open and after a name is unlinked), mmap coherence
(MAP_SHARED stores against read()/write() on other fds and names, msync, truncate under
a mapping), suid/sgid clearing (each case also run on the host's own filesystem in the
same test: the running kernel's behaviour is the reference where Linux is subtle), and
O_APPEND / st_size without fsync.
"""

from __future__ import annotations

import functools
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fs_fixtures import Mount, mkfs_container, mounted
from needs import require_fuse

pytestmark = pytest.mark.fuse

NOBODY = 65534
PAGE = mmap.PAGESIZE
BLOCK = 64 * 1024  # the vault's block size: data spanning two blocks catches per-block caching


@dataclass
class Places:
    vault: Path  # the mounted vault's root
    ref: Path  # a plain directory on the host filesystem (ext4 here)


@pytest.fixture(scope="module", name="places")
def places_fixture() -> Iterator[Places]:
    """One vault for the module, mounted with allow_other under a world-searchable
    directory (other users reach a FUSE mount only so), beside a plain directory."""
    require_fuse()
    base = Path(tempfile.mkdtemp(prefix="kv-wb-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        ref = base / "ref"
        ref.mkdir(mode=0o755)
        with mounted(base, allow_other=True) as m:
            os.chmod(m.mountpoint, 0o755)
            yield Places(m.mountpoint, ref)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _test_dir(root: Path, request: pytest.FixtureRequest) -> Path:
    name: str = request.node.name
    d = root / name.replace("[", "_").replace("]", "_").replace(" ", "_")
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.fixture(name="vdir")
def vdir_fixture(places: Places, request: pytest.FixtureRequest) -> Path:
    return _test_dir(places.vault, request)


@pytest.fixture(name="rdir")
def rdir_fixture(places: Places, request: pytest.FixtureRequest) -> Path:
    return _test_dir(places.ref, request)


class Fds:
    """Open file descriptors, all closed at the end of the `with`."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags)
        self.fds.append(fd)
        return fd

    def __enter__(self) -> Fds:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------- hard links
def test_writes_through_one_name_are_seen_at_once_through_the_other_while_both_are_open(
    vdir: Path,
) -> None:
    a, b = vdir / "a", vdir / "b"
    data = bytearray(os.urandom(BLOCK + 5000))
    a.write_bytes(data)
    os.link(a, b)
    with Fds() as fds:
        fa = fds.open(a, os.O_RDWR)
        fb = fds.open(b, os.O_RDWR)
        assert os.pread(fb, len(data), 0) == data  # b's pages and attributes now cached
        before = os.fstat(fb)
        time.sleep(0.02)  # past the kernel's coarse clock tick, so the mtime must move
        os.pwrite(fa, b"hello", 100)
        os.pwrite(fa, b"across", BLOCK - 3)
        os.pwrite(fa, b"tail", len(data) + 3000)  # extends the file through a
        data[100:105] = b"hello"
        data[BLOCK - 3 : BLOCK + 3] = b"across"
        data += bytes(3000) + b"tail"
        sa = os.fstat(fa)
        assert sa.st_size == len(data)
        for st in (os.fstat(fb), os.stat(b), os.stat(a)):
            assert st.st_size == len(data)
            assert st.st_mtime_ns == sa.st_mtime_ns > before.st_mtime_ns
            assert st.st_nlink == 2
        assert os.pread(fb, len(data) + 100, 0) == data
        assert b.read_bytes() == data
        # ... and back the other way, through the fd of the other name
        os.pwrite(fb, b"from-b", 0)
        data[0:6] = b"from-b"
        assert os.pread(fa, 6, 0) == b"from-b"
        assert a.read_bytes() == data
        assert os.fstat(fa).st_mtime_ns == os.fstat(fb).st_mtime_ns


def test_truncate_through_one_name_is_seen_at_once_through_the_other(vdir: Path) -> None:
    a, b = vdir / "a", vdir / "b"
    data = os.urandom(3 * BLOCK)
    a.write_bytes(data)
    os.link(a, b)
    with Fds() as fds:
        fb = fds.open(b, os.O_RDONLY)
        assert os.pread(fb, len(data), 0) == data
        os.truncate(a, BLOCK + 17)  # by path, through a
        assert os.fstat(fb).st_size == os.stat(b).st_size == BLOCK + 17
        assert os.pread(fb, len(data), 0) == data[: BLOCK + 17]
        fa = fds.open(a, os.O_RDWR)
        os.ftruncate(fa, 100)  # through an open fd of a
        assert os.fstat(fb).st_size == 100
        assert os.pread(fb, len(data), 0) == data[:100]
        os.ftruncate(fa, 2 * BLOCK)  # growing: the old bytes must not come back
        assert os.fstat(fb).st_size == 2 * BLOCK
        assert os.pread(fb, 3 * BLOCK, 0) == data[:100] + bytes(2 * BLOCK - 100)
        os.close(os.open(b, os.O_WRONLY | os.O_TRUNC))  # O_TRUNC through b
        assert os.fstat(fa).st_size == os.stat(a).st_size == 0
        assert os.pread(fa, 100, 0) == b""


def test_chmod_chown_and_utime_through_one_name_are_seen_at_once_through_the_other(
    vdir: Path,
) -> None:
    a, b = vdir / "a", vdir / "b"
    a.write_bytes(b"x" * 1000)
    os.chmod(a, 0o644)
    os.link(a, b)
    with Fds() as fds:
        fb = fds.open(b, os.O_RDONLY)
        assert stat.S_IMODE(os.fstat(fb).st_mode) == 0o644
        os.chmod(a, 0o640)
        for st in (os.fstat(fb), os.stat(b)):
            assert stat.S_IMODE(st.st_mode) == 0o640
            assert st.st_ctime_ns == os.stat(a).st_ctime_ns
        os.utime(a, ns=(1_000_000_123, 2_000_000_456))
        for st in (os.fstat(fb), os.stat(b)):
            assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        fa = fds.open(a, os.O_RDWR)
        os.fchmod(fa, 0o600)  # through an fd this time
        os.utime(fa, ns=(3_000_000_000, 4_000_000_789))
        os.fchown(fa, 1234, 5678)
        for st in (os.fstat(fb), os.stat(b)):
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_mtime_ns == 4_000_000_789
            assert (st.st_uid, st.st_gid) == (1234, 5678)
        # a write through a, after an explicit mtime, moves b's mtime on again
        os.pwrite(fa, b"y", 0)
        assert os.fstat(fb).st_mtime_ns == os.fstat(fa).st_mtime_ns > 4_000_000_789
        assert os.pread(fb, 1, 0) == b"y"


def test_link_count_is_seen_through_every_name_and_open_fd(vdir: Path) -> None:
    a, b, c, d = (vdir / n for n in "abcd")
    a.write_bytes(b"linked")
    with Fds() as fds:
        fa = fds.open(a, os.O_RDONLY)
        assert os.fstat(fa).st_nlink == 1
        os.link(a, b)
        assert os.fstat(fa).st_nlink == os.stat(a).st_nlink == os.stat(b).st_nlink == 2
        fb = fds.open(b, os.O_RDONLY)
        os.link(b, c)
        for n in (fa, fb):
            assert os.fstat(n).st_nlink == 3
        assert os.stat(a).st_nlink == os.stat(c).st_nlink == 3
        os.unlink(b)
        for n in (fa, fb):
            assert os.fstat(n).st_nlink == 2
        assert os.stat(a).st_nlink == os.stat(c).st_nlink == 2
        os.rename(c, d)
        assert os.stat(d).st_nlink == os.fstat(fa).st_nlink == 2
        os.unlink(a)
        assert os.fstat(fa).st_nlink == os.fstat(fb).st_nlink == os.stat(d).st_nlink == 1
        assert d.read_bytes() == b"linked"
        assert sorted(os.listdir(vdir)) == ["d"]


def test_changes_through_an_unlinked_name_reach_the_remaining_name(vdir: Path) -> None:
    a, b = vdir / "a", vdir / "b"
    data = bytearray(os.urandom(BLOCK + 100))
    a.write_bytes(data)
    os.link(a, b)
    with Fds() as fds:
        fa = fds.open(a, os.O_RDWR)
        fb = fds.open(b, os.O_RDONLY)
        assert os.pread(fb, len(data), 0) == data
        os.unlink(a)
        assert os.stat(b).st_nlink == os.fstat(fa).st_nlink == 1
        os.pwrite(fa, b"after unlink", BLOCK)
        data[BLOCK : BLOCK + 12] = b"after unlink"
        os.pwrite(fa, b"grown", len(data))
        data += b"grown"
        assert os.stat(b).st_size == os.fstat(fb).st_size == len(data)
        assert os.pread(fb, len(data) + 10, 0) == data
        os.fchmod(fa, 0o604)
        assert stat.S_IMODE(os.stat(b).st_mode) == 0o604
        os.ftruncate(fa, 10)
        assert os.fstat(fb).st_size == 10
        assert b.read_bytes() == data[:10]
        os.close(fds.fds.pop(0))  # the last fd of the unlinked name goes away
        assert b.read_bytes() == data[:10]
        assert os.stat(b).st_nlink == 1


# ---------------------------------------------------------------------- mmap
def test_shared_mapping_stores_are_seen_by_read_on_other_fds_and_names(vdir: Path) -> None:
    a, b = vdir / "a", vdir / "b"
    data = bytearray(os.urandom(2 * BLOCK + 300))
    a.write_bytes(data)
    os.link(a, b)
    with Fds() as fds:
        f1 = fds.open(a, os.O_RDWR)
        f2 = fds.open(a, os.O_RDONLY)
        f3 = fds.open(b, os.O_RDONLY)
        assert os.pread(f2, len(data), 0) == os.pread(f3, len(data), 0) == data
        with mmap.mmap(f1, 0) as m:  # MAP_SHARED, read-write
            m[10:15] = b"hello"
            m[BLOCK + 7 : BLOCK + 12] = b"world"
            data[10:15] = b"hello"
            data[BLOCK + 7 : BLOCK + 12] = b"world"
            # the same page cache: no msync needed on a local filesystem
            assert os.pread(f2, len(data), 0) == data
            assert a.read_bytes() == data
            # one kernel inode per vault inode: the other name shares those pages
            assert os.pread(f3, len(data), 0) == data
            assert b.read_bytes() == data
            m.flush()  # msync(MS_SYNC)
        assert os.pread(f3, len(data), 0) == data
        assert os.stat(b).st_size == len(data)


def test_msync_puts_mapped_stores_in_the_vault(tmp_path: Path) -> None:
    """msync(MS_SYNC) reaches the daemon as fsync: after it the stores survive the
    daemon being killed (no unmount, no commit of its own) and a fresh mount."""
    require_fuse()
    container = tmp_path / "v.kv"
    mkfs_container(container)
    m = Mount(container, tmp_path / "v.mnt", tmp_path / "v.log")
    m.start()
    try:
        p = m.mountpoint / "mapped"
        data = bytearray(os.urandom(BLOCK + 4096))
        p.write_bytes(data)
        fd = os.open(p, os.O_RDWR)
        try:
            with mmap.mmap(fd, 0) as mm:
                mm[5:13] = b"msync-ed"
                mm[BLOCK + 1 : BLOCK + 9] = b"2nd blk!"
                mm.flush()
                data[5:13] = b"msync-ed"
                data[BLOCK + 1 : BLOCK + 9] = b"2nd blk!"
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean now: re-read from daemon
        finally:
            os.close(fd)
        assert p.read_bytes() == data  # close + reopen
        m.kill_and_detach()
        m.start()
        assert p.read_bytes() == data
    finally:
        if m.proc is not None:
            m.stop()


def test_writes_are_seen_through_an_existing_mapping(vdir: Path) -> None:
    a, b = vdir / "a", vdir / "b"
    data = bytearray(os.urandom(2 * BLOCK))
    a.write_bytes(data)
    os.link(a, b)
    with Fds() as fds:
        f1 = fds.open(a, os.O_RDONLY)
        with mmap.mmap(f1, 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == data  # every page faulted in
            f2 = fds.open(a, os.O_RDWR)
            os.pwrite(f2, b"fd2", 100)
            data[100:103] = b"fd2"
            assert m[100:103] == b"fd2"
            f3 = fds.open(b, os.O_RDWR)
            os.pwrite(f3, b"name-b", BLOCK + 50)
            data[BLOCK + 50 : BLOCK + 56] = b"name-b"
            assert m[BLOCK + 50 : BLOCK + 56] == b"name-b"
            assert m[:] == data


_TRUNCATE_UNDER_MAPPING = r"""
import mmap, os, sys
mapped, other, page = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(mapped, os.O_RDWR)
m = mmap.mmap(fd, 0)
before = m[:]
os.truncate(other, 100)
print(os.fstat(fd).st_size, m[:100] == before[:100], m[100:page] == bytes(page - 100), flush=True)
m[3 * page + 1]
print("read past the new end without SIGBUS", flush=True)
"""


@pytest.mark.parametrize("through", ["same name", "other name"])
def test_truncate_shrinking_under_a_mapping_matches_the_kernel(
    vdir: Path, rdir: Path, through: str
) -> None:
    """The tail of the last page reads as zeros, a page past the new end raises SIGBUS,
    as on the host filesystem."""
    outcomes = []
    for d in (vdir, rdir):
        a = d / "a"
        a.write_bytes(os.urandom(4 * PAGE))
        other = a
        if through == "other name":
            other = d / "b"
            os.link(a, other)
        r = subprocess.run(
            [sys.executable, "-c", _TRUNCATE_UNDER_MAPPING, str(a), str(other), str(PAGE)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        outcomes.append((r.returncode, r.stdout))
    vault, ref = outcomes
    assert ref == (-signal.SIGBUS, "100 True True\n")  # what the running kernel does
    assert vault == ref


# ---------------------------------------------------------------------- O_APPEND, st_size
@pytest.mark.parametrize("names", ["one name", "two names"])
def test_o_append_writes_from_two_fds_interleave_without_loss(vdir: Path, names: str) -> None:
    p = vdir / "log"
    p.write_bytes(b"")
    q = p
    if names == "two names":
        q = vdir / "log2"
        os.link(p, q)
    want = bytearray()
    with Fds() as fds:
        f1 = fds.open(p, os.O_WRONLY | os.O_APPEND)
        f2 = fds.open(q, os.O_WRONLY | os.O_APPEND)
        for i in range(60):  # alternating, with lengths that straddle pages and blocks
            rec = bytes([65 + i % 26]) * (1 + (i * 2311) % 9000)
            os.write(f1 if i % 2 else f2, rec)
            want += rec
            assert os.stat(p).st_size == os.fstat(f2).st_size == len(want)
        assert p.read_bytes() == want

        def appender(fd: int, tag: bytes) -> None:
            for i in range(150):
                os.write(fd, tag + b"%05d" % i + b"." * 93 + b"\n")

        threads = [
            threading.Thread(target=appender, args=(f, t)) for f, t in ((f1, b"X"), (f2, b"Y"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    body = p.read_bytes()
    assert body[: len(want)] == want
    lines = body[len(want) :].split(b"\n")
    assert lines.pop() == b""
    assert len(lines) == 300
    for tag in (b"X", b"Y"):
        mine = [ln for ln in lines if ln[:1] == tag]
        assert mine == [tag + b"%05d" % i + b"." * 93 for i in range(150)]
    assert os.stat(q).st_size == len(body)


def test_size_after_write_without_fsync_is_seen_by_stat(vdir: Path) -> None:
    p = vdir / "grow"
    with Fds() as fds:
        fd = fds.open(p, os.O_CREAT | os.O_WRONLY)
        os.link(p, vdir / "alias")
        os.write(fd, b"a")
        assert os.stat(p).st_size == 1
        os.pwrite(fd, b"b", BLOCK * 3 + 5)
        assert os.stat(p).st_size == os.stat(vdir / "alias").st_size == BLOCK * 3 + 6
        fr = fds.open(p, os.O_RDONLY)
        assert os.fstat(fr).st_size == BLOCK * 3 + 6
        os.write(fd, b"c" * 5000)  # at the fd's offset (1), inside the file: no growth
        assert os.stat(p).st_size == BLOCK * 3 + 6
        assert {e.name: e.stat().st_size for e in os.scandir(vdir)} == {
            "grow": BLOCK * 3 + 6,
            "alias": BLOCK * 3 + 6,
        }
        assert os.pread(fr, 10, BLOCK * 3) == bytes(5) + b"b"
    assert os.stat(p).st_size == BLOCK * 3 + 6


# ---------------------------------------------------------------------- suid / sgid
def as_user(uid: int, gid: int, fn: Callable[[], object]) -> int:
    """Run `fn` as uid/gid (no supplementary groups, no capabilities) in a forked child;
    0 or the errno it failed with. Root runs it here, with its capabilities."""
    if uid == 0:
        fn()
        return 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fn()
        except OSError as e:
            code = e.errno or 1
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _write(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.write(fd, b"W")
    finally:
        os.close(fd)


def _ftruncate(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.ftruncate(fd, 3)
    finally:
        os.close(fd)


def _o_trunc(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


OPS: dict[str, Callable[[Path], None]] = {
    "write": _write,
    "write via link": lambda p: _write(p.with_name(p.name + ".link")),
    "ftruncate": _ftruncate,
    "open O_TRUNC": _o_trunc,
    "truncate": lambda p: os.truncate(p, 3),
    "chown": lambda p: os.chown(p, 1234, -1),
    "chgrp": lambda p: os.chown(p, -1, 4321),
    "chgrp to own group": lambda p: os.chown(p, -1, NOBODY),
    "mkdir inside": lambda p: os.mkdir(p / "sub"),
}

# (case id, is a directory, owner uid, owner gid, mode, operation, actor uid,
#  bits that must be gone afterwards, bits that must still be there); the absolute
#  expectations are the ones Linux is not subtle about; every case is also compared with
#  the host filesystem.
SUID, SGID = stat.S_ISUID, stat.S_ISGID
CASES: list[tuple[str, bool, int, int, int, str, int, int, int]] = [
    ("write by non-root clears suid and sgid+gx", False, NOBODY, NOBODY, 0o6775, "write", NOBODY,
     SUID | SGID, 0),
    ("write through another name clears them too", False, NOBODY, NOBODY, 0o6775,
     "write via link", NOBODY, SUID | SGID, 0),
    ("write by non-root keeps sgid without gx (writer in group)", False, NOBODY, NOBODY, 0o6764,
     "write", NOBODY, SUID, SGID),
    # Since Linux 6.2 the VFS drops sgid without group-exec when the writer is neither in
    # the file's group nor has CAP_FSETID (setattr_should_drop_sgid); fs/fuse/dir.c without
    # KILLPRIV and the KILLPRIV_V2 spec only drop it with group-exec: the filesystem must.
    ("write by non-root, sgid without gx, writer not in group", False, 0, 0, 0o2666, "write",
     NOBODY, 0, 0),
    ("write by non-root to a world-writable suid file", False, 0, 0, 0o4666, "write", NOBODY,
     SUID, 0),
    ("ftruncate by non-root clears them", False, NOBODY, NOBODY, 0o6775, "ftruncate", NOBODY,
     SUID | SGID, 0),
    ("ftruncate by non-root, sgid without gx, writer not in group", False, 0, 0, 0o2666,
     "ftruncate", NOBODY, 0, 0),
    ("open O_TRUNC by non-root clears them", False, NOBODY, NOBODY, 0o6775, "open O_TRUNC",
     NOBODY, SUID | SGID, 0),
    ("truncate by non-root clears them", False, NOBODY, NOBODY, 0o6775, "truncate", NOBODY,
     SUID | SGID, 0),
    ("write by root keeps them", False, NOBODY, NOBODY, 0o6775, "write", 0, 0, SUID | SGID),
    ("ftruncate by root keeps them", False, NOBODY, NOBODY, 0o6775, "ftruncate", 0, 0,
     SUID | SGID),
    ("open O_TRUNC by root keeps them", False, NOBODY, NOBODY, 0o6775, "open O_TRUNC", 0, 0,
     SUID | SGID),
    ("chown by root clears suid and sgid+gx", False, NOBODY, NOBODY, 0o6775, "chown", 0,
     SUID | SGID, 0),
    ("chown by root clears suid, sgid without gx", False, NOBODY, NOBODY, 0o6764, "chown", 0,
     SUID, 0),
    ("chgrp by root clears suid and sgid+gx", False, NOBODY, NOBODY, 0o6775, "chgrp", 0,
     SUID | SGID, 0),
    ("chgrp by the non-root owner clears them", False, NOBODY, 0, 0o6775, "chgrp to own group",
     NOBODY, SUID | SGID, 0),
    ("chown of a sgid directory keeps sgid", True, NOBODY, NOBODY, 0o2775, "chown", 0, 0, SGID),
    ("mkdir by non-root in a sgid directory keeps it", True, NOBODY, NOBODY, 0o2775,
     "mkdir inside", NOBODY, 0, SGID),
]


@pytest.mark.parametrize(
    ("is_dir", "uid", "gid", "mode", "op", "actor", "gone", "kept"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_suid_and_sgid_clearing_matches_the_kernel(
    vdir: Path, rdir: Path, is_dir: bool, uid: int, gid: int, mode: int, op: str, actor: int,
    gone: int, kept: int,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to act as another user and to chown)")
    results = []
    for d in (vdir, rdir):
        p = d / "target"
        if is_dir:
            p.mkdir()
        else:
            p.write_bytes(b"contents")
            os.link(p, p.with_name(p.name + ".link"))
        os.chown(p, uid, gid)
        os.chmod(p, mode)  # after chown, which clears the bits
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
        err = as_user(actor, actor, functools.partial(OPS[op], p))
        st = os.stat(p)
        link_mode = None if is_dir else os.stat(p.with_name(p.name + ".link")).st_mode
        results.append((err, stat.S_IMODE(st.st_mode), link_mode == st.st_mode or is_dir))
    vault, ref = results
    assert ref[0] == 0, f"the operation itself failed on the host filesystem: errno {ref[0]}"
    assert ref[1] & gone == 0 and ref[1] & kept == kept  # the kernel agrees with the table
    assert vault == ref, f"vault mode {vault[1]:o}, kernel {ref[1]:o}"
