#!/usr/bin/env python3
"""Benchmark a mounted vault against a plain directory and gocryptfs on the same disk.

    .venv/bin/python bench/run.py [--targets vault,plain,gocryptfs,ceiling] [--repeat 1]
                                  [--writeback] [--no-keep-cache] [--quick]

Needs root for `echo 3 > /proc/sys/vm/drop_caches` (cold reads; skipped otherwise).
The vault is created with the fixed test keys (tests/fs_fixtures.py) in a temp dir and
served by a child process exactly as the tests do. Prints one table: each figure per
target, the vault/gocryptfs ratio with the target ratio, and the daemon's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fs_fixtures  # noqa: E402

MiB = 1 << 20
TARGETS = {  # metric -> (unit, minimum vault/gocryptfs ratio)
    "seq write MB/s": ("MB/s", 1.5),
    "cold read MB/s": ("MB/s", 1.0),
    "warm re-read MB/s": ("MB/s", 1.0),
    "rand 4K read ops/s": ("ops/s", 0.33),
    "rand 4K write ops/s": ("ops/s", 2.0),
    "small create files/s": ("files/s", None),
    "small read files/s": ("files/s", None),
    "ls -lR files/s": ("files/s", 1.0),
    "small delete files/s": ("files/s", None),
    "tar -x entries/s": ("entries/s", 1.0),
    "rm -rf entries/s": ("entries/s", None),
}


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Bench:
    def __init__(self, mp: Path, seq_mib: int, rand_ops: int, small: int, tarball: Path,
                 tar_entries: int) -> None:
        self.mp = mp
        self.seq_mib = seq_mib
        self.rand_ops = rand_ops
        self.small = small
        self.tarball = tarball
        self.tar_entries = tar_entries

    def random_io(self, path: Path) -> dict[str, float]:
        """4 KiB preads, then 4 KiB pwrites + one fsync, at the same random aligned offsets
        of the 64 MiB file `path` (cold cache for the reads where caches can be dropped)."""
        r: dict[str, float] = {}
        rng = random.Random(1)
        offsets = [rng.randrange(0, 64 * MiB // 4096) * 4096 for _ in range(self.rand_ops)]
        drop_caches()
        fd = os.open(path, os.O_RDONLY)
        t = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        r["rand 4K read ops/s"] = self.rand_ops / (time.perf_counter() - t)
        os.close(fd)
        page = os.urandom(4096)
        fd = os.open(path, os.O_WRONLY)
        t = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, page, off)
        os.fsync(fd)
        r["rand 4K write ops/s"] = self.rand_ops / (time.perf_counter() - t)
        os.close(fd)
        return r

    def run(self) -> dict[str, float]:
        r: dict[str, float] = {}
        mp = self.mp
        block = os.urandom(MiB)
        big = mp / "seq.bin"

        def seq_write() -> None:
            fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for _ in range(self.seq_mib):
                os.write(fd, block)
            os.fsync(fd)
            os.close(fd)

        def seq_read() -> None:
            fd = os.open(big, os.O_RDONLY)
            while os.read(fd, MiB):
                pass
            os.close(fd)

        r["seq write MB/s"] = self.seq_mib * MiB / 1e6 / timed(seq_write)
        if drop_caches():
            r["cold read MB/s"] = self.seq_mib * MiB / 1e6 / timed(seq_read)
        else:
            seq_read()
        r["warm re-read MB/s"] = self.seq_mib * MiB / 1e6 / timed(seq_read)
        os.unlink(big)

        # random 4 KiB I/O on a 64 MiB file
        rnd = mp / "rand.bin"
        with open(rnd, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
        r.update(self.random_io(rnd))
        os.unlink(rnd)

        # small files
        sd = mp / "small"
        sd.mkdir()
        payload = os.urandom(2048)
        names = [sd / f"d{i % 20}" / f"file{i}.txt" for i in range(self.small)]
        for i in range(20):
            (sd / f"d{i}").mkdir()

        def create() -> None:
            for n in names:
                with open(n, "wb") as f:
                    f.write(payload)

        def read_all() -> None:
            for n in names:
                with open(n, "rb") as f:
                    f.read()

        r["small create files/s"] = self.small / timed(create)
        drop_caches()
        r["small read files/s"] = self.small / timed(read_all)
        drop_caches()
        r["ls -lR files/s"] = self.small / timed(
            lambda: subprocess.run(["ls", "-lR", str(sd)], stdout=subprocess.DEVNULL, check=True)
        )

        def delete() -> None:
            for n in names:
                os.unlink(n)

        r["small delete files/s"] = self.small / timed(delete)
        shutil.rmtree(sd)

        # tar -x / rm -rf of a source tree
        dest = mp / "tree"
        dest.mkdir()
        r["tar -x entries/s"] = self.tar_entries / timed(
            lambda: subprocess.run(["tar", "-xf", str(self.tarball), "-C", str(dest)], check=True)
        )
        os.sync()
        r["rm -rf entries/s"] = self.tar_entries / timed(
            lambda: subprocess.run(["rm", "-rf", str(dest)], check=True)
        )
        return r


def make_tarball(work: Path) -> tuple[Path, int]:
    src = Path(sys.prefix) / "lib"
    tarball = work / "tree.tar"
    subprocess.run(
        ["tar", "--exclude=__pycache__", "-cf", str(tarball), "-C", str(src), "."], check=True
    )
    out = subprocess.run(["tar", "-tf", str(tarball)], capture_output=True, text=True, check=True)
    return tarball, len(out.stdout.splitlines())


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_vault(work: Path, bench: Bench, opts: dict[str, object]) -> tuple[dict[str, float], int]:
    container = work / "vault.kv"
    fs_fixtures.mkfs_container(container)
    m = fs_fixtures.Mount(container, work / "vault.mnt", work / "vault.log", **opts)
    m.start()
    try:
        bench.mp = m.mountpoint
        res = bench.run()
        rss = peak_rss(m.pid)
    finally:
        rc = m.stop()
    if rc != 0:
        raise RuntimeError(f"vault daemon exited {rc}:\n{m.log()}")
    container.unlink()
    return res, rss


def run_plain(work: Path, bench: Bench) -> dict[str, float]:
    d = work / "plain"
    d.mkdir()
    bench.mp = d
    try:
        return bench.run()
    finally:
        shutil.rmtree(d)


def run_ceiling(work: Path, bench: Bench) -> dict[str, float]:
    """Random 4 KiB I/O through a no-op filesystem on kryptvault's FUSE adapter
    (bench/nullfs.py): the most any Python daemon on mfusepy can do here."""
    mnt = work / "ceiling.mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "nullfs.py"), str(mnt)])
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the no-op filesystem did not mount")
            time.sleep(0.05)
        return bench.random_io(mnt / "data.bin")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=20)


def run_gocryptfs(work: Path, bench: Bench) -> dict[str, float]:
    cipher, mnt = work / "gc.cipher", work / "gc.mnt"
    cipher.mkdir()
    mnt.mkdir(exist_ok=True)
    subprocess.run(
        ["gocryptfs", "-init", "-extpass", "echo pw", "-scryptn", "10", "-q", str(cipher)],
        check=True,
    )
    subprocess.run(["gocryptfs", "-extpass", "echo pw", "-q", str(cipher), str(mnt)], check=True)
    try:
        bench.mp = mnt
        return bench.run()
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        shutil.rmtree(cipher)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--targets",
        default="vault,plain,gocryptfs,ceiling",
        help="ceiling = random 4 KiB I/O through a no-op filesystem on the same FUSE adapter",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per target; medians reported")
    ap.add_argument("--writeback", action="store_true", help="mount the vault with writeback cache")
    ap.add_argument("--no-keep-cache", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--threads", action="store_true", help="libfuse worker threads")
    ap.add_argument("--dirty-limit", type=int, default=0, help="store dirty limit, MiB")
    ap.add_argument("--cache-limit", type=int, default=0, help="store block cache, MiB")
    ap.add_argument("--dir", default=os.environ.get("KV_BENCH_DIR", "/var/tmp"))
    args = ap.parse_args()
    targets = args.targets.split(",")
    if "gocryptfs" in targets and not shutil.which("gocryptfs"):
        print("gocryptfs not installed: skipped")
        targets.remove("gocryptfs")
    work = Path(tempfile.mkdtemp(prefix="kv-bench-", dir=args.dir))
    try:
        tarball, entries = make_tarball(work)
        bench = Bench(
            work,
            seq_mib=64 if args.quick else 256,
            rand_ops=4000 if args.quick else 20000,
            small=500 if args.quick else 2000,
            tarball=tarball,
            tar_entries=entries,
        )
        opts: dict[str, object] = {"writeback": args.writeback, "keep_cache": not args.no_keep_cache}
        if args.threads:
            opts["threads"] = True
        store_options = {}
        if args.dirty_limit:
            store_options["dirty_limit"] = args.dirty_limit * MiB
        if args.cache_limit:
            store_options["cache_limit"] = args.cache_limit * MiB
        if store_options:
            opts["store_options"] = store_options
        results: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        rss: list[int] = []
        for round_no in range(args.repeat):
            # Each round starts with a different target, and every target starts with the
            # previous one's dirty pages written back: the disk's background writeback
            # would otherwise slow whichever target always runs second.
            for t in targets[round_no % len(targets):] + targets[: round_no % len(targets)]:
                os.sync()
                if t == "vault":
                    res, peak = run_vault(work, bench, opts)
                    rss.append(peak)
                elif t == "plain":
                    res = run_plain(work, bench)
                elif t == "ceiling":
                    res = run_ceiling(work, bench)
                else:
                    res = run_gocryptfs(work, bench)
                results[t].append(res)
        med = {
            t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in results.items()
        }
        # The ceiling only has the random I/O figures; its other cells print as nan.
        print(f"\ntree for tar: {entries} entries; vault options {opts}; repeat {args.repeat}")
        head = f"{'metric':24}" + "".join(f"{t:>12}" for t in targets)
        if "vault" in med and "gocryptfs" in med:
            head += f"{'vault/gc':>10}{'target':>8}"
        print(head)
        for metric, (_unit, goal) in TARGETS.items():
            if not any(metric in m for m in med.values()):
                continue
            row = f"{metric:24}" + "".join(f"{med[t].get(metric, float('nan')):12.0f}" for t in targets)
            if "vault" in med and "gocryptfs" in med and metric in med["vault"]:
                ratio = med["vault"][metric] / med["gocryptfs"][metric]
                mark = "" if goal is None else f"{goal:>6.2f}x" + (" ok" if ratio >= goal else " LOW")
                row += f"{ratio:9.2f}x {mark}"
            print(row)
        if rss:
            print(f"vault daemon peak RSS: {max(rss) / MiB:.0f} MiB (target < 150 MiB)")
        if "ceiling" in med and "gocryptfs" in med:
            for metric in ("rand 4K read ops/s", "rand 4K write ops/s"):
                ceiling, peer = med["ceiling"][metric], med["gocryptfs"][metric]
                goal = TARGETS[metric][1] or 0.0
                print(
                    f"ceiling {metric}: a no-op fs on the same adapter does {ceiling:.0f} = "
                    f"{ceiling / peer:.2f}x gocryptfs; the {goal:.2f}x target needs {goal * peer:.0f}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
