#!/usr/bin/env python3
"""Benchmark a mounted vault against gocryptfs, a plain directory and a no-op FUSE filesystem.

    .venv/bin/python bench/run.py [--targets vault,gocryptfs,plain,nullfs] [--repeat 3]
                                  [--quick] [--markdown] [--dir /var/tmp] [--vault-opt K=V]

Every target runs the same workload in one run on the same disk; each figure is the
median of `--repeat` rounds. In a round every target is mounted, and each part of the
workload (round trips, random I/O, sequential I/O, small files, tar) runs on every target
back to back before the next part starts (rounds rotate which target goes first), so the
two sides of a ratio are measured seconds apart, not minutes: on this VM the host moves
every daemon's figures by up to 2x between runs minutes apart. Each row shows
vault/gocryptfs beside the issue-13 target with pass/MISS, and nullfs/gocryptfs: the
no-op ceiling (bench/nullfs.py, served by the vault's own FUSE layer, so no vault on that
layer can beat it). `--markdown` prints the same table for the README.

Targets: `vault` is a fresh container with the fixed test keys, served by a child process
exactly as the tests do (tests/fs_fixtures.Mount -> kryptvault.fuseadapter.serve; the
harness does not depend on which FUSE layer that is, and passes the vault only the
options given here); `gocryptfs` a fresh `-init`, run with `-fg`; `plain` a directory on
the disk of --dir; `nullfs` (alias `ceiling`) every row: its namespace (names,
attributes, sizes) is real, its file contents are discarded and read back as zeros.

Cold rows: `sync`, unmount (the daemon exits with its caches: the vault's block cache,
gocryptfs's), `echo 3 > /proc/sys/vm/drop_caches` (the page cache of the mount and of the
files under it, dentries, inodes), then mount again with a new daemon; for `plain`, `sync`
+ drop_caches; for `nullfs` too (its namespace lives only in its daemon, which stays: the
kernel forgets every name and page all the same, so each is asked for again). drop_caches
needs root: without it cold rows only remount and the output says so.

Workload per target: a 64 MiB file written in 1 MiB writes, then cold random 4 KiB
preads of it and random 4 KiB pwrites + one fsync; a sequential file (1 MiB writes +
fsync), read cold then warm; small files (2 KiB, 20 directories) created, stat-ed cold,
`ls -lR` cold, read cold, deleted; `tar -x` of a generated tree of small files (0.5-8 KiB,
25 per directory), then `rm -rf`; the daemon's peak RSS (VmHWM of each daemon process of
the round with its children's, read just before it unmounts; the largest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fs_fixtures  # noqa: E402

MiB = 1 << 20
RAND_FILE = 64 * MiB
RSS_ROW = "daemon peak RSS MiB"
RSS_LIMIT_MIB = 150.0


@dataclass(frozen=True)
class Row:
    metric: str
    goal: float | None  # minimum vault/gocryptfs ratio (issue 13); None: shown only


ROWS = [
    Row("rand 4K write ops/s", 3.0),
    Row("cold rand 4K read ops/s", 1.0),
    Row("tar -x entries/s", 1.3),
    Row("small create files/s", 1.3),
    Row("cold ls -lR files/s", 1.3),
    Row("cold stat files/s", 1.2),
    Row("seq write MB/s", 2.0),
    Row("cold seq read MB/s", 1.2),
    Row("warm re-read MB/s", None),
    Row("cold small read files/s", None),
    Row("small delete files/s", None),
    Row("rm -rf entries/s", None),
    Row("round trips/s", None),
]


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


def peak_rss(pid: int) -> int:
    """VmHWM of the process plus that of its children (the vault's spinner helper): what
    the mount costs in memory, not only its main process."""
    try:
        family = [pid, *(c.pid for c in psutil.Process(pid).children())]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in family:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def wait_mounted(mp: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(mp):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount on {mp}")
        time.sleep(0.02)


def unmount(mp: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while os.path.ismount(mp):
        r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, check=False)
        if r.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"cannot unmount {mp}: {r.stderr.decode(errors='replace').strip()}")
        time.sleep(0.1)
    proc.wait(timeout=30)


class Target:
    """One filesystem under test: `setup` makes a fresh one for a round, `start`/`stop`
    mount and unmount it, `cold` empties every cache between it and the disk."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.mp = work / f"{self.name}.mnt"
        self.rss = 0  # the round's largest daemon VmHWM, bytes

    def setup(self) -> None:
        self.rss = 0

    def start(self) -> None:
        raise NotImplementedError

    def _unmount(self) -> None:
        raise NotImplementedError

    def daemon_pid(self) -> int | None:
        return None

    def stop(self) -> None:
        pid = self.daemon_pid()
        if pid is not None:
            self.rss = max(self.rss, peak_rss(pid))
        self._unmount()

    def teardown(self) -> None:
        pass

    def cold(self) -> None:
        os.sync()
        self.stop()
        drop_caches()
        self.start()

    def settle(self) -> None:
        """Finish background work (a vault's pending commit) before another target is
        measured, so that it does not run during someone else's figures."""


class PlainTarget(Target):
    name = "plain"

    def setup(self) -> None:
        super().setup()
        self.mp.mkdir()

    def start(self) -> None:
        pass

    def _unmount(self) -> None:
        pass

    def teardown(self) -> None:
        shutil.rmtree(self.mp)


class VaultTarget(Target):
    name = "vault"

    def __init__(self, work: Path, opts: dict[str, Any]) -> None:
        super().__init__(work)
        self.opts = opts
        self.container = work / "vault.kv"
        self.mount: fs_fixtures.Mount | None = None

    def setup(self) -> None:
        super().setup()
        fs_fixtures.mkfs_container(self.container)
        self.mount = fs_fixtures.Mount(self.container, self.mp, self.work / "vault.log")
        self.mount.opts = json.loads(json.dumps(self.opts))  # a copy: Mount.start adds to it

    def start(self) -> None:
        assert self.mount is not None
        self.mount.start()

    def daemon_pid(self) -> int | None:
        return self.mount.pid if self.mount is not None and self.mount.proc is not None else None

    def _unmount(self) -> None:
        assert self.mount is not None
        rc = self.mount.stop()
        if rc != 0:
            raise RuntimeError(f"vault daemon exited {rc}:\n{self.mount.log()}")

    def teardown(self) -> None:
        self.container.unlink(missing_ok=True)

    def settle(self) -> None:
        # fsync of the mount's root commits everything pending (what the daemon's commit
        # timer would otherwise do up to 5 s later).
        fd = os.open(self.mp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GocryptfsTarget(Target):
    name = "gocryptfs"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.cipher = work / "gc.cipher"
        self.proc: subprocess.Popen[bytes] | None = None

    def setup(self) -> None:
        super().setup()
        self.cipher.mkdir()
        subprocess.run(
            ["gocryptfs", "-init", "-extpass", "echo pw", "-scryptn", "10", "-q", str(self.cipher)],
            check=True,
        )

    def start(self) -> None:
        self.mp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["gocryptfs", "-fg", "-q", "-extpass", "echo pw", str(self.cipher), str(self.mp)],
            stdout=subprocess.DEVNULL,
        )
        wait_mounted(self.mp, self.proc, "gocryptfs")

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _unmount(self) -> None:
        assert self.proc is not None
        unmount(self.mp, self.proc)
        self.proc = None

    def teardown(self) -> None:
        shutil.rmtree(self.cipher)


class NullfsTarget(Target):
    """bench/nullfs.py: the FUSE round trips alone, on the vault's own FUSE layer."""

    name = "nullfs"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.mp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "nullfs.py"), str(self.mp)])
        wait_mounted(self.mp, self.proc, "the no-op filesystem")

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _unmount(self) -> None:
        assert self.proc is not None
        unmount(self.mp, self.proc)
        self.proc = None

    def cold(self) -> None:
        # The namespace lives only in this daemon, so it stays; the kernel drops every
        # name, attribute and page it holds from this mount all the same, and asks again.
        os.sync()
        drop_caches()


class Workload:
    def __init__(self, seq_mib: int, rand_ops: int, small: int, tarball: Path, tar_entries: int) -> None:
        self.seq_mib = seq_mib
        self.rand_ops = rand_ops
        self.small = small
        self.tarball = tarball
        self.tar_entries = tar_entries

    def parts(self) -> list[Callable[[Target, dict[str, float]], None]]:
        """The workload's parts, in order; each fills some rows of its results."""
        return [self.round_trips, self.random_io, self.sequential, self.small_files, self.tar]

    def round_trips(self, t: Target, r: dict[str, float]) -> None:
        """Look-ups of names that do not exist (each a new name, so the kernel asks the
        daemon every time): one request each and almost no filesystem work, i.e. what a
        bare FUSE round trip through each daemon costs. The metadata rows need about as
        many requests per file in every daemon, so this bounds their ratios."""
        n = self.rand_ops // 2
        tag = os.urandom(4).hex()

        def look() -> None:
            for i in range(n):
                with contextlib.suppress(FileNotFoundError):
                    os.lstat(t.mp / f"absent-{tag}-{i}")

        r["round trips/s"] = n / timed(look)

    def random_io(self, t: Target, r: dict[str, float]) -> None:
        """Cold random 4 KiB preads of a 64 MiB file, then random 4 KiB pwrites + fsync."""
        rng = random.Random(1)
        pages = RAND_FILE // 4096
        reads = [rng.randrange(pages) * 4096 for _ in range(self.rand_ops)]
        writes = [rng.randrange(pages) * 4096 for _ in range(self.rand_ops)]
        name = "rand.bin"
        write_file(t.mp / name, RAND_FILE // MiB, os.urandom(MiB))
        t.cold()
        fd = os.open(t.mp / name, os.O_RDONLY)
        start = time.perf_counter()
        for off in reads:
            os.pread(fd, 4096, off)
        r["cold rand 4K read ops/s"] = self.rand_ops / (time.perf_counter() - start)
        os.close(fd)
        page = os.urandom(4096)
        fd = os.open(t.mp / name, os.O_WRONLY)
        start = time.perf_counter()
        for off in writes:
            os.pwrite(fd, page, off)
        os.fsync(fd)
        r["rand 4K write ops/s"] = self.rand_ops / (time.perf_counter() - start)
        os.close(fd)
        os.unlink(t.mp / name)

    def sequential(self, t: Target, r: dict[str, float]) -> None:
        mib = self.seq_mib
        path = t.mp / "seq.bin"
        block = os.urandom(MiB)
        mb = mib * MiB / 1e6
        r["seq write MB/s"] = mb / timed(lambda: write_file(path, mib, block))
        t.cold()

        def read() -> None:
            fd = os.open(path, os.O_RDONLY)
            while os.read(fd, MiB):
                pass
            os.close(fd)

        r["cold seq read MB/s"] = mb / timed(read)
        r["warm re-read MB/s"] = mb / timed(read)
        os.unlink(path)

    def small_files(self, t: Target, r: dict[str, float]) -> None:
        sd = t.mp / "small"
        sd.mkdir()
        for i in range(20):
            (sd / f"d{i}").mkdir()
        names = [sd / f"d{i % 20}" / f"file{i}.txt" for i in range(self.small)]
        payload = os.urandom(2048)

        def create() -> None:
            for n in names:
                with open(n, "wb") as f:
                    f.write(payload)

        def stat_all() -> None:
            for n in names:
                os.lstat(n)

        def read_all() -> None:
            for n in names:
                with open(n, "rb") as f:
                    f.read()

        def delete() -> None:
            for n in names:
                os.unlink(n)

        r["small create files/s"] = self.small / timed(create)
        t.cold()
        r["cold stat files/s"] = self.small / timed(stat_all)
        t.cold()
        r["cold ls -lR files/s"] = self.small / timed(
            lambda: subprocess.run(["ls", "-lR", str(sd)], stdout=subprocess.DEVNULL, check=True)
        )
        t.cold()
        r["cold small read files/s"] = self.small / timed(read_all)
        r["small delete files/s"] = self.small / timed(delete)
        shutil.rmtree(sd)

    def tar(self, t: Target, r: dict[str, float]) -> None:
        dest = t.mp / "tree"
        dest.mkdir()
        r["tar -x entries/s"] = self.tar_entries / timed(
            lambda: subprocess.run(["tar", "-xf", str(self.tarball), "-C", str(dest)], check=True)
        )
        os.sync()  # rm -rf should not pay for the disk's writeback of the extraction
        r["rm -rf entries/s"] = self.tar_entries / timed(
            lambda: subprocess.run(["rm", "-rf", str(dest)], check=True)
        )


def write_file(path: Path, mib: int, block: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_tarball(work: Path, files: int) -> tuple[Path, int]:
    """A tree of `files` small files (0.5-8 KiB, 25 per directory, some executable)."""
    rng = random.Random(7)
    src = work / "tree-src"
    for i in range(files):
        d = src / f"pkg{i // 250}" / f"mod{i // 25}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i}.py"
        p.write_bytes(rng.randbytes(rng.randrange(512, 8193)))
        os.chmod(p, 0o755 if i % 10 == 0 else 0o644)
    tarball = work / "tree.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(src), "."], check=True)
    shutil.rmtree(src)
    out = subprocess.run(["tar", "-tf", str(tarball)], capture_output=True, text=True, check=True)
    return tarball, len(out.stdout.splitlines())


def report(med: dict[str, dict[str, float]], names: list[str], markdown: bool) -> list[str]:
    """The table: figures per target, vault/gocryptfs against the goal, nullfs/gocryptfs."""
    have_ratio = "vault" in med and "gocryptfs" in med
    have_ceiling = "nullfs" in med and "gocryptfs" in med
    head = ["metric", *names, "vault/gocryptfs", "target", "result"]
    if have_ceiling:
        head.append("nullfs/gocryptfs")
    rows: list[list[str]] = []

    def ratio(a: str, metric: str) -> float | None:
        x, y = med.get(a, {}).get(metric), med.get("gocryptfs", {}).get(metric)
        return x / y if x is not None and y else None

    met = total = 0
    for row in [*ROWS, Row(RSS_ROW, None)]:
        if not any(row.metric in m for m in med.values()):
            continue
        cells = [row.metric]
        cells += [f"{med[n][row.metric]:.0f}" if row.metric in med[n] else "-" for n in names]
        # RSS has an absolute limit; a ratio to gocryptfs's would only mislead
        vr = ratio("vault", row.metric) if have_ratio and row.metric != RSS_ROW else None
        cells.append(f"{vr:.2f}x" if vr is not None else "-")
        if row.metric == RSS_ROW:
            vault_rss = med.get("vault", {}).get(RSS_ROW)
            cells.append(f"< {RSS_LIMIT_MIB:.0f} MiB")
            ok = vault_rss is not None and vault_rss < RSS_LIMIT_MIB
            cells.append("-" if vault_rss is None else "pass" if ok else "MISS")
            total += vault_rss is not None
            met += ok
        elif row.goal is None:
            cells += ["-", "-"]
        else:
            cells.append(f">= {row.goal:.1f}x")
            cells.append("-" if vr is None else "pass" if vr >= row.goal else "MISS")
            total += vr is not None
            met += vr is not None and vr >= row.goal
        if have_ceiling:
            cr = ratio("nullfs", row.metric)
            cells.append(f"{cr:.2f}x" if cr is not None and row.metric != RSS_ROW else "-")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in rows]
        lines.append("")  # a line right after a GFM table would become one of its rows
    else:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [head, *rows]
        ]
    lines.append(f"targets met: {met} of {total}")
    return lines


def vault_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only what was asked for: the default is whatever kryptvault.fuseadapter.serve does."""
    opts: dict[str, Any] = {}
    if args.writeback is not None:
        opts["writeback"] = args.writeback
    if args.threads:
        opts["threads"] = True
    store_options = {}
    if args.dirty_limit:
        store_options["dirty_limit"] = args.dirty_limit * MiB
    if args.cache_limit:
        store_options["cache_limit"] = args.cache_limit * MiB
    if store_options:
        opts["store_options"] = store_options
    for item in args.vault_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench/run.py: --vault-opt wants KEY=VALUE, got {item!r}")
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    return opts


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--targets",
        default="vault,gocryptfs,plain,nullfs",
        help="any of vault, gocryptfs, plain, nullfs (= ceiling: a no-op fs on the vault's FUSE layer)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds; every figure is the median")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--seq-mib", type=int, help="sequential file size (256; --quick 64)")
    ap.add_argument("--rand-ops", type=int, help="random 4 KiB reads and writes each (20000; --quick 2000)")
    ap.add_argument("--small-files", type=int, help="small files (2000; --quick 500)")
    ap.add_argument("--tar-files", type=int, help="files in the tar -x tree (2000; --quick 500)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (README)")
    ap.add_argument("--writeback", action=argparse.BooleanOptionalAction, default=None,
                    help="force the vault's writeback cache on/off (default: the layer's own)")
    ap.add_argument("--threads", action="store_true", help="more than one request loop in the vault")
    ap.add_argument("--vault-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="another keyword for kryptvault.fuseadapter.serve (VALUE as JSON if it parses)")
    ap.add_argument("--dirty-limit", type=int, default=0, help="store dirty limit, MiB")
    ap.add_argument("--cache-limit", type=int, default=0, help="store block cache, MiB")
    ap.add_argument("--dir", default=os.environ.get("KV_BENCH_DIR", "/var/tmp"))
    args = ap.parse_args()
    names = ["nullfs" if n.strip() == "ceiling" else n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("vault", "gocryptfs", "plain", "nullfs")]
    if args.repeat < 1:
        print("bench/run.py: --repeat must be at least 1", file=sys.stderr)
        return 2
    if unknown or not names:
        print(f"bench/run.py: unknown target {', '.join(unknown) or '(none)'}", file=sys.stderr)
        return 2
    if "gocryptfs" in names and not shutil.which("gocryptfs"):
        print("gocryptfs not installed: skipped (no ratios)")
        names.remove("gocryptfs")
    seq_mib = args.seq_mib or (64 if args.quick else 256)
    rand_ops = args.rand_ops or (2000 if args.quick else 20000)
    small = args.small_files or (500 if args.quick else 2000)
    tar_files = args.tar_files or (500 if args.quick else 2000)
    cold_ok = drop_caches()
    opts = vault_options(args)
    work = Path(tempfile.mkdtemp(prefix="kv-bench-", dir=args.dir))
    running: list[Target] = []
    try:
        tarball, entries = make_tarball(work, tar_files)
        workload = Workload(seq_mib, rand_ops, small, tarball, entries)
        makers: dict[str, Callable[[], Target]] = {
            "vault": lambda: VaultTarget(work, opts),
            "gocryptfs": lambda: GocryptfsTarget(work),
            "plain": lambda: PlainTarget(work),
            "nullfs": lambda: NullfsTarget(work),
        }
        targets = {n: makers[n]() for n in names}
        results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        failed: set[str] = set()
        for round_no in range(args.repeat):
            k = round_no % len(names)
            order = [n for n in names[k:] + names[:k] if n not in failed]
            res: dict[str, dict[str, float]] = {n: {} for n in order}

            def give_up(n: str, what: str, e: Exception, round_no: int = round_no) -> None:
                # One broken target must not hide the others' figures.
                print(f"bench/run.py: {n} failed in round {round_no + 1} ({what}), left out: {e}",
                      file=sys.stderr)
                failed.add(n)
                discard(targets[n], running)

            for n in order:
                t = targets[n]
                try:
                    t.setup()
                    running.append(t)
                    t.start()
                except Exception as e:
                    give_up(n, "mount", e)
            for part in workload.parts():
                for n in order:
                    t = targets[n]
                    if n in failed:
                        continue
                    try:
                        for other in order:
                            if other not in failed:
                                targets[other].settle()
                        os.sync()  # no target pays for another's writeback
                        part(t, res[n])
                    except Exception as e:
                        give_up(n, part.__name__, e)
            for n in order:
                if n in failed:
                    continue
                t = targets[n]
                try:
                    running.remove(t)
                    t.stop()
                    t.teardown()
                except Exception as e:
                    give_up(n, "unmount", e)
                    continue
                if t.rss:
                    res[n][RSS_ROW] = t.rss / MiB
                results[n].append(res[n])
            print(f"round {round_no + 1}/{args.repeat} done", file=sys.stderr)
        names = [n for n in names if n not in failed]
        med = {
            n: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for n, rs in results.items()
            if n not in failed
        }
        print(
            f"\nmedians of {args.repeat}; seq {seq_mib} MiB, "
            f"{rand_ops} random 4 KiB ops on a 64 MiB file, {small} small files, "
            f"tar -x of {entries} entries; vault options {opts or '(layer defaults)'}"
        )
        if cold_ok:
            print("cold = sync, unmount (daemon exits), drop_caches 3, mount; plain, nullfs: sync + drop")
        else:
            print("not root: drop_caches failed, so 'cold' rows only remount (page cache kept)")
        print("\n".join(report(med, names, args.markdown)))
    finally:
        for t in list(running):
            discard(t, running)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _in_mount_table(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def discard(t: Target, running: list[Target]) -> None:
    """Unmount and remove a target after an error, whatever state it is in."""
    if t in running:
        running.remove(t)
        try:
            t.stop()
        except Exception as e:
            print(f"bench/run.py: cleaning up {t.name}: {e}", file=sys.stderr)
    # The mount table, not os.path.ismount: a daemon that died leaves a dead mount, whose
    # stat fails.
    if _in_mount_table(t.mp):
        subprocess.run(["fusermount3", "-u", "-z", str(t.mp)], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        t.teardown()


if __name__ == "__main__":
    sys.exit(main())
