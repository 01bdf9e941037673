#!/usr/bin/env python3
"""Which FUSE requests each daemon receives per small file created, counted with strace.

    .venv/bin/python bench/census.py [--files 200] [--targets vault,nullfs,gocryptfs]

bench/run.py's "small create" row opens, writes 2 KiB to and closes each new file from
Python. Its ratio depends on how many requests the kernel sends per file and how long
each takes; this counts the first. strace is attached to the daemon after its mount and
its 20 directories are made, decodes the opcode of every request the daemon reads from
/dev/fuse while the files are created (the same way as in run.py), and prints the
requests per file by opcode. Every request counts here, including the ones the program
does not wait for (RELEASE) and the ones answered with an error (the ioctl that Python's
open() makes to ask whether the file is a terminal, the look-up of security.capability
before a file's first write), which a timer inside a daemon's request handlers misses.
Needs strace and permission to trace the daemon (root, or the same user with ptrace
allowed).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import GocryptfsTarget, NullfsTarget, Target, VaultTarget

from kryptvault.fuseadapter import wire

# The requests a create-write-close can cause, named as in kryptvault's protocol table.
OPCODES = {
    getattr(wire, name): name
    for name in ("LOOKUP", "FORGET", "GETATTR", "SETATTR", "OPEN", "READ", "WRITE", "RELEASE", "FSYNC",
                 "GETXATTR", "FLUSH", "CREATE", "IOCTL", "BATCH_FORGET", "FALLOCATE")
}  # fmt: skip
# strace -f -xx: "PID read(FD, "\x..", N) = M", or split in two lines when threads
# interleave: "PID read(FD, <unfinished ...>" ... "PID <... read resumed>"\x..", N) = M".
_BYTES = r'(?:\[\{iov_base=)?"((?:\\x[0-9a-f]{2})+)"'
_CALL = re.compile(r"^(\d+)\s+(?:read|readv)\((\d+),\s*(?:" + _BYTES + r"|<unfinished)")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (?:read|readv) resumed>\s*" + _BYTES)
_HEADER = 8  # len u32, opcode u32: the start of struct fuse_in_header


def fuse_fds(pid: int) -> set[int]:
    """The daemon's descriptors of /dev/fuse (its threads share one descriptor table)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "/dev/fuse":
                found.add(int(fd.name))
        except OSError:
            continue
    return found


def opcodes(trace: Path, fds: set[int]) -> collections.Counter[str]:
    """The opcode of every request read from `fds` in an `strace -f -xx` log."""
    counts: collections.Counter[str] = collections.Counter()
    waiting: dict[str, int] = {}  # thread -> descriptor of its unfinished read
    for line in trace.read_text(errors="replace").splitlines():
        data: str | None = None
        call = _CALL.match(line)
        if call is not None:
            tid, fd, data = call.group(1), int(call.group(2)), call.group(3)
            if data is None:
                waiting[tid] = fd
                continue
        else:
            resumed = _RESUMED.match(line)
            if resumed is None:
                continue
            tid, data = resumed.group(1), resumed.group(2)
            fd = waiting.pop(tid, -1)
        if fd not in fds:
            continue
        raw = bytes.fromhex(data.replace("\\x", ""))
        if len(raw) >= _HEADER:
            op = int.from_bytes(raw[4:8], "little")
            counts[OPCODES.get(op, f"opcode {op}")] += 1
    return counts


def census(t: Target, files: int) -> collections.Counter[str]:
    t.setup()
    t.start()
    try:
        pid = t.daemon_pid()
        assert pid is not None
        top = t.mp / "small"
        top.mkdir()
        for d in range(20):
            (top / f"d{d}").mkdir()
        log = t.work / f"{t.name}.strace"
        tracer = subprocess.Popen(
            ["strace", "-f", "-xx", "-s", str(_HEADER), "-e", "trace=read,readv", "-o", str(log),
             "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # attached to every thread before the first file
        payload = os.urandom(2048)
        for i in range(files):
            with open(top / f"d{i % 20}" / f"file{i}.txt", "wb") as f:
                f.write(payload)
        time.sleep(0.5)  # RELEASE is sent after close() returns
        tracer.terminate()
        tracer.wait()
        return opcodes(log, fuse_fds(pid))
    finally:
        t.stop()
        t.teardown()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--targets", default="vault,nullfs,gocryptfs")
    ap.add_argument("--dir", default=os.environ.get("KV_BENCH_DIR", "/var/tmp"))
    args = ap.parse_args()
    if shutil.which("strace") is None:
        print("census: strace is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kv-census-", dir=args.dir))

    def make(name: str) -> Target:
        if name == "vault":
            return VaultTarget(work, {})
        return NullfsTarget(work) if name == "nullfs" else GocryptfsTarget(work)

    try:
        results = {}
        for name in args.targets.split(","):
            if name not in ("vault", "nullfs", "gocryptfs"):
                print(f"census: unknown target {name!r}", file=sys.stderr)
                return 2
            results[name] = census(make(name), args.files)
        ops = sorted({op for c in results.values() for op in c})
        print(f"requests per small file ({args.files} files created, opened, written, closed)")
        print("| opcode | " + " | ".join(results) + " |")
        print("|---|" + "---|" * len(results))
        rows = [(op, [c[op] for c in results.values()]) for op in ops]
        rows.append(("total", [sum(c.values()) for c in results.values()]))
        for label, counts in rows:
            print(f"| {label} | " + " | ".join(f"{n / args.files:.2f}" for n in counts) + " |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
