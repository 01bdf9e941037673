"""Damage and tampering: flipped bytes, swapped/replayed blocks, torn commit records."""

from __future__ import annotations

import os

import pytest
from store_support import DEFAULT, Vault, pattern, snapshot

from kryptvault.container import pointer as fmt
from kryptvault.container.layout import COMMIT_OFFSETS, COMMIT_SLOT_SIZE
from kryptvault.container.store import BlockIntegrityError, ObjectStore
from kryptvault.errors import IntegrityError

BS = DEFAULT.block_size


def _block_offset(store: ObjectStore, oid: int, stream: int, level: int, index: int) -> tuple[int, int]:
    """(file offset, stored length) of a block in the current state (white-box)."""
    s = store._table if oid == 0 else store._stream(oid, stream)
    ptr = store._ptr_of(s, level, index)
    unit, units, _f, _n, _t = fmt.unpack_pointer(ptr)
    assert unit, "block is a hole"
    return DEFAULT.unit_offset(unit), units * DEFAULT.unit_size


def _copy_offsets(store: ObjectStore, oid: int, stream: int, level: int, index: int) -> list[int]:
    """File offsets of every copy of a block (metadata has two, FORMAT.md §4.2)."""
    s = store._table if oid == 0 else store._stream(oid, stream)
    unit, _units, flags, _n, _t = fmt.unpack_pointer(store._ptr_of(s, level, index))
    assert unit, "block is a hole"
    units = [unit]
    if flags:
        units.append(unit + (flags - 0x10000 if flags & 0x8000 else flags) * (BS // DEFAULT.unit_size))
    return [DEFAULT.unit_offset(u) for u in units]


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _setup(tmp_path, files: int = 3, blocks: int = 5):
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oids = []
    for i in range(files):
        oid = store.allocate_oid()
        store.write(oid, 0, 0, pattern(oid, blocks * BS))
        store.write(oid, 1, 0, b"aux %d" % i)
        oids.append(oid)
    store.commit()
    return vault, store, oids


def test_flipped_data_block_fails_only_its_range(tmp_path) -> None:
    vault, store, (a, b, _c) = _setup(tmp_path)
    off, _n = _block_offset(store, a, 0, 0, 2)
    store.close()
    _flip(vault.path, off + 100)
    store = vault.open()
    assert store.open_damage == []  # data blocks are not read at open
    assert store.read(a, 0, 0, 2 * BS) == pattern(a, 5 * BS)[: 2 * BS]
    assert store.read(a, 0, 3 * BS, 2 * BS) == pattern(a, 5 * BS)[3 * BS :]
    for off_, size in ((2 * BS, 1), (2 * BS - 10, 20), (3 * BS - 1, 1), (0, 5 * BS)):
        with pytest.raises(BlockIntegrityError) as exc:
            store.read(a, 0, off_, size)
        assert (exc.value.oid, exc.value.stream, exc.value.index) == (a, 0, 2)
        assert f"object {a} stream 0" in str(exc.value) and "block 2" in str(exc.value)
    assert isinstance(exc.value, IntegrityError)
    assert store.read(b, 0, 0, 5 * BS) == pattern(b, 5 * BS)
    damage = store.verify()
    assert [(d.oid, d.stream, d.level, d.index) for d in damage] == [(a, 0, 0, 2)]
    store.close()
    vault.close_fds()


def test_indirect_block_with_both_copies_flipped_opens_read_only(tmp_path) -> None:
    vault, store, (a, b, _c) = _setup(tmp_path)
    assert store._stream(a, 0).depth == 1
    offs = _copy_offsets(store, a, 0, 1, 0)
    assert len(offs) == 2
    store.close()
    for off in offs:
        _flip(vault.path, off + 7)
    store = vault.open()
    assert [(d.oid, d.level, d.index) for d in store.open_damage] == [(a, 1, 0)]
    assert store.read_only
    with pytest.raises(BlockIntegrityError) as exc:
        store.read(a, 0, 3 * BS, 10)
    assert (exc.value.oid, exc.value.index) == (a, 3) and "indirect block" in str(exc.value)
    assert store.read(a, 1, 0, 100) == b"aux 0"  # the other stream is fine
    assert store.read(b, 0, 0, 5 * BS) == pattern(b, 5 * BS)
    with pytest.raises(IntegrityError, match="read-only"):
        store.write(b, 0, 0, b"x")
    assert (a, 0, 1, 0) in [(d.oid, d.stream, d.level, d.index) for d in store.verify()]
    store.close()
    vault.close_fds()


def test_object_table_block_with_both_copies_flipped(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    per_block = BS // fmt.ENTRY_SIZE
    for i in range(per_block + 10):
        oid = store.allocate_oid()
        store.write(oid, 0, 0, b"file %d" % oid)
    store.commit()
    offs = _copy_offsets(store, 0, 0, 0, 1)  # entries 256..511
    assert len(offs) == 2
    store.close()
    for off in offs:
        _flip(vault.path, off + 3)
    store = vault.open()
    assert [(d.oid, d.level, d.index) for d in store.open_damage] == [(0, 0, 1)]
    assert store.read(5, 0, 0, 100) == b"file 5"
    assert store.get_attrs(per_block - 1) == bytes(128)
    assert store.oid_in_use(per_block + 3)
    with pytest.raises(BlockIntegrityError) as exc:
        store.read(per_block + 3, 0, 0, 10)
    assert (exc.value.oid, exc.value.index) == (0, 1)
    with pytest.raises(IntegrityError):
        store.get_attrs(per_block + 3)
    assert any(d.oid == 0 and d.index == 1 for d in store.verify())
    store.close()
    vault.close_fds()


def test_swapped_blocks_fail(tmp_path) -> None:
    vault, store, (a, b, _c) = _setup(tmp_path)
    off1, n1 = _block_offset(store, a, 0, 0, 1)
    off2, n2 = _block_offset(store, b, 0, 0, 1)
    assert n1 == n2
    store.close()
    with open(vault.path, "r+b") as f:
        f.seek(off1)
        x = f.read(n1)
        f.seek(off2)
        y = f.read(n2)
        f.seek(off1)
        f.write(y)
        f.seek(off2)
        f.write(x)
    store = vault.open()
    for oid in (a, b):
        with pytest.raises(BlockIntegrityError):
            store.read(oid, 0, BS, 10)
        assert store.read(oid, 0, 0, BS) == pattern(oid, BS)
    assert {(d.oid, d.index) for d in store.verify()} == {(a, 1), (b, 1)}
    store.close()
    vault.close_fds()


def test_replayed_old_block_fails(tmp_path) -> None:
    vault, store, (a, _b, _c) = _setup(tmp_path)
    old_off, n = _block_offset(store, a, 0, 0, 0)
    old = os.pread(store._fd, n, old_off)
    store.write(a, 0, 0, b"new content")
    store.commit()
    new_off, n2 = _block_offset(store, a, 0, 0, 0)
    assert new_off != old_off and n2 == n  # copy-on-write
    store.close()
    with open(vault.path, "r+b") as f:
        f.seek(new_off)
        f.write(old)  # an attacker puts back yesterday's ciphertext
    store = vault.open()
    with pytest.raises(BlockIntegrityError):
        store.read(a, 0, 0, 10)
    store.close()
    vault.close_fds()


def test_garbage_pointer_is_integrity_error(tmp_path) -> None:
    """Even a pointer that authenticated (e.g. a bug) but points outside the container or
    has a bad length yields IntegrityError, never another exception."""
    vault, store, (a, _b, _c) = _setup(tmp_path)
    s = store._stream(a, 0)
    node = store._block_for_write(s, 1, 0)
    node[fmt.POINTER_SIZE : fmt.POINTER_SIZE + 10] = (10**12).to_bytes(8, "little") + b"\x01\x00"
    node[2 * fmt.POINTER_SIZE + 8 : 2 * fmt.POINTER_SIZE + 10] = b"\xff\x00"  # 255 units
    node[3 * fmt.POINTER_SIZE + 10] = 0x80  # unknown flag
    node[4 * fmt.POINTER_SIZE : 4 * fmt.POINTER_SIZE + 8] = bytes(8)  # hole with fields
    for index in (1, 2, 3, 4):
        with pytest.raises(BlockIntegrityError) as exc:
            store.read(a, 0, index * BS, 1)
        assert exc.value.index == index
    store.close()
    vault.close_fds()


def test_torn_commit_record_falls_back_to_other_slot(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    store.write(oid, 0, 0, b"generation two")
    assert store.commit() == 2
    snap2 = snapshot(store)
    store.write(oid, 0, 0, b"generation 3!!")
    assert store.commit() == 3
    store.close()
    slot3 = COMMIT_OFFSETS[3 % 2]
    with open(vault.path, "r+b") as f:
        f.seek(slot3)
        good = f.read(COMMIT_SLOT_SIZE)
        torn = good[:100] + bytes(200) + good[300:]
        for junk in (bytes(COMMIT_SLOT_SIZE), os.urandom(COMMIT_SLOT_SIZE), torn):
            f.seek(slot3)
            f.write(junk)
            f.flush()
            store = vault.open()
            assert store.generation == 2 and snapshot(store) == snap2 and store.verify() == []
            store.close()
        # the other slot holding a valid record of the wrong parity is not accepted either
        f.seek(COMMIT_OFFSETS[0])
        f.write(bytes(COMMIT_SLOT_SIZE))
        f.flush()
        with pytest.raises(IntegrityError, match="commit"):
            vault.open()
        f.seek(slot3)
        f.write(good)
        f.flush()
    store = vault.open()
    assert store.generation == 3 and store.read(oid, 0, 0, 100) == b"generation 3!!"
    store.close()
    vault.close_fds()


def test_commit_record_from_another_vault_is_rejected(tmp_path) -> None:
    """Same keys, different UUID: the commit slot (and every block) is bound to the vault."""
    one = Vault(tmp_path / "one")
    two = Vault(tmp_path / "two", data_key=one.data_key, meta_key=one.meta_key)
    one.create().close()
    two.create().close()
    image = two.path.read_bytes()
    with open(one.path, "r+b") as f:
        for off in COMMIT_OFFSETS:
            f.seek(off)
            f.write(image[off : off + COMMIT_SLOT_SIZE])
    with pytest.raises(IntegrityError):
        one.open()
    one.close_fds()
    two.close_fds()


def test_wrong_block_size_in_header_is_format_error(tmp_path) -> None:
    from kryptvault.container.layout import Layout
    from kryptvault.errors import FormatError

    vault = Vault(tmp_path / "c")
    vault.create().close()
    vault.layout = Layout(block_size=32768)
    with pytest.raises(FormatError):
        vault.open()
    vault.close_fds()


def test_metadata_copies_lie_in_different_halves_of_the_container(tmp_path) -> None:
    vault, store, (a, b, c) = _setup(tmp_path, files=3, blocks=40)
    # A later transaction, as in any vault in use: copy-on-write has freed the first
    # metadata blocks (near the start), and the data went to the end of the file.
    store.write(b, 0, 0, pattern(c, 40 * BS))  # frees b's first blocks at the commit
    store.commit()
    store.write(a, 0, 5 * BS, b"changed")
    store.commit()
    half = os.path.getsize(vault.path) // 2
    for where in ((0, 0, 0, 0), (a, 0, 1, 0)):
        first, second = _copy_offsets(store, *where)
        assert (first < half) != (second < half), (where, first, second, half)
        size = _block_offset(store, *where)[1]
        with open(vault.path, "rb") as f:
            f.seek(first)
            one = f.read(size)
            f.seek(second)
            assert f.read(size) == one  # the same ciphertext: one nonce, one tag
    store.close()
    vault.close_fds()


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("damage", ["flip", "zero"])
def test_one_bad_copy_of_an_indirect_or_table_block_loses_nothing(tmp_path, which: int, damage: str) -> None:
    vault, store, oids = _setup(tmp_path)
    a = oids[0]
    targets = [(a, 0, 1, 0), (0, 0, 0, 0)]
    offs = {t: _copy_offsets(store, *t)[which] for t in targets}
    sizes = {t: _block_offset(store, *t)[1] for t in targets}
    store.close()
    with open(vault.path, "r+b") as f:
        for t, off in offs.items():
            if damage == "flip":
                f.seek(off + 9)
                b = f.read(1)
                f.seek(off + 9)
                f.write(bytes([b[0] ^ 1]))
            else:
                f.seek(off)
                f.write(bytes(sizes[t]))
    store = vault.open()
    assert store.open_damage == [] and not store.read_only
    for i, oid in enumerate(oids):
        assert store.read(oid, 0, 0, 5 * BS) == pattern(oid, 5 * BS)
        assert store.read(oid, 1, 0, 100) == b"aux %d" % i
    assert store.verify() == []  # nothing lost
    assert sorted((d.oid, d.stream, d.level, d.index) for d in store.bad_copies) == sorted(targets)
    assert all(f"copy {which + 1}" in d.reason for d in store.bad_copies)
    assert store.rewrite_bad_copies() == 2
    store.commit()
    store.close()
    store = vault.open()
    assert store.verify() == [] and store.bad_copies == []
    for oid in oids:
        assert store.read(oid, 0, 0, 5 * BS) == pattern(oid, 5 * BS)
    store.close()
    vault.close_fds()
