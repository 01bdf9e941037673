"""Persistence, confidentiality of names/contents, and integrity errors through FUSE."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from fs_fixtures import (
    Mount,
    close_store,
    mkfs_container,
    mounted,
    new_store,
    open_store,
)

from kryptvault.fs import Filesystem

pytestmark = pytest.mark.fuse

SECRET_NAME = "kryptvault-distinctive-name-7Qx9"
SECRET_TEXT = b"distinctive plaintext content 3fJk2 "


def test_persistence_and_no_plaintext(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        mp = m.mountpoint
        (mp / SECRET_NAME).mkdir()
        (mp / SECRET_NAME / "notes.txt").write_bytes(SECRET_TEXT * 2000)
        (mp / "small").write_bytes(SECRET_TEXT)
        os.symlink(SECRET_NAME + "-link-target", mp / "ln")
        os.setxattr(mp / "small", "user." + SECRET_NAME, SECRET_TEXT)
        os.chmod(mp / "small", 0o640)
        os.utime(mp / "small", ns=(123_456_789_012, 987_654_321_098))
        big = os.urandom(5 << 20)
        (mp / "big").write_bytes(big)
    # not durable only by luck: the daemon committed at unmount (destroy)
    with mounted(tmp_path, fresh=False) as m:
        mp = m.mountpoint
        assert (mp / SECRET_NAME / "notes.txt").read_bytes() == SECRET_TEXT * 2000
        assert (mp / "small").read_bytes() == SECRET_TEXT
        assert os.readlink(mp / "ln") == SECRET_NAME + "-link-target"
        assert os.getxattr(mp / "small", "user." + SECRET_NAME) == SECRET_TEXT
        st = os.stat(mp / "small")
        assert st.st_mode & 0o777 == 0o640 and st.st_mtime_ns == 987_654_321_098
        assert hashlib.sha256((mp / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
    raw = (tmp_path / "vault.kv").read_bytes()
    for needle in (
        SECRET_NAME.encode(),
        SECRET_TEXT,
        SECRET_TEXT[:16],
        b"notes.txt",
        SECRET_NAME.encode("utf-16-le"),
        big[1000:1032],
    ):
        assert needle not in raw, needle


def _find_new_run(before: bytes, after: bytes, data_offset: int = 64 * 1024) -> tuple[int, int]:
    """The longest run of 4 KiB units in the data area that changed between two images."""
    unit = 4096
    best = (0, 0)
    start = None
    n = (max(len(before), len(after)) + unit - 1) // unit
    for u in range(data_offset // unit, n + 1):
        a = before[u * unit : (u + 1) * unit]
        b = after[u * unit : (u + 1) * unit]
        changed = u < n and a != b and b.strip(b"\0") != b""
        if changed and start is None:
            start = u
        elif not changed and start is not None:
            if u - start > best[1] - best[0]:
                best = (start, u)
            start = None
    return best[0] * unit, best[1] * unit


def test_corrupt_block_gives_eio_for_that_file_only(tmp_path: Path) -> None:
    container = tmp_path / "vault.kv"
    store = new_store(container)
    fs = Filesystem.mkfs(store, 0, 0)
    for name, data in ((b"other", b"fine " * 50_000), (b"also-fine", b"ok" * 10)):
        st, fh = fs.create(1, name, 0o644, os.O_WRONLY, 0, 0)
        fs.write(fh, 0, data)
        fs.release(fh)
    fs.commit()
    before = container.read_bytes()
    victim = os.urandom(1 << 20)
    st, fh = fs.create(1, b"victim", 0o644, os.O_WRONLY, 0, 0)
    fs.write(fh, 0, victim)
    fs.release(fh)
    fs.commit()
    close_store(store)
    after = container.read_bytes()
    lo, hi = _find_new_run(before, after)
    assert hi - lo >= 1 << 20, (lo, hi)
    with open(container, "r+b") as f:
        pos = (lo + hi) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))
    m = Mount(container, tmp_path / "mnt", tmp_path / "mount.log")
    m.start()
    try:
        mp = m.mountpoint
        assert os.stat(mp / "victim").st_size == 1 << 20
        with pytest.raises(OSError) as e:
            (mp / "victim").read_bytes()
        assert e.value.errno == errno.EIO
        # the undamaged parts of the victim still read
        with open(mp / "victim", "rb") as f:
            assert f.read(4096) == victim[:4096]
        assert (mp / "other").read_bytes() == b"fine " * 50_000
        assert (mp / "also-fine").read_bytes() == b"ok" * 10
        assert sorted(os.listdir(mp)) == ["also-fine", "other", "victim"]
    finally:
        assert m.stop() == 0
    log = m.log()
    # The log names the damaged inode (fsck maps it to a path) but never a plaintext name.
    assert f"I/O error on inode {st.ino}" in log, log[-2000:]
    assert "victim" not in log
    store = open_store(container)
    damage = store.verify()
    assert damage and all(d.oid == st.ino for d in damage)
    close_store(store)


def test_mkfs_twice_refused(tmp_path: Path) -> None:
    container = tmp_path / "c.kv"
    mkfs_container(container)
    store = open_store(container)
    with pytest.raises(OSError):
        Filesystem.mkfs(store, 0, 0)
    close_store(store)
