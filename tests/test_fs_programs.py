"""Real programs on a mounted vault: git, tar, rsync, sqlite3, cp -a."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from fs_fixtures import mdir_fixture, shared_mount_fixture  # noqa: F401  (fixtures)
from needs import require_tool

pytestmark = pytest.mark.fuse


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="T",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="T",
        GIT_COMMITTER_EMAIL="t@example.org",
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(cwd or Path.cwd()),
    )
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def make_tree(root: Path, files: int = 2500) -> None:
    """A source-like tree: nested dirs, small files, a symlink, a hard link, modes."""
    for i in range(files):
        d = root / f"pkg{i % 17}" / f"sub{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# module {i}\n" + f"x = {i}\n" * (i % 40))
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    os.symlink("../pkg1/sub1/mod1.py", root / "bin" / "link")
    os.link(root / "bin" / "tool", root / "bin" / "tool-hard")
    (root / "empty-dir").mkdir()
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    os.utime(root / "big.bin", ns=(1_500_000_000_123_456_789, 1_500_000_000_987_654_321))


def diff_r(a: Path, b: Path) -> None:
    r = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_git(mdir: Path, tmp_path: Path) -> None:
    require_tool("git")
    repo = mdir / "repo"
    repo.mkdir()
    run("git", "init", "-q", "-b", "main", cwd=repo)
    for i in range(30):
        (repo / f"f{i}.txt").write_text(f"line {i}\n" * (i + 1))
    (repo / "dir").mkdir()
    (repo / "dir" / "nested.c").write_text("int main(){return 0;}\n")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", "first", cwd=repo)
    (repo / "f3.txt").write_text("changed\n")
    os.rename(repo / "f4.txt", repo / "renamed.txt")
    run("git", "commit", "-q", "-am", "second", cwd=repo)
    run("git", "gc", "-q", cwd=repo)
    assert run("git", "status", "--porcelain", cwd=repo) == "?? renamed.txt\n"
    run("git", "fsck", "--strict", cwd=repo)
    # clone into the mount (from the mount) and from outside into the mount
    run("git", "clone", "-q", str(repo), str(mdir / "clone"), cwd=mdir)
    assert (mdir / "clone" / "f3.txt").read_text() == "changed\n"
    assert run("git", "status", "--porcelain", cwd=mdir / "clone") == ""
    outside = tmp_path / "outside"
    run("git", "clone", "-q", "--bare", str(repo), str(outside), cwd=tmp_path)
    run("git", "clone", "-q", str(outside), str(mdir / "clone2"), cwd=mdir)
    assert run("git", "log", "--oneline", cwd=mdir / "clone2").count("\n") == 2


def test_tar_extract(mdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    tarball = tmp_path / "t.tar"
    run("tar", "--format=posix", "-cf", tarball, "-C", tmp_path, "src")
    run("tar", "-xf", tarball, "-C", mdir)
    diff_r(src, mdir / "src")
    a, b = os.stat(src / "bin" / "tool"), os.stat(mdir / "src" / "bin" / "tool")
    assert a.st_mode == b.st_mode
    assert os.stat(mdir / "src" / "big.bin").st_mtime_ns == 1_500_000_000_987_654_321
    assert os.stat(mdir / "src" / "bin" / "tool-hard").st_ino == b.st_ino
    # and back out again
    out = tmp_path / "back"
    out.mkdir()
    run("tar", "-cf", tmp_path / "back.tar", "-C", mdir, "src")
    run("tar", "-xf", tmp_path / "back.tar", "-C", out)
    diff_r(src, out / "src")
    shutil.rmtree(mdir / "src")
    assert os.listdir(mdir) == []


def test_rsync(mdir: Path, tmp_path: Path) -> None:
    require_tool("rsync")
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, 800)
    run("rsync", "-aH", f"{src}/", f"{mdir / 'dst'}/")
    diff_r(src, mdir / "dst")
    # incremental: change a few files, rsync again, compare
    (src / "pkg1" / "sub1" / "mod1.py").write_text("changed\n")
    os.unlink(src / "pkg2" / "sub2" / "mod2.py")
    out = run("rsync", "-aH", "--delete", "-i", f"{src}/", f"{mdir / 'dst'}/")
    assert "mod1.py" in out and "mod2.py" in out
    diff_r(src, mdir / "dst")
    # and out of the vault
    run("rsync", "-aH", f"{mdir / 'dst'}/", f"{tmp_path / 'back'}/")
    diff_r(src, tmp_path / "back")


def test_sqlite_module(mdir: Path) -> None:
    db = mdir / "test.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    for batch in range(10):
        with con:
            con.executemany(
                "INSERT INTO t (v) VALUES (?)", [(f"row {batch}-{i}" * 3,) for i in range(100)]
            )
    with con:
        con.execute("DELETE FROM t WHERE id % 7 = 0")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = con.execute("SELECT count(*) FROM t").fetchone()[0]
    con.close()
    assert n == 1000 - 1000 // 7
    # WAL mode too (shared memory file via mmap)
    con = sqlite3.connect(mdir / "wal.db")
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute("CREATE TABLE t (x)")
    for i in range(200):
        with con:
            con.execute("INSERT INTO t VALUES (?)", (i,))
    # a temp table forces sqlite's unlinked temp files
    con.execute("CREATE TEMP TABLE tmp AS SELECT * FROM t")
    con.execute("PRAGMA temp_store=FILE")
    assert con.execute("SELECT sum(x) FROM t").fetchone()[0] == sum(range(200))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_sqlite_cli(mdir: Path) -> None:
    require_tool("sqlite3")
    script = "CREATE TABLE t(a, b);\nBEGIN;\n" + "".join(
        f"INSERT INTO t VALUES({i}, '{'v' * (i % 100)}');\n" for i in range(1000)
    ) + "COMMIT;\nVACUUM;\nPRAGMA integrity_check;\nSELECT count(*) FROM t;\n"
    r = subprocess.run(
        ["sqlite3", str(mdir / "cli.db")], input=script, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "1000"]


def test_cp_a(mdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, 300)
    os.setxattr(src / "big.bin", "user.tag", b"value")
    run("cp", "-a", src, mdir / "copy")
    diff_r(src, mdir / "copy")
    assert os.getxattr(mdir / "copy" / "big.bin", "user.tag") == b"value"
    assert os.stat(mdir / "copy" / "big.bin").st_mtime_ns == os.stat(src / "big.bin").st_mtime_ns
    run("cp", "-a", mdir / "copy", tmp_path / "back")
    diff_r(src, tmp_path / "back")
    assert os.getxattr(tmp_path / "back" / "big.bin", "user.tag") == b"value"
