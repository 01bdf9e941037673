"""compact: a vault that once held 50 MiB and now holds 5 shrinks to its live size, and
every file, attribute, xattr, link count and inode number survives byte for byte."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import PASSWORD, make_vault, run_cli, run_process
from store_support import snapshot as store_snapshot
from test_fsck import (
    BS,
    LAYOUT,
    MIB,
    US,
    Vault,
    block_run,
    build,
    check_path,
    flip_byte,
    locate,
    rand,
    snapshot,
    write_file,
)

from kryptvault.container.groups import GroupGeometry, changed_chunks_since
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import StoreKeys, store_keys
from kryptvault.crypto.secret import Secret
from kryptvault.errors import IntegrityError
from kryptvault.fs import Filesystem
from kryptvault.fs.compact import compact, tree_order

GEOM = GroupGeometry(LAYOUT.block_size, LAYOUT.unit_size)


def churn(v: Vault, keep: int = 1) -> None:
    """Write 50 MiB in ten files, then delete nine of them (45 MiB)."""
    store = v.open()
    fs = Filesystem(store)
    big = fs.mkdir(1, b"big", 0o700, 1000, 1000).ino
    for i in range(10):
        write_file(fs, big, f"chunk{i}".encode(), rand(500 + i, 5 * MIB))
    fs.commit()
    for i in range(10 - keep):
        fs.unlink(big, f"chunk{i}".encode())
    fs.commit()
    fs.close()
    store.close()


def live_units(v: Vault) -> int:
    store = v.open(read_only=True)
    try:
        s = store.statfs()
        return s.used_units
    finally:
        store.close()


def run_compact(v: Vault, dest: Path) -> object:
    src = os.open(v.path, os.O_RDONLY)
    dst = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        keys = StoreKeys(Secret.from_bytes(v.data_key), Secret.from_bytes(v.meta_key))
        return compact(src, dst, LAYOUT, v.uuid, keys)
    finally:
        os.close(src)
        os.close(dst)


@pytest.fixture()
def churned(
    tmp_path: Path,
) -> tuple[Vault, dict[str, tuple[object, ...]], dict[int, tuple[bytes, bytes, bytes]]]:
    tree = build(tmp_path)
    v = tree.vault
    churn(v)
    store = v.open()
    fs = Filesystem(store)
    before = snapshot(fs)
    fs.close()
    raw = store_snapshot(store)
    store.close()
    return v, before, raw


def test_compaction_shrinks_to_live_size_and_keeps_everything(
    churned: tuple[Vault, dict[str, tuple[object, ...]], dict[int, tuple[bytes, bytes, bytes]]],
    tmp_path: Path,
) -> None:
    v, before, raw = churned
    old = check_path(v)
    size_before = v.path.stat().st_size
    assert size_before > 50 * MIB
    live = live_units(v)  # live blocks + descriptors
    dest = tmp_path / "compacted.kv"
    stats = run_compact(v, dest)
    assert stats.bytes_before == size_before  # type: ignore[attr-defined]
    assert stats.bytes_after == dest.stat().st_size  # type: ignore[attr-defined]
    # tightly packed: the live units and a few table re-seals, nothing like 45 MiB. Each
    # metadata block (table, indirect and directory blocks) has a second copy at copy 1's
    # offset in another chunk (FORMAT.md §4.2): a small block can leave up to a chunk
    # free before it, and the table re-seals come in pairs; a handful of chunks here.
    slack = 8 * BS
    assert stats.bytes_after <= LAYOUT.unit_offset(live) + slack  # type: ignore[attr-defined]
    assert stats.bytes_after < 6.5 * MIB  # type: ignore[attr-defined]
    assert dest.read_bytes()[:32768] == v.path.read_bytes()[:32768]  # both header copies

    store = v.open(dest, read_only=True)
    try:
        assert not store.open_damage
        assert store_snapshot(store) == raw  # every object, same oid, attrs, both streams
        s = store.statfs()
        assert s.free_units * US < slack
        assert store.generation > old.summary.generation
    finally:
        store.close()
    new = check_path(v, dest)
    assert new.clean and new.problems == []
    assert new.summary.file_bytes == old.summary.file_bytes
    store = v.open(dest)
    fs = Filesystem(store)
    try:
        after = snapshot(fs)
    finally:
        fs.close()
        store.close()
    assert after == before  # stat (ino, nlink, times, owner, mode, size), content, xattrs
    assert after["/hardlink"][0].nlink == 2  # type: ignore[attr-defined]
    assert after["/hardlink"][0].ino == after["/docs/small.txt"][0].ino  # type: ignore[attr-defined]


def test_compacted_files_are_contiguous_in_tree_order_and_the_vault_keeps_working(
    churned: tuple[Vault, dict[str, tuple[object, ...]], dict[int, tuple[bytes, bytes, bytes]]],
    tmp_path: Path,
) -> None:
    v, _before, raw = churned
    dest = tmp_path / "compacted.kv"
    run_compact(v, dest)
    store = v.open(dest)
    try:
        order = tree_order(store, store.iter_oids())
        starts = []
        for oid in order:
            size = store.stream_size(oid, 0)
            runs = []
            for index in range(-(-size // BS)):
                with contextlib.suppress(AssertionError):  # holes (sparse file)
                    runs.append(block_run(store, oid, 0, 0, index))
            for (u1, n1), (u2, _n2) in itertools.pairwise(runs):
                assert u2 == u1 + n1, f"object {oid}: blocks not contiguous"
            if runs and stat.S_ISREG(int.from_bytes(raw[oid][0][:4], "little")):
                starts.append(runs[0][0])
        assert starts == sorted(starts)  # files laid out in directory-tree order
        # the compacted vault is an ordinary vault: it grows and commits again
        fs = Filesystem(store)
        write_file(fs, 1, b"after-compaction", rand(1, 3 * MIB))
        fs.commit()
        fs.close()
    finally:
        store.close()
    report = check_path(v, dest)
    assert report.clean and report.problems == []


def test_backups_see_every_chunk_of_the_compacted_container_as_changed(
    churned: tuple[Vault, dict[str, tuple[object, ...]], dict[int, tuple[bytes, bytes, bytes]]],
    tmp_path: Path,
) -> None:
    v, _before, _raw = churned
    generation = check_path(v).summary.generation
    dest = tmp_path / "compacted.kv"
    run_compact(v, dest)
    assert changed_chunks_since(dest, LAYOUT, generation) == [(0, dest.stat().st_size)]
    # the encryption count (nonce budget of the unchanged data key) carries over
    src = v.open(read_only=True)
    new = v.open(dest, read_only=True)
    try:
        assert new.encryptions > src.encryptions
    finally:
        src.close()
        new.close()


def test_a_damaged_vault_is_not_compacted(tmp_path: Path) -> None:
    tree = build(tmp_path)
    v = tree.vault
    unit, _ = locate(v, tree.ino["/photos/p1.jpg"], 0, 0, 1)
    flip_byte(v.path, unit)
    with pytest.raises(IntegrityError, match="fsck --repair"):
        run_compact(v, tmp_path / "compacted.kv")


def test_hole_whose_pointer_straddles_the_stored_length_reads_as_zeros(tmp_path: Path) -> None:
    v = Vault(tmp_path / "v.kv")
    store = v.create()
    fs = Filesystem.mkfs(store, 0, 0)
    ino = write_file(fs, 1, b"sparse", b"")
    fh = fs.open(ino, os.O_WRONLY)
    fs.write(fh, 0, b"a" * 100)
    fs.write(fh, 100 * BS, b"b" * 100)  # slot 100: the indirect block is stored in one unit
    fs.release(fh)
    fs.truncate(ino, 200 * BS)  # slot 102 (bytes 4080..4119) straddles the unit
    fs.commit()
    fs.close()
    store.close()
    store = v.open()
    try:
        assert store.read(ino, 0, 102 * BS, 10) == bytes(10)
    finally:
        store.close()


# ---------------------------------------------------------------------- CLI
@contextlib.contextmanager
def cli_vault(fx: object) -> Iterator[Filesystem]:
    from kryptvault.session.unlock import unlock_container

    path = fx.container  # type: ignore[attr-defined]
    with unlock_container(
        path,
        token_spec=str(fx.token),  # type: ignore[attr-defined]
        ask_password=lambda: Secret.from_bytes(PASSWORD.encode()),
    ) as unlocked:
        keys = store_keys(unlocked.master, unlocked.vault_uuid)
        fd = os.open(path, os.O_RDWR)
        try:
            store = ObjectStore.open(fd, unlocked.header.layout, unlocked.vault_uuid, keys.data, keys.meta)
            fs = Filesystem(store)
            try:
                yield fs
                fs.commit()
            finally:
                fs.close()
                store.close()
        finally:
            os.close(fd)
            keys.wipe()


def test_cli_compact_swaps_in_the_small_container(tmp_path: Path) -> None:
    fx = make_vault(tmp_path)
    with cli_vault(fx) as fs:
        d = fs.mkdir(1, b"keep", 0o700, 0, 0).ino
        f = write_file(fs, d, b"file", rand(3, 70_000))
        fs.link(f, 1, b"alias")
        fs.symlink(1, b"sym", b"keep/file", 0, 0)
        fs.setxattr(f, b"user.k", b"v")
        for i in range(10):
            write_file(fs, 1, f"big{i}".encode(), rand(40 + i, 5 * MIB))
        fs.commit()
        for i in range(9):
            fs.unlink(1, f"big{i}".encode())
    with cli_vault(fx) as fs:
        before = snapshot(fs)
    size_before = fx.container.stat().st_size
    header = fx.container.read_bytes()[:32768]

    proc = run_process("compact", fx.container, *fx.pw())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"compacted {fx.container}: ")
    size_after = fx.container.stat().st_size
    assert size_before > 50 * MIB and size_after < 6 * MIB
    assert fx.container.read_bytes()[:32768] == header
    assert not list(tmp_path.glob(".vault.kv.kv-*"))
    with cli_vault(fx) as fs:
        assert snapshot(fs) == before

    result = run_cli("compact", fx.container, *fx.pw(), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["bytes_before"] == size_after and record["bytes_after"] <= size_after
    assert run_cli("fsck", fx.container, *fx.pw()).exit_code == 0


def test_unlinked_leftovers_are_not_copied(tmp_path: Path) -> None:
    from kryptvault.fs.inode import Inode

    tree = build(tmp_path)
    v = tree.vault
    store = v.open()
    leftover = store.allocate_oid()
    store.set_attrs(leftover, Inode(leftover, stat.S_IFREG | 0o600, 0, 0, 0, 1).pack())
    store.write(leftover, 0, 0, rand(8, 3 * MIB))
    store.commit()
    store.close()
    dest = tmp_path / "compacted.kv"
    stats = run_compact(v, dest)
    assert stats.objects == 13  # type: ignore[attr-defined]  # the tree (test_fsck) without the leftover
    store = v.open(dest, read_only=True)
    try:
        assert leftover not in set(store.iter_oids())
    finally:
        store.close()
    assert check_path(v, dest).problems == []
