"""In-process throughput of the object store (not a test).

    .venv/bin/python bench/store_throughput.py [--mib 256] [--dir /tmp]

Prints MB/s for 1 MiB sequential writes (including the final commit and its fdatasync),
cold reads (clean cache dropped: decrypt from the page cache), warm re-reads, random 4 KiB
reads/writes, small-file creation, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kryptvault.container.layout import Layout
from kryptvault.container.store import ObjectStore
from kryptvault.crypto.secret import Secret


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--into", action="store_true",
                    help="patch Aead.seal_into/open_into in (proposed zero-copy AEAD API)")
    args = ap.parse_args()
    if args.into:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_store_support import install_aead_into

        install_aead_into()
    mib = 1 << 20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "bench.kv")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        layout, vid = Layout(), uuid.uuid4()
        dk, mk = Secret.random(32), Secret.random(32)
        store = ObjectStore.create(fd, layout, vid, dk, mk)
        oid = store.allocate_oid()
        chunk = os.urandom(mib)

        t0 = time.perf_counter()
        for i in range(args.mib):
            store.write(oid, 0, i * mib, chunk)
        t_buf = time.perf_counter() - t0
        store.commit()
        t_all = time.perf_counter() - t0
        print(f"seq write 1 MiB x {args.mib}: {args.mib / t_all:8.0f} MB/s incl. commit "
              f"(write() calls alone {args.mib / t_buf:.0f} MB/s)")

        store.close()
        store = ObjectStore.open(fd, layout, vid, dk, mk)
        t0 = time.perf_counter()
        for i in range(args.mib):
            data = store.read(oid, 0, i * mib, mib)
        t = time.perf_counter() - t0
        assert data == chunk
        print(f"seq read  1 MiB (cold cache, decrypt): {args.mib / t:8.0f} MB/s")
        warm = min(args.mib, 24)
        for i in range(warm):
            store.read(oid, 0, i * mib, mib)
        t0 = time.perf_counter()
        for _ in range(4):
            for i in range(warm):
                store.read(oid, 0, i * mib, mib)
        t = time.perf_counter() - t0
        print(f"seq read  1 MiB (warm block cache):    {4 * warm / t:8.0f} MB/s")

        rnd = random.Random(1)
        size = args.mib * mib
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            store.read(oid, 0, rnd.randrange(size // 4096) * 4096, 4096)
        t = time.perf_counter() - t0
        print(f"random 4 KiB reads:  {n / t:8.0f} ops/s")
        small = os.urandom(4096)
        t0 = time.perf_counter()
        for _ in range(n):
            store.write(oid, 0, rnd.randrange(size // 4096) * 4096, small)
        store.commit()
        t = time.perf_counter() - t0
        print(f"random 4 KiB writes: {n / t:8.0f} ops/s (incl. commit)")

        t0 = time.perf_counter()
        for i in range(args.files):
            f = store.allocate_oid()
            store.write(f, 0, 0, small[: 100 + i % 3000])
            store.set_attrs(f, bytes(128))
        store.commit()
        t = time.perf_counter() - t0
        print(f"small files created: {args.files / t:8.0f} files/s (incl. commit)")
        t0 = time.perf_counter()
        store.close()
        store = ObjectStore.open(fd, layout, vid, dk, mk)
        print(f"open (walk {store.statfs().objects} objects): {time.perf_counter() - t0:.3f} s")
        store.close()
        os.close(fd)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
