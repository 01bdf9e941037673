"""bench/nullfs.py, the no-op ceiling printed beside the benchmark's figures: its rows are
only a ceiling if the programs of the workload really run on it (a failing create or an
empty listing would be "fast"), so its namespace must behave as a filesystem's does while
every file's contents are discarded."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_fixtures import force_unmount

pytestmark = pytest.mark.fuse

NULLFS = Path(__file__).resolve().parent.parent / "bench" / "nullfs.py"


@pytest.fixture(name="mnt")
def mounted_nullfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(NULLFS), str(mnt)])
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        assert proc.poll() is None and time.monotonic() < deadline, "nullfs never mounted"
        time.sleep(0.02)
    try:
        yield mnt
    finally:
        force_unmount(mnt)
        proc.wait(timeout=20)


def test_names_sizes_and_modes_behave_and_the_daemon_keeps_no_contents(mnt: Path) -> None:
    (mnt / "d" / "e").mkdir(parents=True)
    f = mnt / "d" / "f"
    f.write_bytes(b"x" * 10_000)
    f.chmod(0o640)
    st = f.stat()
    assert (st.st_size, st.st_mode & 0o7777, st.st_nlink) == (10_000, 0o640, 1)
    assert f.read_bytes() == b"x" * 10_000  # the kernel's page cache
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)  # past it, to the daemon
    try:
        assert os.read(fd, 20_000) == bytes(10_000)
    finally:
        os.close(fd)
    assert sorted(os.listdir(mnt / "d")) == ["e", "f"]
    assert (mnt / "d").stat().st_nlink == 3

    os.link(f, mnt / "d" / "g")
    assert f.stat().st_nlink == 2
    (mnt / "h").write_bytes(b"")
    os.rename(mnt / "d" / "g", mnt / "h")  # over an existing file
    assert (mnt / "h").stat().st_size == 10_000
    (mnt / "s").symlink_to("d/f")
    assert os.readlink(mnt / "s") == "d/f"

    with pytest.raises(OSError) as not_empty:
        (mnt / "d").rmdir()
    assert not_empty.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        (mnt / "d" / "e").mkdir()

    with open(mnt / "h", "rb") as held:
        os.unlink(mnt / "h")
        os.unlink(f)
        assert os.fstat(held.fileno()).st_size == 10_000  # lives on until closed
        assert not f.exists()
    (mnt / "d" / "e").rmdir()
    (mnt / "d").rmdir()
    assert sorted(os.listdir(mnt)) == ["s"]


def test_tar_extracts_a_tree_that_lists_as_it_was_and_rm_rf_empties_it(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(120):  # more entries than one readdir reply holds
        p = src / f"pkg{i // 40}" / f"file{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(100 + i))
        p.chmod(0o755 if i % 7 == 0 else 0o644)
    ball = tmp_path / "t.tar"
    with tarfile.open(ball, "w") as tar:
        tar.add(src, arcname="tree")
    subprocess.run(["tar", "-xf", str(ball), "-C", str(mnt)], check=True)

    def listing(root: Path) -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size if p.is_file() else 0)
            for p in root.rglob("*")
        }

    assert listing(mnt / "tree") == listing(src)
    subprocess.run(["rm", "-rf", str(mnt / "tree")], check=True)
    assert os.listdir(mnt) == []
