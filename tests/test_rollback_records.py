"""Rollback records per lineage, read-only mounts, and damaged commit records, through the
CLI and real FUSE mounts (docs/TOKEN.md "Rollback", docs/FORMAT.md §4.6, docs/BACKUP.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import assert_clean_error, make_vault, run_cli, run_process, vault_and_dest

from kryptvault.container.layout import COMMIT_OFFSETS, DATA_AREA_OFFSET
from kryptvault.session.rollback import RECORD_INTERVAL, RECORD_POLL
from kryptvault.token.records import RecordsDamaged, advance_records, read_records

pytestmark = pytest.mark.fuse


def _token_records(token: Path, vault_uuid: str) -> dict[bytes, int]:
    records = read_records(token, uuid.UUID(vault_uuid))
    return {lineage: gen for lineage, (gen, _stamp) in records.entries.items()}


def _newest_generation(container: Path) -> int:
    """Key-less: group 0's descriptor records the generation of the last commit (§4.8)."""
    with open(container, "rb") as f:
        f.seek(DATA_AREA_OFFSET + 16)
        return int(struct.unpack("<Q", f.read(8))[0])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _events(vault_uuid: str) -> list[dict[str, object]]:
    out = run_process("log", "--json", "--vault", vault_uuid).stdout.splitlines()
    return [json.loads(line) for line in out]


def _mounted(mnt: Path) -> bool:
    return f" {mnt} " in Path("/proc/self/mountinfo").read_text()


def _write_and_lock(container: Path, mnt: Path, pw: list[str], name: str, text: str) -> None:
    mounted = run_process("mount", container, mnt, *pw)
    assert mounted.returncode == 0, mounted.stderr
    (mnt / name).write_text(text)
    locked = run_process("lock", mnt)
    assert locked.returncode == 0, locked.stderr


def test_read_only_mount_refuses_writes_and_never_touches_container_or_token(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _write_and_lock(vault.container, mnt, vault.pw(), "kept.txt", "kept\n")
    before, mtime = _digest(vault.container), vault.container.stat().st_mtime_ns
    record_file = vault.token / f"{vault.uuid}.kvgen"
    record_before = record_file.read_bytes()
    time.sleep(0.05)  # a write now would show in the mtime

    mounted = run_process("mount", vault.container, mnt, *vault.pw(), "--read-only")
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert (mnt / "kept.txt").read_text() == "kept\n"
        for attempt in (
            lambda: (mnt / "new.txt").write_text("no"),
            lambda: (mnt / "kept.txt").write_text("changed"),
            lambda: (mnt / "kept.txt").unlink(),
            lambda: (mnt / "dir").mkdir(),
            lambda: os.utime(mnt / "kept.txt", (1, 1)),
        ):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        status = json.loads(run_process("status", "--json").stdout)
        assert [s["read_only"] for s in status if s.get("mountpoint") == str(mnt)] == [True]
    finally:
        assert run_process("lock", mnt).returncode == 0
    assert _digest(vault.container) == before
    assert vault.container.stat().st_mtime_ns == mtime
    assert record_file.read_bytes() == record_before
    locks = [e for e in _events(vault.uuid) if e["event"] == "lock"]
    assert locks[-1]["error"] is None  # the lock had nothing to commit and did not fail


def test_a_restored_side_copy_never_makes_the_live_vault_look_rolled_back(tmp_path: Path) -> None:
    """Issue 3: restore to a side path, mount it with --accept-rollback, write more commits
    than the live vault has, lock: the live vault still mounts without any flag."""
    vault, mnt, dest = vault_and_dest(tmp_path)
    _write_and_lock(vault.container, mnt, vault.pw(), "state.txt", "version one\n")
    backed = run_process("backup", vault.container, dest, "--json")
    assert backed.returncode == 0, backed.stderr
    _write_and_lock(vault.container, mnt, vault.pw(), "state.txt", "version two\n")
    live_generation = _newest_generation(vault.container)

    old = tmp_path / "old.kv"
    restored = run_process("restore", dest / vault.uuid, "1", old)
    assert restored.returncode == 0, restored.stderr
    assert "--read-only" in restored.stdout and "--new-identity" in restored.stdout

    side = tmp_path / "side"
    side.mkdir()
    refused = run_process("mount", old, side, *vault.pw())
    assert refused.returncode == 1 and "--read-only --accept-rollback" in refused.stderr
    untouched = _digest(old)
    looked = run_process("mount", old, side, *vault.pw(), "--read-only", "--accept-rollback")  # the hint
    assert looked.returncode == 0, looked.stderr
    assert (side / "state.txt").read_text() == "version one\n"
    assert run_process("lock", side).returncode == 0
    assert _digest(old) == untouched and len(_token_records(vault.token, vault.uuid)) == 1
    accepted = run_process("mount", old, side, *vault.pw(), "--accept-rollback")
    assert accepted.returncode == 0, accepted.stderr
    try:
        assert (side / "state.txt").read_text() == "version one\n"
        for i in range(live_generation + 3):  # each fsync commits: the copy overtakes the live vault
            with open(side / f"f{i}", "w") as f:
                f.write(str(i))
                f.flush()
                os.fsync(f.fileno())
    finally:
        assert run_process("lock", side).returncode == 0
    assert _newest_generation(old) > live_generation
    again = run_process("mount", old, side, *vault.pw())  # its own lineage now: no flag needed
    assert again.returncode == 0, again.stderr
    assert run_process("lock", side).returncode == 0

    live = run_process("mount", vault.container, mnt, *vault.pw())
    assert live.returncode == 0, live.stderr
    assert (mnt / "state.txt").read_text() == "version two\n"
    assert run_process("lock", mnt).returncode == 0
    records = _token_records(vault.token, vault.uuid)
    assert records[bytes(16)] == _newest_generation(vault.container)  # the live vault's record
    assert len(records) == 2  # and the fork's own
    assert [e["event"] for e in _events(vault.uuid)].count("lineage_forked") == 1


def test_restore_with_new_identity_mounts_beside_the_vault_without_any_flag(tmp_path: Path) -> None:
    vault, mnt, dest = vault_and_dest(tmp_path)
    _write_and_lock(vault.container, mnt, vault.pw(), "a", "one")
    assert run_process("backup", vault.container, dest).returncode == 0
    _write_and_lock(vault.container, mnt, vault.pw(), "a", "two")
    copy = tmp_path / "copy.kv"
    forked = run_process("restore", dest / vault.uuid, copy, "--new-identity", *vault.pw())
    assert forked.returncode == 0, forked.stderr
    assert "Forked into a lineage of its own" in forked.stdout
    side = tmp_path / "side"
    side.mkdir()
    mounted = run_process("mount", copy, side, *vault.pw())
    assert mounted.returncode == 0, mounted.stderr
    assert (side / "a").read_text() == "one"
    assert run_process("lock", side).returncode == 0
    live = run_process("mount", vault.container, mnt, *vault.pw())
    assert live.returncode == 0, live.stderr
    assert (mnt / "a").read_text() == "two"
    assert run_process("lock", mnt).returncode == 0


@pytest.fixture
def bind_token(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A token directory that can be "unplugged": a bind mount of a real directory."""
    real = tmp_path / "stick"
    real.mkdir()
    token = tmp_path / "token"
    token.mkdir()
    subprocess.run(["mount", "--bind", str(real), str(token)], check=True)
    try:
        yield real, token
    finally:
        subprocess.run(["umount", str(token)], capture_output=True)


def test_an_unplug_lock_leaves_the_tokens_record_current_so_an_old_copy_is_refused(
    tmp_path: Path, bind_token: tuple[Path, Path]
) -> None:
    """Issue 4: the record follows the commits while mounted; the unplug lock (the watcher's
    lock path) cannot write to the token, yet an old copy is still caught."""
    real, token = bind_token
    vault = make_vault(tmp_path)  # its token directory is tmp_path/token, the bind mount
    assert vault.token == token
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _write_and_lock(vault.container, mnt, vault.pw(), "f", "old")
    old_copy = tmp_path / "old-copy.kv"
    shutil.copyfile(vault.container, old_copy)
    old_generation = _newest_generation(old_copy)

    assert run_process("mount", vault.container, mnt, *vault.pw()).returncode == 0
    with open(mnt / "f", "w") as f:
        f.write("new")
        f.flush()
        os.fsync(f.fileno())  # a commit
    committed = _newest_generation(vault.container)
    assert committed > old_generation
    deadline = time.monotonic() + RECORD_INTERVAL + RECORD_POLL + 5
    while _token_records(token, vault.uuid).get(bytes(16), 0) < committed and time.monotonic() < deadline:
        time.sleep(0.1)
    waited = RECORD_INTERVAL + RECORD_POLL + 5 - (deadline - time.monotonic())
    assert _token_records(token, vault.uuid)[bytes(16)] == committed
    print(f"\n[record] token record current {waited:.2f} s after the commit")

    subprocess.run(["umount", str(token)], check=True)  # unplug
    start = time.monotonic()
    while _mounted(mnt) and time.monotonic() - start < 15:
        time.sleep(0.05)
    assert not _mounted(mnt)
    locks = [e for e in _events(vault.uuid) if e["event"] == "lock"]
    assert locks[-1]["reason"] == "unplug" and locks[-1]["token_updated"] is False
    subprocess.run(["mount", "--bind", str(real), str(token)], check=True)  # plugged in again

    shutil.copyfile(old_copy, vault.container)  # someone puts the old copy back
    refused = run_process("mount", vault.container, mnt, *vault.pw())
    assert refused.returncode == 1, refused.stdout
    assert_clean_error(refused.stderr)
    assert "older than the last state its token saw" in refused.stderr
    assert not _mounted(mnt)


def test_a_recovery_key_mount_keeps_a_local_record_and_warns_about_an_older_container(
    tmp_path: Path,
) -> None:
    vault = make_vault(tmp_path)
    added = run_cli("recovery-key", "add", vault.container, *vault.pw())
    assert added.exit_code == 0, added.output
    match = re.search(r"([A-Z2-7]{4}(?:-[A-Z2-7]{4}){7})", added.output)
    assert match
    key_file = tmp_path / "rk"
    key_file.write_text(match.group(1) + "\n")
    recovery = ["--recovery-key-file", str(key_file)]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _write_and_lock(vault.container, mnt, recovery, "f", "old")
    old_copy = tmp_path / "old.kv"
    shutil.copyfile(vault.container, old_copy)
    _write_and_lock(vault.container, mnt, recovery, "f", "new")

    shutil.copyfile(old_copy, vault.container)
    mounted = run_process("mount", vault.container, mnt, *recovery, "--read-only")
    assert mounted.returncode == 0, mounted.stderr
    assert run_process("lock", mnt).returncode == 0
    assert "warning: this container is older than the last state this machine saw" in mounted.stderr


@pytest.mark.parametrize("harm", ["flipped byte", "zeroed slot"])
def test_a_damaged_newest_commit_record_is_reported_and_blocks_writes(tmp_path: Path, harm: str) -> None:
    """Issue 5: fsck names the damaged record and the generation it fell back to; mount
    refuses to write until the loss is acknowledged; read-only still works."""
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _write_and_lock(vault.container, mnt, vault.pw(), "f", "older")
    _write_and_lock(vault.container, mnt, vault.pw(), "f", "newest")
    newest = _newest_generation(vault.container)
    slot = newest % 2
    with open(vault.container, "r+b") as f:  # FORMAT.md §4.6: ciphertext at slot offset 12
        f.seek(COMMIT_OFFSETS[slot] + 40)
        byte = f.read(1)[0]
        if harm == "flipped byte":
            f.seek(COMMIT_OFFSETS[slot] + 40)
            f.write(bytes([byte ^ 0x01]))
        else:
            f.seek(COMMIT_OFFSETS[slot])
            f.write(bytes(4096))
    damaged = _digest(vault.container)

    checked = run_process("fsck", vault.container, *vault.pw())
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"newest commit record (slot {slot}, generation {newest})" in checked.stdout
    assert f"fell back to generation {newest - 1}" in checked.stdout
    assert "repairs them" not in checked.stdout  # --repair refuses until acknowledged

    refused = run_process("mount", vault.container, mnt, *vault.pw())
    assert refused.returncode == 1
    assert "--accept-lost-commit" in refused.stderr and "--read-only" in refused.stderr
    assert not _mounted(mnt)
    assert _digest(vault.container) == damaged  # nothing reused the lost generation's units

    looked = run_process("mount", vault.container, mnt, *vault.pw(), "--read-only")
    assert looked.returncode == 0, looked.stderr
    assert "newest commit record" in looked.stderr  # the warning
    assert (mnt / "f").read_text() == "older"
    assert run_process("lock", mnt).returncode == 0
    assert _digest(vault.container) == damaged
    for writer in (("fsck", "--repair"), ("compact",)):  # nor do the offline writers
        refused = run_process(writer[0], vault.container, *writer[1:], *vault.pw())
        assert refused.returncode == 1 and "--accept-lost-commit" in refused.stderr, refused.stderr
        assert _digest(vault.container) == damaged

    accepted = run_process("mount", vault.container, mnt, *vault.pw(), "--accept-lost-commit")
    assert accepted.returncode == 0, accepted.stderr
    (mnt / "g").write_text("after")
    assert run_process("lock", mnt).returncode == 0
    clean = run_process("fsck", vault.container, *vault.pw())
    assert clean.returncode == 0, clean.stdout + clean.stderr  # the damaged slot was rewritten
    assert "lost_commit_accepted" in [e["event"] for e in _events(vault.uuid)]


def test_the_record_file_follows_token_md_and_a_record_never_falls(tmp_path: Path) -> None:
    vault = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    fork = bytes(range(1, 17))
    assert advance_records(tmp_path, vault, bytes(16), 7)
    assert advance_records(tmp_path, vault, fork, 3)
    assert not advance_records(tmp_path, vault, bytes(16), 5)  # lower: left as it was
    raw = (tmp_path / f"{vault}.kvgen").read_bytes()
    # docs/TOKEN.md "Rollback records", parsed from the spec alone
    magic, version, count, zero, raw_uuid = struct.unpack_from(">8sHHI16s", raw)
    assert (magic, version, count, zero, raw_uuid) == (b"KVGENRC1", 1, 2, 0, vault.bytes)
    assert len(raw) == 32 + 40 * count + 32
    assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()
    rows = [struct.unpack_from(">16sQQ8s", raw, 32 + 40 * i) for i in range(count)]
    assert [(r[0], r[1], r[3]) for r in rows] == [(bytes(16), 7, bytes(8)), (fork, 3, bytes(8))]
    assert all(abs(r[2] - time.time()) < 60 for r in rows)
    damaged = bytearray(raw)
    damaged[40] ^= 1
    (tmp_path / f"{vault}.kvgen").write_bytes(bytes(damaged))
    with pytest.raises(RecordsDamaged):
        read_records(tmp_path, vault)


def test_a_damaged_older_commit_record_loses_nothing_and_the_next_commit_heals_it(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _write_and_lock(vault.container, mnt, vault.pw(), "f", "newest")
    newest = _newest_generation(vault.container)
    with open(vault.container, "r+b") as f:
        f.seek(COMMIT_OFFSETS[(newest + 1) % 2] + 40)
        f.write(b"\xff\x00\xff")
    checked = run_process("fsck", vault.container, *vault.pw())
    assert checked.returncode == 1
    assert f"the newest generation {newest} is intact" in checked.stdout
    mounted = run_process("mount", vault.container, mnt, *vault.pw())  # no flag needed
    assert mounted.returncode == 0, mounted.stderr
    assert "warning:" in mounted.stderr and "older of the two" in mounted.stderr
    assert (mnt / "f").read_text() == "newest"
    (mnt / "g").write_text("more")
    assert run_process("lock", mnt).returncode == 0
    assert run_process("fsck", vault.container, *vault.pw()).returncode == 0
