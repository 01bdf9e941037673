"""Model-based test: random operation sequences on the mounted vault and on a plain
directory must give the same results (errno) and leave the same tree behind, including
across unmount + remount."""

from __future__ import annotations

import errno
import os
import stat
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from fs_fixtures import Mount, shared_mount_fixture  # noqa: F401  (fixture)
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{x}/{y}" for x in NAMES for y in NAMES] + ["a/b/c"]
paths = st.sampled_from(PATHS)
data = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 200_000).map(lambda n: bytes([n % 251]) * n),
)
offsets = st.one_of(st.integers(0, 70_000), st.sampled_from([65535, 65536, 131071, 3 << 20]))
modes = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o444, 0o1777, 0o2755])

_seq = count()


def outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return ("ok", fn(*args, **kw))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, e.errno))


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            s = os.lstat(p)
            kind = stat.S_IFMT(s.st_mode)
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("lnk", os.readlink(p), s.st_size)
            elif stat.S_ISDIR(s.st_mode):
                out[rel] = ("dir", stat.S_IMODE(s.st_mode), s.st_nlink)
            else:
                out[rel] = (kind, stat.S_IMODE(s.st_mode), s.st_size, s.st_nlink, p.read_bytes())
    return out


class VaultModel(RuleBasedStateMachine):
    mount: Mount
    plain_base: Path

    def __init__(self) -> None:
        super().__init__()
        n = next(_seq)
        self.roots = [self.mount.mountpoint / f"ex{n}", self.plain_base / f"ex{n}"]
        for r in self.roots:
            r.mkdir()

    def both(self, fn: Any, *rel: str, **kw: Any) -> Any:
        results = [outcome(fn, *[root / r for r in rel], **kw) for root in self.roots]
        vault, plain = results
        assert vault == plain, f"{fn.__name__}{rel}: vault {vault} != plain {plain}"
        event(f"{fn.__name__}: {vault[0] if vault[0] == 'ok' else vault[1]}")
        return vault

    def both_fn(self, fn: Any, *rel: str) -> Any:
        results = [outcome(fn, *[root / r for r in rel]) for root in self.roots]
        assert results[0] == results[1], f"{rel}: vault {results[0]} != plain {results[1]}"
        event(f"{rel and 'op'}: {results[0][0] if results[0][0] == 'ok' else results[0][1]}")
        return results[0]

    def existing(self, kind: str = "any") -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.roots[1]):
            base = Path(dirpath).relative_to(self.roots[1])
            if kind in ("any", "dir"):
                out += [str(base / n) for n in dirnames]
            if kind in ("any", "file"):
                out += [str(base / n) for n in filenames]
        return sorted(out)

    def pick(self, d: st.DataObject, kind: str = "any", new: bool = False) -> str:
        """Mostly an existing path (of `kind`), or with `new` a fresh name in an existing
        directory; sometimes any path of the small universe (errors must match too)."""
        choice = d.draw(st.integers(0, 9))
        if choice < 2:
            return d.draw(paths)
        if new:
            parent = d.draw(st.sampled_from(["", *self.existing("dir")]))
            return str(Path(parent) / d.draw(st.sampled_from(NAMES)))
        pool = self.existing(kind)
        return d.draw(st.sampled_from(pool)) if pool else d.draw(paths)

    # ------------------------------------------------------------------ rules
    @rule(dd=st.data(), d=data)
    def create(self, dd: st.DataObject, d: bytes) -> None:
        p = self.pick(dd, new=dd.draw(st.booleans()))
        def f(path: Path) -> None:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                os.write(fd, d)
            finally:
                os.close(fd)

        self.both_fn(f, p)

    @rule(dd=st.data(), off=offsets, d=data)
    def write_at(self, dd: st.DataObject, off: int, d: bytes) -> None:
        p = self.pick(dd, "file")
        def f(path: Path) -> int:
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, d, off)
            finally:
                os.close(fd)

        self.both_fn(f, p)

    @rule(dd=st.data(), d=data)
    def append(self, dd: st.DataObject, d: bytes) -> None:
        p = self.pick(dd, "file")
        def f(path: Path) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, d)
            finally:
                os.close(fd)

        self.both_fn(f, p)

    @rule(dd=st.data(), size=st.one_of(st.integers(0, 150_000), st.just(5 << 20)))
    def truncate(self, dd: st.DataObject, size: int) -> None:
        p = self.pick(dd, "file")
        self.both(os.truncate, p, length=size)

    @rule(dd=st.data())
    def rename(self, dd: st.DataObject) -> None:
        src = self.pick(dd)
        dst = self.pick(dd, new=dd.draw(st.booleans()))
        self.both(os.rename, src, dst)

    @rule(dd=st.data())
    def link(self, dd: st.DataObject) -> None:
        src = self.pick(dd, "file")
        dst = self.pick(dd, new=True)
        self.both(os.link, src, dst)

    @rule(dd=st.data())
    def unlink(self, dd: st.DataObject) -> None:
        p = self.pick(dd, "file")
        self.both(os.unlink, p)

    @rule(dd=st.data())
    def mkdir(self, dd: st.DataObject) -> None:
        p = self.pick(dd, new=True)
        self.both(os.mkdir, p)

    @rule(dd=st.data())
    def rmdir(self, dd: st.DataObject) -> None:
        p = self.pick(dd, "dir")
        self.both(os.rmdir, p)

    # Targets never leave the example's tree: writes through a symlink follow it (as root!).
    @rule(dest=st.sampled_from(["a", "b", "c/a", "/nonexistent-kv-test-dir/x", "x" * 300]),
          dd=st.data())
    def symlink(self, dest: str, dd: st.DataObject) -> None:
        p = self.pick(dd, new=True)
        def f(path: Path) -> None:
            os.symlink(dest, path)

        self.both_fn(f, p)

    @rule(dd=st.data(), m=modes)
    def chmod(self, dd: st.DataObject, m: int) -> None:
        p = self.pick(dd)
        self.both(os.chmod, p, mode=m)

    @rule(dd=st.data())
    def fsync(self, dd: st.DataObject) -> None:
        p = self.pick(dd)
        def f(path: Path) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self.both_fn(f, p)

    @rule(dd=st.data(), d=data)
    def unlink_while_open(self, dd: st.DataObject, d: bytes) -> None:
        p = self.pick(dd, "file")
        def f(path: Path) -> tuple[int, int, bytes]:
            fd = os.open(path, os.O_RDWR)
            try:
                os.unlink(path)
                os.pwrite(fd, d, 3)
                st_ = os.fstat(fd)
                return st_.st_nlink, st_.st_size, os.pread(fd, 1 << 20, 0)
            finally:
                os.close(fd)

        self.both_fn(f, p)

    @rule(dd=st.data())
    def read(self, dd: st.DataObject) -> None:
        p = self.pick(dd, "file")
        self.both_fn(lambda path: path.read_bytes(), p)

    @rule()
    def remount(self) -> None:
        rc = self.mount.stop()
        assert rc == 0, self.mount.log()
        self.mount.start()

    # ------------------------------------------------------------------ invariant
    @invariant()
    def same_tree(self) -> None:
        vault, plain = (snapshot(r) for r in self.roots)
        event(f"tree size {len(vault)}")
        if os.environ.get("KV_MODEL_DEBUG"):
            print("TREE", len(vault), sorted((k, v[:2]) for k, v in vault.items()))
        assert vault.keys() == plain.keys()
        for k in vault:
            assert vault[k] == plain[k], (k, vault[k][:4], plain[k][:4])


def test_model_vs_plain_directory(shared_mount: Mount, tmp_path: Path) -> None:
    class Machine(VaultModel):
        mount = shared_mount
        plain_base = tmp_path

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=int(os.environ.get("KV_MODEL_EXAMPLES", "25")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
