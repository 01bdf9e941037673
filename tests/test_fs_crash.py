"""Crash consistency through the filesystem: the mount daemon dies after N container
writes (KRYPTVAULT_TEST_CRASH_AFTER_WRITES, honoured by the ObjectStore) in the middle of
a mixed workload; the reopened vault must authenticate, keep everything fsync-ed, and
hold no content that was never written."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from fs_fixtures import Mount, close_store, mkfs_container, open_store

from kryptvault.fs import Filesystem, FsError

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

CRASH_ENV = "KRYPTVAULT_TEST_CRASH_AFTER_WRITES"
FILES = [f"d{i % 3}/f{i}" for i in range(12)]


def content(path: str, version: int) -> bytes:
    size = (version * 7919 + len(path) * 131) % 300_000
    seed = hashlib.sha256(f"{path}:{version}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def run_workload(mp: Path, journal: Path, seed: int) -> None:
    """Mixed workload; appends JSON records to `journal` (outside the mount):
    {"w": path, "v": version} before a write, {"s": path, "v": version} after its fsync,
    {"r": dst, "v": version} after an fsync-ed rename (tmp file + rename + fsync dir)."""
    rng = random.Random(seed)
    versions: dict[str, int] = {}
    with open(journal, "a") as j:

        def log(rec: dict[str, object]) -> None:
            j.write(json.dumps(rec) + "\n")
            j.flush()
            os.fsync(j.fileno())

        for d in ("d0", "d1", "d2"):
            (mp / d).mkdir(exist_ok=True)
        for _step in range(400):
            path = rng.choice(FILES)
            v = versions.get(path, 0) + 1
            versions[path] = v
            data = content(path, v)
            op = rng.random()
            if op < 0.25:  # atomic replace: tmp + fsync + rename + fsync(dir)
                tmp = mp / (path + ".tmp")
                log({"w": path, "v": v, "tmp": True})
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, mp / path)
                dfd = os.open(mp / os.path.dirname(path), os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
                log({"r": path, "v": v})
            else:
                log({"w": path, "v": v})
                with open(mp / path, "wb") as f:
                    f.write(data)
                    if op < 0.6:
                        f.flush()
                        os.fsync(f.fileno())
                        log({"s": path, "v": v})
            if rng.random() < 0.05:
                victim = rng.choice(FILES)
                try:
                    os.unlink(mp / victim)
                    log({"u": victim})
                except FileNotFoundError:
                    pass


def check(container: Path, journal: Path) -> int:
    store = open_store(container)
    assert store.open_damage == []
    assert store.verify() == []
    fs = Filesystem(store)
    written: dict[str, set[int]] = {}
    durable: dict[str, int | None] = {}  # path -> version that must be there (None: absent)
    # An atomic replace whose directory fsync never returned may or may not have been
    # committed (the crash can fall after its commit record, before the fsync returned).
    renaming: dict[str, int] = {}
    recs = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    for rec in recs:
        if "w" in rec:
            written.setdefault(rec["w"], set()).add(rec["v"])
            if rec.get("tmp"):
                renaming[rec["w"]] = rec["v"]
            else:
                durable.pop(rec["w"], None)  # being rewritten: old durable state no longer pinned
        elif "s" in rec or "r" in rec:
            p = rec.get("s") or rec.get("r")
            durable[p] = rec["v"]
            renaming.pop(p, None)
        elif "u" in rec:
            durable.pop(rec["u"], None)
    checked = 0
    for path in FILES:
        try:
            ino = fs.resolve(path.encode())
        except FsError:
            assert path not in durable, f"{path}: fsync-ed version {durable[path]} lost"
            continue
        fh = fs.open(ino, os.O_RDONLY)
        data = fs.read(fh, 0, 1 << 20)
        fs.release(fh)
        allowed = {content(path, v) for v in written.get(path, ())} | {b""}
        assert data in allowed, f"{path}: content never written ({len(data)} bytes)"
        if path in durable:
            durable_versions = {durable[path]} | ({renaming[path]} if path in renaming else set())
            assert data in {content(path, v) for v in durable_versions if v is not None}, (
                f"{path}: not the fsync-ed version"
            )
            checked += 1
    close_store(store)
    return checked


@pytest.mark.parametrize("crash_after", [5, 17, 40, 90, 250, 700])
def test_crash_during_workload(tmp_path: Path, crash_after: int) -> None:
    container = tmp_path / "vault.kv"
    mkfs_container(container)
    journal = tmp_path / "journal.jsonl"
    env = {CRASH_ENV: str(crash_after)} if crash_after else {}
    m = Mount(container, tmp_path / "mnt", tmp_path / "mount.log", env=env)
    m.start()
    crashed = False
    try:
        run_workload(m.mountpoint, journal, seed=crash_after)
    except OSError:
        crashed = True  # ENOTCONN / ECONNABORTED once the daemon is gone
    if crashed:
        rc = m.kill_and_detach()
        assert rc == 75, f"daemon exited {rc}:\n{m.log()}"
    else:
        assert m.stop() == 0
        assert not crash_after, "workload finished without the crash"
    checked = check(container, journal)
    steps = sum(1 for line in journal.read_text().splitlines() if '"w"' in line)
    print(f"crash_after={crash_after} crashed={crashed} steps={steps} fsynced-checked={checked}")
