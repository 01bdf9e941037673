"""Crash safety: kill the writer after its N-th write (or drop unsynced writes, as a power
cut would) and check the container opens to exactly one committed snapshot."""

from __future__ import annotations

import os
import random
import shutil
import traceback
from collections.abc import Callable

import pytest
from store_support import DEFAULT, SMALL, Vault, pattern, snapshot

from kryptvault.container.commit import SEALED_SIZE
from kryptvault.container.layout import Layout
from kryptvault.container.store import CRASH_ENV, ObjectStore

Snapshot = dict[int, tuple[bytes, bytes, bytes]]


def workload(store: ObjectStore, on_commit: Callable[[int], None], seed: int, steps: int,
             max_off: int) -> None:
    """A deterministic mix of allocs, writes, truncates, frees, attrs and commits."""
    rnd = random.Random(seed)
    oids: list[int] = []
    for step in range(steps):
        r = rnd.random()
        if not oids or r < 0.12:
            oids.append(store.allocate_oid())
        elif r < 0.6:
            oid = rnd.choice(oids)
            off = rnd.choice([0, rnd.randrange(max_off), store.stream_size(oid, 0)])
            n = rnd.choice([1, 100, 5000, 70_000, rnd.randrange(1, 200_000)])
            store.write(oid, rnd.randrange(2) if r < 0.2 else 0, off, pattern(step, n))
        elif r < 0.72:
            oid = rnd.choice(oids)
            size = store.stream_size(oid, 0)
            store.truncate(oid, 0, rnd.choice([0, size // 2, size + 10_000, rnd.randrange(max_off)]))
        elif r < 0.78:
            store.set_attrs(rnd.choice(oids), bytes([step & 0xFF]) * 128)
        elif r < 0.84 and len(oids) > 1:
            store.free_oid(oids.pop(rnd.randrange(len(oids))))
        else:
            on_commit(store.commit())
    on_commit(store.commit())


def _reference(vault: Vault, template: bytes, seed: int, steps: int, max_off: int,
               dirty_limit: int) -> tuple[dict[int, Snapshot], int]:
    vault.path.write_bytes(template)
    store = vault.open(dirty_limit=dirty_limit)
    snaps: dict[int, Snapshot] = {store.generation: snapshot(store)}

    def record(gen: int) -> None:
        snaps[gen] = snapshot(store)

    workload(store, record, seed, steps, max_off)
    writes = store._writes
    store.close()
    return snaps, writes


def _crash_run(vault: Vault, template: bytes, n: int, side: str, seed: int, steps: int,
               max_off: int, dirty_limit: int) -> int:
    vault.path.write_bytes(template)
    if os.path.exists(side):
        os.unlink(side)
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.environ[CRASH_ENV] = str(n)
            store = vault.open(dirty_limit=dirty_limit)
            fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            workload(store, lambda gen: os.write(fd, b"%d\n" % gen), seed, steps, max_off)
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _check_recovered(vault: Vault, snaps: dict[int, Snapshot], side: str, n: int, *,
                     continue_writing: bool) -> int:
    recorded = [int(x) for x in open(side).read().split()] if os.path.exists(side) else []
    last = recorded[-1] if recorded else min(snaps)
    store = vault.open()
    try:
        gen = store.generation
        assert last <= gen <= last + 1, (n, last, gen)
        assert store.open_damage == [], (n, store.open_damage)
        assert snapshot(store) == snaps[gen], f"crash after write {n}: generation {gen} differs"
        assert store.verify() == [], n
        st = store.statfs()
        assert st.free_units + st.used_units == st.total_units
        if continue_writing:  # the recovered free-space map must not clobber live data
            oid = store.allocate_oid()
            store.write(oid, 0, 0, pattern(7, 300_000))
            store.commit()
            store.close()
            store = vault.open()
            assert store.verify() == []
            expect = dict(snaps[gen])
            assert {k: v for k, v in snapshot(store).items() if k != oid} == expect
            assert store.read(oid, 0, 0, 300_000) == pattern(7, 300_000)
        return gen
    finally:
        store.close()


def _template(vault: Vault) -> bytes:
    store = vault.create()
    store.close()
    return vault.path.read_bytes()


CASES = {
    # name: (layout, seed, steps, max_off, dirty_limit, every N?)
    "small-4k-every-write": (SMALL, 11, 160, 600_000, 150_000, True),
    "bigger-64k-spread": (DEFAULT, 5, 400, 3_000_000, 1_000_000, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kill_after_every_nth_write(tmp_path, case) -> None:
    layout, seed, steps, max_off, dirty_limit, every = CASES[case]
    vault = Vault(tmp_path / "c", layout)
    template = _template(vault)
    snaps, total = _reference(vault, template, seed, steps, max_off, dirty_limit)
    assert len(snaps) >= 5 and total > 20
    if every:
        points = list(range(1, total + 2))
    else:
        points = sorted({1, 2, 3, total, total + 1} | set(random.Random(1).sample(range(1, total), 55)))
    side = str(tmp_path / "side")
    seen_gens = set()
    for i, n in enumerate(points):
        code = _crash_run(vault, template, n, side, seed, steps, max_off, dirty_limit)
        assert code == (0 if n > total else 75), (n, code)
        seen_gens.add(_check_recovered(vault, snaps, side, n, continue_writing=i % 7 == 0))
    assert len(seen_gens) >= 4  # the crash points really landed in different transactions
    vault.close_fds()


class _LoggingStore(ObjectStore):
    """Records every write, file growth and sync, in order, for the power-cut simulation."""

    log: list[tuple[str, int, bytes]]

    def _pwrite(self, bufs, offset):  # type: ignore[override]
        self.log.append(("w", offset, b"".join(bytes(b) for b in bufs)))
        super()._pwrite(bufs, offset)

    def _grow_file(self, size: int) -> None:
        self.log.append(("t", size, b""))
        super()._grow_file(size)

    def _sync(self) -> None:
        self.log.append(("s", 0, b""))
        super()._sync()


def test_power_cut_loses_unsynced_writes(tmp_path) -> None:
    """Rebuild images in which every write before the last completed sync survived and an
    arbitrary subset of the later ones did (some of them torn); each must open to the
    newest commit whose record fully reached the disk, with exactly its contents."""
    layout: Layout = SMALL
    vault = Vault(tmp_path / "c", layout)
    template = _template(vault)
    vault.path.write_bytes(template)
    _LoggingStore.log = []
    fd = os.open(vault.path, os.O_RDWR)
    from kryptvault.crypto.secret import Secret
    store = _LoggingStore.open(fd, layout, vault.uuid, Secret.from_bytes(vault.data_key),
                               Secret.from_bytes(vault.meta_key), dirty_limit=150_000)
    snaps: dict[int, Snapshot] = {store.generation: snapshot(store)}
    commit_writes: dict[int, int] = {}  # log index of each commit record write -> generation

    def record(gen: int) -> None:
        if gen not in snaps:
            idx = max(i for i, e in enumerate(_LoggingStore.log) if e[0] == "w" and e[1] < layout.data_offset)
            commit_writes[idx] = gen
        snaps[gen] = snapshot(store)

    workload(store, record, 23, 120, 600_000)
    store.close()
    os.close(fd)
    log = list(_LoggingStore.log)
    syncs = [i for i, e in enumerate(log) if e[0] == "s"]
    rnd = random.Random(3)
    checked = 0
    for k, sync_at in enumerate([-1, *syncs]):
        end = syncs[k] if k < len(syncs) else len(log)  # the next sync (not reached)
        durable = range(0, sync_at + 1)
        volatile = [i for i in range(sync_at + 1, end) if log[i][0] == "w"]
        for trial in range(3):
            keep = {i for i in volatile if rnd.random() < 0.5}
            torn = rnd.choice(volatile) if volatile and trial == 2 else None
            image = bytearray(template)
            expect_gen = min(snaps)
            for i in range(end):
                kind, off, data = log[i]
                if kind == "t":
                    if len(image) < off:
                        image.extend(bytes(off - len(image)))
                    continue
                if kind != "w" or (i not in durable and i not in keep and i != torn):
                    continue
                if i == torn and i not in durable:
                    data = data[: rnd.randrange(len(data))] if len(data) > 1 else b""
                if i in commit_writes and len(data) >= SEALED_SIZE:  # only 284 bytes matter
                    expect_gen = max(expect_gen, commit_writes[i])
                if len(image) < off + len(data):
                    image.extend(bytes(off + len(data) - len(image)))
                image[off : off + len(data)] = data
            # commits reached by earlier completed syncs are durable whatever happens now
            vault.path.write_bytes(bytes(image))
            reopened = vault.open()
            try:
                assert reopened.generation == expect_gen, (k, trial)
                assert reopened.open_damage == []
                assert snapshot(reopened) == snaps[expect_gen], (k, trial)
                assert reopened.verify() == []
            finally:
                reopened.close()
            checked += 1
    assert checked > 30
    vault.close_fds()


def test_copy_of_template_is_pristine(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    template = _template(vault)
    shutil.copyfile(vault.path, tmp_path / "d")
    assert (tmp_path / "d").read_bytes() == template
    vault.close_fds()
