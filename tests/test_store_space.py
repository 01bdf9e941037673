"""Free-space reuse, statfs, change tables for key-less incremental backup, backup holds."""

from __future__ import annotations

import os
import shutil

from store_support import DEFAULT, Vault, pattern, snapshot

from kryptvault.container.groups import GroupGeometry
from kryptvault.container.store import changed_chunks_since

MIB = 1 << 20


def test_write_delete_cycles_do_not_grow_the_container(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    chunk = os.urandom(MIB)
    live = 50 * MIB
    sizes = []
    for cycle in range(5):
        oid = store.allocate_oid()
        for i in range(50):
            store.write(oid, 0, i * MIB, chunk)
        store.commit()
        store.free_oid(oid)
        store.commit()
        sizes.append(os.path.getsize(vault.path))
        st = store.statfs()
        assert st.pending_units == 0 and st.free_units + st.used_units == st.total_units
    assert max(sizes) < 2 * live, sizes
    assert sizes[-1] == sizes[1]  # steady state: no growth at all
    # overwrite-in-place cycles need old + new until the commit, no more
    oid = store.allocate_oid()
    for cycle in range(4):
        for i in range(50):
            store.write(oid, 0, i * MIB, chunk)
        store.commit()
    assert os.path.getsize(vault.path) < 2 * live + 16 * MIB
    st = store.statfs()
    assert st.used_units * st.unit_size < live + 2 * MIB
    store.close()
    vault.close_fds()


def test_freed_units_wait_for_the_commit(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    store.write(oid, 0, 0, pattern(1, 4 * MIB))
    store.commit()
    before = store.statfs()
    store.truncate(oid, 0, 0)
    mid = store.statfs()
    assert mid.free_units == before.free_units  # not reusable before the commit
    assert mid.pending_units >= 4 * MIB // 4096
    store.commit()
    after = store.statfs()
    assert after.free_units >= before.free_units + 4 * MIB // 4096
    assert after.objects == 1 and after.container_bytes == os.path.getsize(vault.path)
    store.close()
    vault.close_fds()


def _ranges_total(ranges) -> int:
    return sum(n for _o, n in ranges)


def test_changed_chunks_since_is_small_and_sufficient(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create(dirty_limit=16 * MIB)
    oid = store.allocate_oid()
    chunk = os.urandom(MIB)
    for i in range(256):
        store.write(oid, 0, i * MIB, chunk)
    base = store.commit()
    backup = tmp_path / "backup"
    shutil.copyfile(vault.path, backup)  # the full backup at generation `base`

    store.write(oid, 0, 100 * MIB + 5, pattern(9, MIB))
    store.commit()
    ranges = changed_chunks_since(str(vault.path), DEFAULT, base)
    assert _ranges_total(ranges) < 8 * MIB, ranges
    assert ranges[0][0] == 0 and ranges[0][1] >= DEFAULT.data_offset  # header + commit slots
    everything = changed_chunks_since(str(vault.path), DEFAULT, 0)
    assert _ranges_total(everything) >= 256 * MIB
    # incremental backup without the key: copy the changed ranges over the old backup
    size = os.path.getsize(vault.path)
    with open(vault.path, "rb") as src, open(backup, "r+b") as dst:
        dst.truncate(size)
        for off, n in ranges:
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(n))
    assert backup.read_bytes() == vault.path.read_bytes()
    store.close()
    vault.close_fds()


def test_torn_descriptor_means_whole_group(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create()
    oid = store.allocate_oid()
    store.write(oid, 0, 0, pattern(1, 3 * MIB))
    gen = store.commit()
    store.close()
    with open(vault.path, "r+b") as f:
        f.seek(DEFAULT.data_offset + 100)
        f.write(b"\xff")
    ranges = changed_chunks_since(str(vault.path), DEFAULT, gen)
    size = os.path.getsize(vault.path)
    group_bytes = GroupGeometry(DEFAULT.block_size, DEFAULT.unit_size).units_per_group * 4096
    assert ranges == [(0, min(size, DEFAULT.data_offset + group_bytes))]
    # the store itself does not care: the descriptor is a hint, rewritten at the next commit
    store = vault.open()
    store.write(oid, 0, 0, b"x")
    store.commit()
    now = changed_chunks_since(str(vault.path), DEFAULT, store.generation)
    assert _ranges_total(now) == DEFAULT.data_offset
    store.close()
    vault.close_fds()


def test_hold_reuse_keeps_a_live_backup_consistent(tmp_path) -> None:
    vault = Vault(tmp_path / "c")
    store = vault.create(dirty_limit=2 * MIB)
    oids = []
    for i in range(6):
        oid = store.allocate_oid()
        store.write(oid, 0, 0, pattern(i, 3 * MIB + i))
        oids.append(oid)
    store.commit()
    gen = store.hold_reuse()
    expected = snapshot(store)
    with open(vault.path, "rb") as f:
        head = f.read(DEFAULT.data_offset)  # the backup reads header + commit slots first
    # the vault stays writable while the backup copies the data area slowly
    for round_ in range(4):
        for oid in oids[:3]:
            store.write(oid, 0, 0, pattern(round_ + 20, 3 * MIB))
        store.free_oid(oids[-1])
        oids[-1] = store.allocate_oid()
        store.write(oids[-1], 0, 0, pattern(round_ + 40, 2 * MIB))
        store.commit()
    free_while_held = store.statfs().free_units
    copy = tmp_path / "copy"
    copy.write_bytes(head + vault.path.read_bytes()[DEFAULT.data_offset :])
    restored = Vault(copy, DEFAULT, vault.uuid, vault.data_key, vault.meta_key)
    rstore = restored.open()
    assert rstore.generation == gen
    assert rstore.verify() == []
    assert snapshot(rstore) == expected
    rstore.close()
    restored.close_fds()
    store.release_reuse()
    assert store.statfs().free_units > free_while_held
    store.close()
    vault.close_fds()
