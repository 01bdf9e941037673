"""Fixtures and helpers for the filesystem/FUSE tests (imported by tests/test_fs_*.py).

* `MemoryStore`: an in-memory stand-in with the ObjectStore API, for fast fs-layer tests.
* `new_store()/open_store()`: a real ObjectStore in a container file, with fixed test keys.
* `Mount`: the vault served by a child process (`python -c`, keys over stdin, never argv
  or env), ready when the child says so, unmounted with `fusermount3 -u`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from needs import have_fuse as have_fuse  # re-exported: older tests import it from here
from needs import require_fuse

TESTS_DIR = Path(__file__).resolve().parent
ROOT_DIR = TESTS_DIR.parent
PYTHON = sys.executable

TEST_UUID = uuid.UUID("6b727970-7476-4175-8c74-746573743031")
TEST_DATA_KEY = bytes(range(32))
TEST_META_KEY = bytes(range(100, 132))


# Skips without FUSE, fails under CI=true (tests/needs.py, tests/conftest.py).
needs_fuse = pytest.mark.fuse


# ---------------------------------------------------------------------- in-memory store
@dataclass
class MemStats:
    block_size: int
    total_units: int
    free_units: int
    used_units: int
    objects: int


class MemoryStore:
    """The ObjectStore API over dicts: no crypto, no durability. For fs-layer unit tests."""

    ATTR_SIZE = 128

    def __init__(self, total_units: int = 1 << 20) -> None:
        self.objects: dict[int, list[Any]] = {}
        self.metadata: set[int] = set()
        self.committed = 0
        self._dirty = 0
        self.total_units = total_units
        self.generation = 0

    def allocate_oid(self) -> int:
        oid = 1
        while oid in self.objects:
            oid += 1
        self.objects[oid] = [bytes(128), bytearray(), bytearray()]
        self._dirty += 1
        return oid

    def free_oid(self, oid: int) -> None:
        del self.objects[oid]
        self._dirty += 1

    def oid_in_use(self, oid: int) -> bool:
        return oid in self.objects

    def iter_oids(self) -> Iterator[int]:
        return iter(sorted(self.objects))

    def get_attrs(self, oid: int) -> bytes:
        return bytes(self.objects[oid][0])

    def set_attrs(self, oid: int, attrs: bytes) -> None:
        assert len(attrs) == 128
        self.objects[oid][0] = bytes(attrs)
        self._dirty += 1

    def read(self, oid: int, stream: int, offset: int, size: int) -> bytes:
        return bytes(self.objects[oid][1 + stream][offset : offset + size])

    def write(self, oid: int, stream: int, offset: int, data: bytes) -> None:
        buf = self.objects[oid][1 + stream]
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        self._dirty += len(data)

    def truncate(self, oid: int, stream: int, size: int) -> None:
        buf = self.objects[oid][1 + stream]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        self._dirty += 1

    def punch(self, oid: int, stream: int, offset: int, length: int) -> None:
        buf = self.objects[oid][1 + stream]
        end = min(offset + length, len(buf))
        if offset < end:
            buf[offset:end] = bytes(end - offset)
            self._dirty += 1

    def read_into(self, oid: int, stream: int, offset: int, out: memoryview) -> int:
        data = self.read(oid, stream, offset, len(out))
        out[: len(data)] = data
        return len(data)

    def stream_size(self, oid: int, stream: int) -> int:
        return len(self.objects[oid][1 + stream])

    def stored_bytes(self, oid: int, stream: int) -> int:
        return -(-len(self.objects[oid][1 + stream]) // 4096) * 4096  # no holes here

    def size_and_stored(self, oid: int) -> tuple[int, int]:
        return self.stream_size(oid, 0), self.stored_bytes(oid, 0) + self.stored_bytes(oid, 1)

    def stat_object(self, oid: int) -> tuple[bytes, int, int] | None:
        if not self.oid_in_use(oid):
            return None
        return (self.get_attrs(oid), *self.size_and_stored(oid))

    def advise_directory_readahead(self) -> int:
        return 0  # directories are in memory: nothing to read ahead

    def seal_data(self, oid: int) -> None:
        pass  # nothing is encrypted or buffered here: a closed file's data is where it stays

    def mark_metadata(self, oid: int) -> None:
        self.metadata.add(oid)  # one copy of everything here: nothing else to do

    def is_metadata(self, oid: int) -> bool:
        return oid in self.metadata

    def commit(self) -> int:
        self.committed += 1
        self.generation += 1
        self._dirty = 0
        return self.generation

    def dirty_bytes(self) -> int:
        return self._dirty

    def statfs(self) -> MemStats:
        used = sum((len(o[1]) + len(o[2]) + 4095) // 4096 for o in self.objects.values())
        return MemStats(4096, self.total_units, self.total_units - used, used, len(self.objects))

    # No durability and no size limit here: never read-only, never short of room.
    read_only = False
    save_problem: str | None = None

    def check_room(self, data_bytes: int = 0, *, pending_entries: int = 0, freeing: bool = False) -> bool:
        return True

    def room(self, *, freeing: bool = False) -> int:
        return self.total_units * 4096

    def commit_need(self, pending_entries: int = 0) -> int:
        return 0


# ---------------------------------------------------------------------- real store
def _keys() -> tuple[Any, Any]:
    from kryptvault.crypto.secret import Secret

    return Secret.from_bytes(TEST_DATA_KEY), Secret.from_bytes(TEST_META_KEY)


_STORE_FDS: dict[int, int] = {}


def new_store(path: str | os.PathLike[str]) -> Any:
    """A new ObjectStore in `path` with the test keys; release it with close_store()."""
    from kryptvault.container.layout import Layout
    from kryptvault.container.store import ObjectStore

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    data_key, meta_key = _keys()
    store = ObjectStore.create(fd, Layout(), TEST_UUID, data_key, meta_key)
    _STORE_FDS[id(store)] = fd
    return store


def open_store(path: str | os.PathLike[str]) -> Any:
    from kryptvault.container.layout import Layout
    from kryptvault.container.store import ObjectStore

    fd = os.open(path, os.O_RDWR)
    data_key, meta_key = _keys()
    store = ObjectStore.open(fd, Layout(), TEST_UUID, data_key, meta_key)
    _STORE_FDS[id(store)] = fd
    return store


def close_store(store: Any) -> None:
    """store.close() and close the container fd the store was opened on."""
    store.close()
    fd = _STORE_FDS.pop(id(store), None)
    if fd is not None:
        os.close(fd)


def mkfs_container(path: str | os.PathLike[str]) -> None:
    from kryptvault.fs import Filesystem

    store = new_store(path)
    Filesystem.mkfs(store, os.getuid(), os.getgid())
    close_store(store)


# ---------------------------------------------------------------------- the mount daemon
_CHILD = r"""
import sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
import fs_fixtures
fs_fixtures.child_main()
"""


def child_main() -> None:
    """Entry point of the mount daemon child: argv = container, mountpoint, options."""
    import json
    import logging

    from kryptvault.container.layout import Layout
    from kryptvault.container.store import ObjectStore
    from kryptvault.crypto.secret import Secret
    from kryptvault.fs import Filesystem
    from kryptvault.fuseadapter import serve

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    container, mountpoint, opts_json = sys.argv[1], sys.argv[2], sys.argv[3]
    opts = json.loads(opts_json)
    store_options = opts.pop("store_options", {})
    secret = sys.stdin.buffer.read(64)
    data_key = Secret.from_bytes(secret[:32])
    meta_key = Secret.from_bytes(secret[32:64])
    fd = os.open(container, os.O_RDWR)
    store = ObjectStore.open(fd, Layout(), TEST_UUID, data_key, meta_key, **store_options)
    fs = Filesystem(store, host_dir=os.path.dirname(os.path.abspath(container)))
    ready = os.fdopen(os.dup(1), "w")

    def on_ready() -> None:
        ready.write("ready\n")
        ready.flush()

    profile = os.environ.get("KV_PROFILE")  # a path: cProfile the (single-threaded) daemon
    if profile:
        import cProfile

        opts.setdefault("extra_options", {})["nothreads"] = True
        prof = cProfile.Profile()
        prof.enable()
    serve(fs, mountpoint, fsname=os.path.basename(container), on_ready=on_ready, **opts)
    if profile:
        prof.disable()
        prof.dump_stats(profile)
    store.close()
    ready.write("exited\n")
    ready.flush()


class Mount:
    """A vault container served on `mountpoint` by a child process."""

    def __init__(
        self,
        container: Path,
        mountpoint: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        **opts: Any,
    ) -> None:
        self.container = container
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.env = env
        self.opts = opts
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        import json

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        code = _CHILD.format(tests=str(TESTS_DIR), root=str(ROOT_DIR))
        if os.environ.get("KV_TEST_WRITEBACK") is not None:  # run the suite either way
            self.opts.setdefault("writeback", os.environ["KV_TEST_WRITEBACK"] == "1")
        if os.environ.get("KV_TEST_THREADS") is not None:
            self.opts.setdefault("threads", os.environ["KV_TEST_THREADS"] == "1")
        env = dict(os.environ)
        env.pop("FUSE_LIBRARY_NAME", None)
        if self.env:
            env.update(self.env)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-c", code, str(self.container), str(self.mountpoint), json.dumps(self.opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=logf,
            env=env,
        )
        logf.close()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(TEST_DATA_KEY + TEST_META_KEY)
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            self.proc.wait(5)
            raise RuntimeError(f"mount daemon failed: {line!r}\n{self.log()}")
        while not os.path.ismount(self.mountpoint):
            if time.monotonic() > deadline:
                raise RuntimeError("mount did not appear:\n" + self.log())
            time.sleep(0.01)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        """Unmount with fusermount3 -u (retrying while busy) and return the exit status."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while os.path.ismount(self.mountpoint) and self.proc.poll() is None:
            r = subprocess.run(
                ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, check=False
            )
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot unmount: {r.stderr!r}")
            time.sleep(0.1)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return rc

    def kill_and_detach(self) -> int:
        """For crash tests: make sure the daemon is dead, then remove the dead mount."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        force_unmount(self.mountpoint)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return rc


def force_unmount(mountpoint: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if not os.path.ismount(mountpoint):
            return
        subprocess.run(cmd, capture_output=True, check=False)


@contextlib.contextmanager
def mounted(tmp: Path, name: str = "vault", fresh: bool = True, **opts: Any) -> Iterator[Mount]:
    """Create (if `fresh`) and mount a vault under `tmp`; unmount at the end, exit status 0."""
    container = tmp / f"{name}.kv"
    if fresh:
        mkfs_container(container)
    m = Mount(container, tmp / f"{name}.mnt", tmp / f"{name}.log", **opts)
    m.start()
    ok = False
    try:
        yield m
        ok = True
    finally:
        if m.proc is not None:
            if ok:
                rc = m.stop()
                assert rc == 0, f"mount daemon exited with {rc}:\n{m.log()}"
            else:
                with contextlib.suppress(Exception):
                    m.stop(timeout=10)
                force_unmount(m.mountpoint)


@pytest.fixture(name="vault_mount")
def vault_mount_fixture(tmp_path: Path) -> Iterator[Path]:
    """A freshly made vault mounted at a directory; yields the mountpoint."""
    require_fuse()
    with mounted(tmp_path) as m:
        yield m.mountpoint


@pytest.fixture(scope="module", name="shared_mount")
def shared_mount_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mounted vault for a whole test module (tests use their own subdirectories)."""
    require_fuse()
    with mounted(tmp_path_factory.mktemp("vault")) as m:
        yield m


@pytest.fixture(name="mdir")
def mdir_fixture(shared_mount: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the shared mount, named after the test."""
    d = shared_mount.mountpoint / request.node.name.replace("[", "_").replace("]", "_")
    d.mkdir()
    return d


_libc = None


def libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def renameat2(old: str | os.PathLike[str], new: str | os.PathLike[str], flags: int) -> None:
    """renameat2(2) through libc; raises OSError; skips the test if libc lacks it."""
    import ctypes

    lib = libc()
    if not hasattr(lib, "renameat2"):
        pytest.skip("libc has no renameat2")
    AT_FDCWD = -100
    r = lib.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(new))


def utimensat(path: str | os.PathLike[str], atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with raw (sec, nsec) pairs, so UTIME_NOW/UTIME_OMIT can be passed."""
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    arr = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    r = libc().utimensat(-100, os.fsencode(path), arr, 0)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
