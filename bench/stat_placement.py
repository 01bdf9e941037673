#!/usr/bin/env python3
"""Where a cold `stat` spends its time: the daemon's work, or waking the caller's CPU.

    .venv/bin/python bench/stat_placement.py [--files 2000] [--repeat 5] [--targets vault,gocryptfs]

bench/run.py's "cold stat" row is one LOOKUP round trip per file in both daemons. This
measures that row twice per target, alternating, after the same cold remount
(sync, unmount, drop_caches, mount): `free`, placed by the scheduler as in run.py, and
`one-cpu`, the daemon and the stat-ing process both confined to CPU 0. With one CPU the
round trip is a hand-over between two threads of one CPU; free, the caller sleeps on one
CPU while the daemon answers on the other, and the answer has to wake the caller's CPU
out of idle, which on a virtual machine (a halted vCPU) can cost more than the work of
either daemon. The difference between the two rows is what the placement costs each
daemon per stat; the `one-cpu` ratio is what the daemons' own work decides.

Prints per target and placement the median files/s and the median per-stat latency of
the rounds (first look-up in each directory excluded: it loads the directory), then the
vault/gocryptfs ratios per placement (files/s; median stat, gocryptfs's time over the
vault's). Needs root (drop_caches) and two or more CPUs. `perf sched timehist` of the
`free` case shows where the time goes (README, Performance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import GocryptfsTarget, Target, VaultTarget, drop_caches

PLACEMENTS = ("free", "one-cpu")


def make_tree(t: Target, files: int) -> list[Path]:
    root = t.mp / "small"
    root.mkdir()
    for d in range(20):
        (root / f"d{d}").mkdir()
    names = [root / f"d{i % 20}" / f"file{i}.txt" for i in range(files)]
    payload = os.urandom(2048)
    for n in names:
        n.write_bytes(payload)
    return names


def cold_stat(t: Target, names: list[Path], cpus: set[int]) -> tuple[float, float]:
    """(files/s, median µs per stat after each directory's first) after a cold remount,
    with the daemon (started under this affinity) and this process on `cpus`."""
    everything = os.sched_getaffinity(0)
    os.sync()
    t.stop()
    drop_caches()
    os.sched_setaffinity(0, cpus)
    try:
        t.start()
        time.sleep(0.3)  # the mount's own start-up work is not the figure
        clock = time.perf_counter_ns
        lstat = os.lstat
        took = []
        start = clock()
        for n in names:
            before = clock()
            lstat(n)
            took.append(clock() - before)
        elapsed = (clock() - start) / 1e9
    finally:
        os.sched_setaffinity(0, everything)
    return len(names) / elapsed, statistics.median(took[20:]) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--targets", default="vault,gocryptfs")
    ap.add_argument("--dir", default=os.environ.get("KV_BENCH_DIR", "/var/tmp"))
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("bench/stat_placement.py: needs two CPUs or more", file=sys.stderr)
        return 2
    if not drop_caches():
        print("bench/stat_placement.py: needs root (drop_caches)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if "gocryptfs" in names and not shutil.which("gocryptfs"):
        print("gocryptfs not installed: skipped (no ratios)")
        names.remove("gocryptfs")
    work = Path(tempfile.mkdtemp(prefix="kv-placement-", dir=args.dir))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for name in names:
            t: Target = VaultTarget(work, {}) if name == "vault" else GocryptfsTarget(work)
            t.setup()
            t.start()
            try:
                files = make_tree(t, args.files)
                everything = os.sched_getaffinity(0)
                for round_no in range(args.repeat):
                    order = PLACEMENTS if round_no % 2 == 0 else PLACEMENTS[::-1]
                    for placement in order:
                        cpus = {min(everything)} if placement == "one-cpu" else everything
                        results.setdefault((name, placement), []).append(cold_stat(t, files, cpus))
            finally:
                t.stop()
                t.teardown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"cold stat of {args.files} files, medians of {args.repeat} rounds")
    print(f"{'target':10} {'placement':9} {'files/s':>8} {'µs/stat':>8}")
    rates: dict[tuple[str, str], float] = {}
    latencies: dict[tuple[str, str], float] = {}
    for (name, placement), rounds in results.items():
        rates[(name, placement)] = statistics.median(r[0] for r in rounds)
        latencies[(name, placement)] = statistics.median(r[1] for r in rounds)
        print(f"{name:10} {placement:9} {rates[(name, placement)]:8.0f} {latencies[(name, placement)]:8.1f}")
    if ("vault", "free") in rates and ("gocryptfs", "free") in rates:
        for placement in PLACEMENTS:
            files_ratio = rates[("vault", placement)] / rates[("gocryptfs", placement)]
            stat_ratio = latencies[("gocryptfs", placement)] / latencies[("vault", placement)]
            print(f"vault/gocryptfs {placement:8}: files/s {files_ratio:.2f}x, median stat {stat_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
