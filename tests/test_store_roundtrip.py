"""Random writes/truncates/frees against an in-memory model, across commits and reopens."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_support import (
    DEFAULT,
    SMALL,
    Vault,
    install_aead_into,
    pattern,
    remove_aead_into,
)

from kryptvault.container.store import ObjectStore, UnknownObject

MAX_OFF = 900_000  # > 2 levels of tree with 4 KiB blocks (fanout 102 -> 408 KiB per level-1)

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3), st.integers(0, 1),
              st.one_of(st.integers(0, MAX_OFF), st.integers(0, 9000)),
              st.one_of(st.integers(1, 70_000), st.integers(1, 300)), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 3), st.integers(0, 1),
              st.one_of(st.integers(0, MAX_OFF), st.integers(0, 9000))),
    st.tuples(st.just("attrs"), st.integers(0, 3), st.integers(0, 255)),
    st.tuples(st.just("free"), st.integers(0, 3)),
    st.tuples(st.just("commit"),),
    st.tuples(st.just("reopen"),),
    st.tuples(st.just("flush"),),
)


def _apply(store: ObjectStore, model: dict[int, list[bytearray]], slots: list[int | None], o: tuple) -> None:
    kind = o[0]
    if kind in ("write", "truncate", "attrs", "free"):
        i = o[1]
        if slots[i] is None:
            slots[i] = store.allocate_oid()
            model[slots[i]] = [bytearray(128), bytearray(), bytearray()]
        oid = slots[i]
        m = model[oid]
    if kind == "write":
        _, _, stream, off, n, seed = o
        data = pattern(seed, n)
        store.write(oid, stream, off, data)
        buf = m[1 + stream]
        if len(buf) < off + n:
            buf.extend(bytes(off + n - len(buf)))
        buf[off : off + n] = data
    elif kind == "truncate":
        _, _, stream, size = o
        store.truncate(oid, stream, size)
        buf = m[1 + stream]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
    elif kind == "attrs":
        attrs = bytes([o[2]]) * 128
        store.set_attrs(oid, attrs)
        m[0][:] = attrs
    elif kind == "free":
        store.free_oid(oid)
        del model[oid]
        slots[o[1]] = None


def _check(store: ObjectStore, model: dict[int, list[bytearray]]) -> None:
    assert set(store.iter_oids()) == set(model)
    for oid, (attrs, d0, d1) in model.items():
        assert store.get_attrs(oid) == attrs
        for stream, buf in ((0, d0), (1, d1)):
            assert store.stream_size(oid, stream) == len(buf)
            assert store.read(oid, stream, 0, len(buf) + 10) == buf


@pytest.fixture(params=["seal", "seal_into"])
def aead_mode(request):
    """Run with and without the zero-copy Aead.seal_into/open_into entry points."""
    installed = request.param == "seal_into" and install_aead_into()
    yield request.param
    if installed:
        remove_aead_into()


@pytest.mark.parametrize("layout", [SMALL, DEFAULT], ids=["4k", "64k"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_ops_match_model(tmp_path_factory, aead_mode, layout, ops) -> None:
    vault = Vault(tmp_path_factory.mktemp("rt") / "c", layout)
    store = vault.create(dirty_limit=300_000, cache_limit=200_000)
    model: dict[int, list[bytearray]] = {}
    committed: dict[int, list[bytearray]] = {}
    slots: list[int | None] = [None] * 4
    try:
        for o in ops:
            if o[0] == "commit":
                store.commit()
                committed = {k: [bytearray(x) for x in v] for k, v in model.items()}
            elif o[0] == "flush":
                store.flush()
            elif o[0] == "reopen":  # drops uncommitted changes
                store.close()
                store = vault.open(dirty_limit=300_000, cache_limit=200_000)
                model = {k: [bytearray(x) for x in v] for k, v in committed.items()}
                by_oid = sorted(model)
                slots = [None] * 4
                for i, oid in enumerate(by_oid[:4]):
                    slots[i] = oid
            else:
                _apply(store, model, slots, o)
            _check_sample(store, model)
        _check(store, model)
        assert store.verify() == []
        store.commit()
        store.close()
        store = vault.open()
        _check(store, model)
        assert store.open_damage == [] and store.verify() == []
        stats = store.statfs()
        assert stats.free_units + stats.used_units == stats.total_units
    finally:
        store.close()
        vault.close_fds()


def _check_sample(store: ObjectStore, model: dict[int, list[bytearray]]) -> None:
    for oid, (_a, d0, _d1) in model.items():
        assert store.stream_size(oid, 0) == len(d0)
        assert store.read(oid, 0, max(0, len(d0) - 5000), 6000) == d0[max(0, len(d0) - 5000):]


def test_basic_api(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    assert store.generation == 1
    assert store.commit() == 1  # nothing dirty: no-op
    a = store.allocate_oid()
    b = store.allocate_oid()
    assert (a, b) == (1, 2)
    assert store.oid_in_use(a) and not store.oid_in_use(3) and not store.oid_in_use(0)
    assert store.get_attrs(a) == bytes(128)
    assert store.stream_size(a, 0) == 0 and store.read(a, 0, 0, 10) == b""
    store.write(a, 1, 0, b"xattr")
    store.write(a, 0, 10, memoryview(b"abc"))
    assert store.read(a, 0, 0, 100) == bytes(10) + b"abc"
    assert store.read(a, 0, 12, 100) == b"c"
    store.free_oid(a)
    with pytest.raises(UnknownObject):
        store.read(a, 0, 0, 1)
    with pytest.raises(ValueError):
        store.set_attrs(b, b"short")
    assert store.allocate_oid() == a  # lowest free oid is reused
    assert store.commit() == 2
    store.close()
    vault.close_fds()


def test_big_sparse_file_over_4gib(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    far = 6 * 2**30 + 12345
    store.write(oid, 0, far, b"tail")
    store.write(oid, 0, 0, b"head")
    store.commit()
    store.close()
    store = vault.open()
    assert store.stream_size(oid, 0) == far + 4
    assert store.read(oid, 0, far - 2, 10) == b"\0\0tail"
    assert store.read(oid, 0, 3 * 2**30, 5) == bytes(5)
    assert os.path.getsize(vault.path) < 8 * 2**20  # sparse: a few blocks + metadata
    store.truncate(oid, 0, 2)
    store.commit()
    assert store.read(oid, 0, 0, 10) == b"he"
    assert store.verify() == []
    store.close()
    vault.close_fds()


def test_many_objects(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    n = 3000
    for i in range(n):
        oid = store.allocate_oid()
        store.write(oid, 0, 0, i.to_bytes(4, "little") * 25)
        store.set_attrs(oid, bytes([i & 0xFF]) * 128)
    store.commit()
    store.close()
    store = vault.open()
    assert store.statfs().objects == n
    for oid in range(1, n + 1, 97):
        assert store.read(oid, 0, 0, 100) == (oid - 1).to_bytes(4, "little") * 25
        assert store.get_attrs(oid) == bytes([(oid - 1) & 0xFF]) * 128
    # small files cost one 4 KiB unit each, not a 64 KiB block
    assert store.statfs().used_units < n * 1.1 + 200
    store.close()
    vault.close_fds()


def test_dirty_bytes_means_a_commit_is_needed(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create(dirty_limit=1 << 20)
    assert store.dirty_bytes() == 0 and not store.uncommitted
    oid = store.allocate_oid()
    store.commit()
    assert store.dirty_bytes() == 0
    store.truncate(oid, 0, 10_000)  # size only: no block buffer yet
    assert store.dirty_bytes() > 0 and store.uncommitted
    store.commit()
    store.write(oid, 0, 0, pattern(1, 3 << 20))  # passes the dirty limit: flushed, not committed
    assert store.buffered_bytes() <= (1 << 20) + 65536
    assert store.dirty_bytes() >= 2 << 20
    store.flush()
    assert store.buffered_bytes() == 0 and store.dirty_bytes() > 0
    store.commit()
    assert store.dirty_bytes() == 0 and store.buffered_bytes() == 0
    store.close()
    vault.close_fds()


def test_reads_with_a_tiny_cache_and_recycled_buffers(tmp_path, aead_mode) -> None:
    """A read spanning more blocks than the cache holds must not see recycled buffers."""
    vault = Vault(tmp_path / "c")
    store = vault.create(cache_limit=3 * 65536, dirty_limit=4 * 65536)
    a, b = store.allocate_oid(), store.allocate_oid()
    data_a, data_b = pattern(1, 40 * 65536 + 7), pattern(2, 40 * 65536)
    store.write(a, 0, 0, data_a)
    store.write(b, 0, 0, data_b)
    store.commit()
    for _ in range(3):
        assert store.read(a, 0, 0, len(data_a)) == data_a
        store.write(b, 0, 65536 * 5, b"x" * 200_000)  # churns the pool between reads
        assert store.read(b, 0, 0, 65536 * 5) == data_b[: 65536 * 5]
    store.close()
    vault.close_fds()


def test_nonce_budget_refuses_cleanly(tmp_path) -> None:
    from kryptvault.container.store import NONCE_BUDGET, NonceBudgetExhausted

    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    store.write(oid, 0, 0, b"before")
    store.commit()
    store._enc_count = NONCE_BUDGET - 5
    store.write(oid, 0, 0, pattern(3, 20 * 65536))
    with pytest.raises(NonceBudgetExhausted, match="rekey"):
        store.commit()
    store.close()
    store = vault.open()
    assert store.read(oid, 0, 0, 10) == b"before"
    store.close()
    vault.close_fds()


def test_threads_share_one_store(tmp_path) -> None:
    import threading

    vault = Vault(tmp_path / "c")
    store = vault.create(dirty_limit=1 << 20)
    oids = [store.allocate_oid() for _ in range(4)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            oid = oids[k]
            data = pattern(k, 300_000)
            for i in range(20):
                store.write(oid, 0, (i % 5) * 60_000, data[(i % 5) * 60_000 : (i % 5 + 1) * 60_000])
                got = store.read(oid, 0, 0, 300_000)
                assert got == data[: len(got)]
                if i % 7 == k % 7:
                    store.commit()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.commit()
    store.close()
    store = vault.open()
    for k, oid in enumerate(oids):
        assert store.read(oid, 0, 0, 300_000) == pattern(k, 300_000)
    assert store.verify() == []
    store.close()
    vault.close_fds()
