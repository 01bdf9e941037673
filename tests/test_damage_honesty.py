"""Damage is never reported away: fsck --repair counts what it lost, a mount that fails on
damage points at fsck. Real vaults, real mounts, real truncated/corrupted files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cli_helpers import make_vault, run_process

pytestmark = pytest.mark.fuse


def _populate(fx: object, mnt: Path, dirs: int, per_dir: int) -> dict[str, str]:
    """Files in a few directories through a real mount; returns path -> sha256."""
    made: dict[str, str] = {}
    r = run_process("mount", fx.container, mnt, *fx.pw())  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr
    try:
        for d in range(dirs):
            (mnt / f"d{d}").mkdir()
            for i in range(per_dir):
                data = os.urandom(1000 + 997 * ((d * per_dir + i) % 40))
                rel = f"d{d}/f{i}.bin"
                (mnt / rel).write_bytes(data)
                made[rel] = hashlib.sha256(data).hexdigest()
    finally:
        r = run_process("lock", mnt)
        assert r.returncode == 0, r.stderr
    return made


def _survivors(fx: object, mnt: Path, made: dict[str, str]) -> int:
    """Files still at their path with their content (read-only mount)."""
    r = run_process("mount", fx.container, mnt, *fx.pw(), "--read-only")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr
    try:
        ok = 0
        for rel, digest in made.items():
            p = mnt / rel
            try:
                if hashlib.sha256(p.read_bytes()).hexdigest() == digest:
                    ok += 1
            except OSError:
                pass
        return ok
    finally:
        assert run_process("lock", mnt).returncode == 0


def test_truncated_container_repair_counts_what_it_lost_and_exits_3(tmp_path: Path) -> None:
    fx = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = _populate(fx, mnt, dirs=6, per_dir=60)
    size = fx.container.stat().st_size
    os.truncate(fx.container, int(size * 0.4))

    r = run_process("mount", fx.container, mnt, *fx.pw())
    assert r.returncode != 0
    assert r.stderr.startswith("kryptvault: ") and "kryptvault fsck" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

    r = run_process("fsck", fx.container, *fx.pw(), "--repair", "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    record = json.loads(r.stdout)
    rep = record["repair"]
    assert rep["lost_anything"] is True
    reported = rep["lost_entries"] + rep["lost_objects"] + rep["moved_to_lost_found"]
    intact = _survivors(fx, mnt, made)
    # Every file not back intact under its own name is accounted for in the report.
    assert len(made) - intact <= reported, (intact, rep)
    assert reported > 0

    r = run_process("fsck", fx.container, *fx.pw())  # the repaired vault is consistent now
    assert r.returncode == 0, r.stdout + r.stderr



def _table_copies(fx: object) -> list[list[int]]:
    """Unit of each copy of every object-table block (white-box, with the real keys)."""
    from cli_helpers import PASSWORD

    from kryptvault.container import pointer as fmt
    from kryptvault.container.store import ObjectStore
    from kryptvault.container.vault import store_keys
    from kryptvault.crypto.secret import Secret
    from kryptvault.session.unlock import unlock_container

    with unlock_container(
        fx.container,  # type: ignore[attr-defined]
        token_spec=str(fx.token),  # type: ignore[attr-defined]
        ask_password=lambda: Secret.from_bytes(PASSWORD.encode()),
    ) as unlocked:
        keys = store_keys(unlocked.master, unlocked.vault_uuid)
        fd = os.open(fx.container, os.O_RDONLY)  # type: ignore[attr-defined]
        try:
            store = ObjectStore.open(fd, unlocked.header.layout, unlocked.vault_uuid, keys.data, keys.meta)
            upc = unlocked.header.layout.block_size // unlocked.header.layout.unit_size
            out = []
            table = store._table
            for b in range(-(-table.size // unlocked.header.layout.block_size)):
                unit, _n, flags = fmt.unpack_pointer(store._ptr_of(table, 0, b))[:3]
                if unit:
                    ditto = flags - 0x10000 if flags & 0x8000 else flags
                    out.append([unit, unit + ditto * upc] if ditto else [unit])
            store.close()
            return out
        finally:
            os.close(fd)
            keys.wipe()


@pytest.mark.parametrize("copy", [0, 1])
def test_one_damaged_copy_of_every_table_block_loses_no_name_through_a_real_mount(
    tmp_path: Path, copy: int
) -> None:
    fx = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = _populate(fx, mnt, dirs=3, per_dir=120)  # 364 objects: two table blocks
    blocks = _table_copies(fx)
    assert len(blocks) >= 2 and all(len(c) == 2 for c in blocks)
    fd = os.open(fx.container, os.O_RDWR)
    try:
        for i, copies in enumerate(blocks):
            off = 65536 + copies[copy] * 4096
            if i % 2:
                os.pwrite(fd, bytes(4096), off)  # zeroed
            else:
                b = os.pread(fd, 1, off + 33)
                os.pwrite(fd, bytes([b[0] ^ 0x10]), off + 33)  # one flipped bit
    finally:
        os.close(fd)

    assert _survivors(fx, mnt, made) == len(made)  # every name, every byte, mounted
    r = run_process("fsck", fx.container, *fx.pw())
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("[damaged-copy]") == len(blocks) and "nothing is lost" in r.stdout
    r = run_process("fsck", fx.container, *fx.pw(), "--repair")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"rewrote {len(blocks)} metadata block(s)" in r.stdout
    assert "after repair: clean" in r.stdout
    r = run_process("fsck", fx.container, *fx.pw())
    assert r.returncode == 0, r.stdout + r.stderr
    assert _survivors(fx, mnt, made) == len(made)
