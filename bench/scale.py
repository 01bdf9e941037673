#!/usr/bin/env python3
"""Prove the scale targets through a real mount, using only the `kryptvault` CLI.

    .venv/bin/python bench/scale.py [--files 100000] [--data-gib 10] [--dir /var/tmp/kvscale]
                                    [--quick] [--keep]

Targets (issue "encrypted filesystem", Scale): 100,000 files and 10 GiB of data; commit
cost proportional to the change, not to the vault's size; mount (after the password) in
under 5 s; daemon RSS under 300 MiB; space of deleted files reused; the container grows
as needed and `kryptvault compact` gives unused space back.

Steps: init + mount a vault, create the small files (1-4 KiB, ~100 per directory) and the
large files (1 MiB writes of a repeating random buffer), time single 4 KiB commits on the
big vault and on a fresh small one, lock and re-mount (audit log `unlock_ok` -> `mount`),
sample the daemon's RSS (psutil) through `ls -lR` and a 1 GiB read, delete half the large
data, commit, write as much again and watch the container size, lock, compact. Prints one
table; everything under --dir is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
KV = str(Path(sys.executable).parent / "kryptvault")
MiB = 1 << 20
GiB = 1 << 30
PASSWORD = "correct horse battery staple scale"


class Vault:
    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.container = base / f"{name}.kv"
        self.mnt = base / f"mnt-{name}"
        self.token = base / "token"
        self.pwfile = base / "password"
        self.uuid = ""
        self.pid = 0

    def _auth(self) -> list[str]:
        return ["--token", str(self.token), "--password-file", str(self.pwfile)]

    def init(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        out = run([KV, "init", str(self.container), *self._auth(),
                   "--kdf-time-ms", "50", "--kdf-memory-mib", "8"])
        m = re.search(r"vault ([0-9a-f-]{36})", out)
        if not m:
            raise SystemExit(f"cannot find the vault UUID in: {out!r}")
        self.uuid = m.group(1)

    def mount(self) -> float:
        t = time.perf_counter()
        run([KV, "mount", str(self.container), str(self.mnt), *self._auth()])
        wall = time.perf_counter() - t
        for entry in json.loads(run([KV, "status", "--json"])):
            if entry.get("vault") == self.uuid:
                self.pid = int(entry["pid"])
                break
        else:
            raise SystemExit(f"vault {self.uuid} not in `kryptvault status --json`")
        return wall

    def mounted(self) -> bool:
        return os.path.ismount(self.mnt)

    def lock(self) -> float:
        t = time.perf_counter()
        run([KV, "lock", str(self.mnt)])
        self.pid = 0
        return time.perf_counter() - t

    def compact(self) -> tuple[float, str]:
        t = time.perf_counter()
        out = run([KV, "compact", str(self.container), *self._auth(), "--json"])
        return time.perf_counter() - t, out

    def size(self) -> int:
        return self.container.stat().st_size

    def audit(self) -> list[dict]:
        out = run([KV, "log", "--json", "--vault", self.uuid])
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


class RssSampler:
    """Samples a pid's RSS every `interval` s in a thread; `peak()` since the last reset."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.pid = 0
        self._peak = 0
        self.overall = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            pid = self.pid
            if not pid:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            with self._lock:
                self._peak = max(self._peak, rss)
                self.overall = max(self.overall, rss)

    def now(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def reset(self) -> None:
        with self._lock:
            self._peak = self.now()

    def peak(self) -> int:
        with self._lock:
            return max(self._peak, self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_big(path: Path, nbytes: int, buf: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            n = os.write(fd, buf[: min(left, len(buf))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_costs(vault: Vault, n: int) -> tuple[float, float]:
    """Median ms of (4 KiB overwrite + fsync) and of (new 4 KiB file + fsync), n each."""
    d = vault.mnt / "commit-probe"
    d.mkdir(exist_ok=True)
    target = d / "probe"
    target.write_bytes(os.urandom(4096))
    fsync_path(target)
    over, new = [], []
    for i in range(n):
        fd = os.open(target, os.O_WRONLY)
        try:
            t = time.perf_counter()
            os.pwrite(fd, os.urandom(4096), 0)
            os.fsync(fd)
            over.append(time.perf_counter() - t)
        finally:
            os.close(fd)
        t = time.perf_counter()
        fd = os.open(d / f"new{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, os.urandom(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
        new.append(time.perf_counter() - t)
    return statistics.median(over) * 1000, statistics.median(new) * 1000


def ts(entry: dict) -> float:
    return datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="small files (1-4 KiB)")
    ap.add_argument("--data-gib", type=float, default=10.0, help="GiB of large files")
    ap.add_argument("--dir", default="/var/tmp/kvscale", help="work directory (deleted)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2000 files, 0.5 GiB")
    ap.add_argument("--keep", action="store_true", help="keep --dir at the end")
    ap.add_argument("--commits", type=int, default=20, help="commits timed per vault")
    args = ap.parse_args()
    if args.quick:
        args.files, args.data_gib = 2000, 0.5

    base = Path(args.dir).resolve()
    if base.exists():
        raise SystemExit(f"{base} exists; remove it first")
    total = int(args.data_gib * GiB)
    need = total * 1.6 + args.files * 8192
    if shutil.disk_usage(base.parent if base.parent.exists() else "/").free < need:
        raise SystemExit(f"not enough free space for ~{fmt_bytes(need)} under {base.parent}")
    base.mkdir(parents=True)
    (base / "token").mkdir()
    (base / "password").write_text(PASSWORD + "\n")

    rng = random.Random(1)
    buf = rng.randbytes(MiB)
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, target: str = "") -> None:
        rows.append((name, value, target))
        print(f"  {name}: {value}  {target}", flush=True)

    big = Vault(base, "big")
    small = Vault(base, "small")
    sampler = RssSampler()
    try:
        print(f"== {args.files} files + {fmt_bytes(total)} in {base}", flush=True)
        big.init()
        big.mount()
        sampler.pid = big.pid
        row("container after init", fmt_bytes(big.size()))

        # 1. small files over ~files/100 directories, then the large files.
        ndirs = max(1, math.ceil(args.files / 100))
        t = time.perf_counter()
        for d in range(ndirs):
            (big.mnt / "small" / f"d{d:04d}").mkdir(parents=True)
        for i in range(args.files):
            size = rng.randint(1024, 4096)
            off = rng.randrange(0, MiB - size)
            fd = os.open(big.mnt / "small" / f"d{i % ndirs:04d}" / f"f{i:06d}",
                         os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, buf[off:off + size])
            os.close(fd)
        fsync_path(big.mnt)
        dt = time.perf_counter() - t
        row("1. create small files", f"{args.files} in {ndirs} dirs, {dt:.1f} s = "
            f"{args.files / dt:.0f} files/s")
        file_size = min(GiB, total)
        nlarge = max(1, math.ceil(total / file_size))
        (big.mnt / "large").mkdir()
        t = time.perf_counter()
        for i in range(nlarge):
            write_big(big.mnt / "large" / f"big{i:02d}", min(file_size, total - i * file_size),
                      buf)
        fsync_path(big.mnt)
        dt = time.perf_counter() - t
        row("1. write large files", f"{nlarge} x {fmt_bytes(file_size)}, {dt:.1f} s = "
            f"{total / MiB / dt:.0f} MiB/s")
        size_full = big.size()
        row("1. container after fill", f"{fmt_bytes(size_full)} "
            f"(logical {fmt_bytes(total + args.files * 2560)})")
        row("1. daemon peak RSS during fill", fmt_bytes(sampler.overall), "< 300 MiB")

        # 2. commit cost: big vault vs a fresh small vault.
        ov_big, new_big = commit_costs(big, args.commits)
        small.init()
        small.mount()
        ov_small, new_small = commit_costs(small, args.commits)
        small.lock()
        row("2. commit 4 KiB overwrite (median)",
            f"big {ov_big:.1f} ms vs fresh {ov_small:.1f} ms ({ov_big / ov_small:.2f}x)",
            "~1x (proportional to change)")
        row("2. commit new 4 KiB file (median)",
            f"big {new_big:.1f} ms vs fresh {new_small:.1f} ms ({new_big / new_small:.2f}x)",
            "~1x")

        # 3. lock and re-mount.
        sampler.pid = 0
        lock_s = big.lock()
        row("3. lock (final commit + unmount)", f"{lock_s:.2f} s")
        since = time.time()
        wall = big.mount()
        sampler.pid = big.pid
        entries = [e for e in big.audit() if ts(e) >= since - 1]
        unlock = [ts(e) for e in entries if e["event"] == "unlock_ok"]
        mounted = [ts(e) for e in entries if e["event"] == "mount"]
        if unlock and mounted:
            open_s = mounted[-1] - unlock[-1]
            row("3. mount after unlock (unlock_ok -> mount)", f"{open_s:.2f} s", "< 5 s")
        else:
            row("3. mount after unlock", "unlock_ok/mount not in audit log", "< 5 s")
        row("3. `kryptvault mount` wall time (incl. Argon2 50 ms)", f"{wall:.2f} s")

        # 4. daemon RSS.
        row("4. daemon RSS after mount", fmt_bytes(sampler.now()), "< 300 MiB")
        sampler.reset()
        t = time.perf_counter()
        subprocess.run(["ls", "-lR", str(big.mnt)], stdout=subprocess.DEVNULL, check=True)
        dt = time.perf_counter() - t
        row("4. daemon RSS peak during ls -lR", f"{fmt_bytes(sampler.peak())} "
            f"(ls -lR {dt:.1f} s, {args.files / dt:.0f} files/s)", "< 300 MiB")
        sampler.reset()
        t = time.perf_counter()
        nread = 0
        with open(big.mnt / "large" / "big00", "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                nread += len(chunk)
        dt = time.perf_counter() - t
        row("4. daemon RSS peak reading 1 file", f"{fmt_bytes(sampler.peak())} "
            f"({fmt_bytes(nread)} at {nread / MiB / dt:.0f} MiB/s)", "< 300 MiB")

        # 5. delete half the large data, commit, write as much again.
        half = [p for p in sorted((big.mnt / "large").iterdir())][: max(1, nlarge // 2)]
        deleted = sum(p.stat().st_size for p in half)
        before = big.size()
        t = time.perf_counter()
        for p in half:
            p.unlink()
        fsync_path(big.mnt / "large")
        fsync_path(big.mnt)
        dt_del = time.perf_counter() - t
        after_del = big.size()
        # A second commit, in case freed blocks are only reusable once the deleting
        # commit is itself superseded.
        (big.mnt / "after-delete").write_bytes(b"x")
        fsync_path(big.mnt)
        t = time.perf_counter()
        left = deleted
        i = 0
        while left > 0:
            n = min(file_size, left)
            write_big(big.mnt / "large" / f"new{i:02d}", n, buf)
            left -= n
            i += 1
        fsync_path(big.mnt)
        dt_new = time.perf_counter() - t
        after_new = big.size()
        row("5. delete + commit", f"{fmt_bytes(deleted)} in {dt_del:.2f} s")
        row("5. container before / after delete / after rewrite",
            f"{fmt_bytes(before)} / {fmt_bytes(after_del)} / {fmt_bytes(after_new)}")
        row("5. growth on rewriting the deleted amount",
            f"{fmt_bytes(after_new - before)} for {fmt_bytes(deleted)} written "
            f"({(after_new - before) / deleted:.1%}; {deleted / MiB / dt_new:.0f} MiB/s)",
            "small (space reused)")
        row("4. daemon RSS overall peak", fmt_bytes(sampler.overall), "< 300 MiB")

        # 6. lock and compact.
        sampler.pid = 0
        big.lock()
        pre = big.size()
        dt, out = big.compact()
        post = big.size()
        row("6. compact", f"{fmt_bytes(pre)} -> {fmt_bytes(post)} in {dt:.1f} s")
        if out.strip():
            print("  compact --json:", out.strip().replace("\n", " ")[:400])
    finally:
        sampler.stop()
        for v in (big, small):
            if v.mounted():
                subprocess.run([KV, "lock", str(v.mnt)], capture_output=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print()
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'metric':<{w0}}  {'value':<{w1}}  target")
    for name, value, target in rows:
        print(f"{name:<{w0}}  {value:<{w1}}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
