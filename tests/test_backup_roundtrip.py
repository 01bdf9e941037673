"""Full and incremental backups of a real vault; every kept version restores to exactly
the container (and the files) it was taken from."""

from __future__ import annotations

import fcntl
import json
import os
import random
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process
from test_backup_support import OpenVault, file_digest, set_dir

from kryptvault.backup.engine import HistoryMismatch, run_backup
from kryptvault.backup.manifest import Manifest, manifest_name
from kryptvault.backup.restore import run_restore
from kryptvault.backup.verify import verify_set
from kryptvault.container.groups import GroupGeometry
from kryptvault.container.layout import Layout
from kryptvault.container.store import CRASH_ENV


def _mutate(ov: OpenVault, rnd: random.Random, step: int) -> None:
    """A mix of new files, overwrites in place, growth, truncation and deletion."""
    ov.write(f"/notes/n{step}.txt", f"note {step}\n".encode() * rnd.randrange(1, 400))
    ov.write("/big.bin", rnd.randbytes(rnd.randrange(4096, 300_000)), offset=rnd.randrange(0, 3 << 20),
             truncate=False)
    if step % 2:
        ov.write("/grow.bin", rnd.randbytes(200_000 * step))
    if step == 3:
        ov.remove("/notes/n2.txt")


@pytest.mark.parametrize("strategy", ["in-place", "copy"])
def test_every_kept_version_restores_to_its_exact_container_and_files(tmp_path: Path, strategy: str) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    rnd = random.Random(7)
    digests: dict[int, str] = {}
    snapshots: dict[int, dict[str, bytes]] = {}
    with OpenVault.of(vault) as ov:
        ov.write("/big.bin", rnd.randbytes(4 << 20))
        ov.commit()
    for step in range(1, 7):
        if step > 1:
            with OpenVault.of(vault) as ov:
                _mutate(ov, rnd, step)
                ov.commit()
        with OpenVault.of(vault, read_only=True) as ov:
            snapshots[step] = ov.files()
        digests[step] = file_digest(vault.container)
        result = run_backup(vault.container, dest, keep=4, strategy=strategy)
        assert result.version == step
        assert result.method == ("full" if step == 1 else "incremental")
        if step > 1:
            assert result.strategy == strategy
            # Only what changed is read from the container (plus header area and change tables).
            assert result.source_bytes_read < os.path.getsize(vault.container) / 2
    assert result.versions == [3, 4, 5, 6] and result.pruned == [2]
    report = verify_set(dest, version=3)
    assert report.ok, [p.text() for p in report.problems]
    for version in (3, 4, 5, 6):
        out = tmp_path / f"restored-{version}.kv"
        run_restore(dest, version, out)
        assert file_digest(out) == digests[version], f"version {version} is not byte-identical"
        with OpenVault.of(vault, out, read_only=True) as ov:
            assert ov.files() == snapshots[version]
    with pytest.raises(Exception, match="no version 2"):
        run_restore(dest, 2, tmp_path / "gone.kv")
    names = sorted(p.name for p in set_dir(dest, vault).iterdir())
    assert names == ["current.kv", "v00000003.kvinc", "v00000003.manifest", "v00000004.kvinc",
                     "v00000004.manifest", "v00000005.kvinc", "v00000005.manifest", "v00000006.manifest"]


def test_cli_backup_list_verify_restore_through_real_processes(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with OpenVault.of(vault) as ov:
        ov.write("/a.txt", b"first")
        ov.commit()
    first = run_process("backup", vault.container, dest, "--json")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # no progress bar without a terminal
    out = json.loads(first.stdout)
    assert out["version"] == 1 and out["method"] == "full" and out["vault_uuid"] == vault.uuid
    with OpenVault.of(vault) as ov:
        ov.write("/a.txt", b"second")
        ov.commit()
    second = run_process("backup", "run", vault.container, dest, "--keep", "3", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["method"] == "incremental"
    listing = run_process("backup", "list", dest, "--json")
    rows = json.loads(listing.stdout)["versions"]
    assert [r["version"] for r in rows] == [2, 1] and rows[0]["current"]
    human = run_process("backup", "list", dest)
    assert "version" in human.stdout and "current" in human.stdout
    ok = run_process("verify", dest, "--version", "1")
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    restored = tmp_path / "old.kv"
    r = run_process("restore", dest, "1", restored)
    assert r.returncode == 0, r.stderr
    assert "--accept-rollback" in r.stdout
    with OpenVault.of(vault, restored, read_only=True) as ov:
        assert ov.files() == {"/a.txt": b"first"}
    again = run_process("restore", dest, restored)
    assert again.returncode == 2
    assert_clean_error(again.stderr)
    assert "already exists" in again.stderr
    forced = run_process("restore", dest, "current", restored, "--force")
    assert forced.returncode == 0, forced.stderr
    with OpenVault.of(vault, restored, read_only=True) as ov:
        assert ov.files() == {"/a.txt": b"second"}
    for command in (["backup"], ["backup", "run"], ["backup", "list"], ["verify"], ["restore"]):
        h = run_process(*command, "--help")
        assert h.returncode == 0 and "Usage:" in h.stdout, command


def test_mounted_container_is_refused_without_a_live_path(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    fd = os.open(vault.container, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what the mount daemon holds
        result = run_process("backup", vault.container, dest)
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert_clean_error(result.stderr)
    assert "is mounted" in result.stderr
    assert list(dest.iterdir()) == []


def test_a_container_restored_from_an_older_copy_is_refused_unless_full_then_compared_in_full(
    tmp_path: Path,
) -> None:
    """After restoring an old version and writing again, generations repeat with other
    contents; the change tables alone would miss that, the continuity check does not. Such
    a container is another history: refused, unless --full says it replaces the vault."""
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    for text in (b"one", b"two", b"three"):
        with OpenVault.of(vault) as ov:
            ov.write("/f.txt", text * 10_000)
            ov.write(f"/{text.decode()}.txt", text)
            ov.commit()
        run_backup(vault.container, dest)
    run_restore(dest, 1, vault.container, force=True)
    with OpenVault.of(vault) as ov:
        for i in range(4):  # past the last backup's generation, in another history
            ov.write("/f.txt", b"other" * (3000 + i))
            ov.write("/other.txt", b"x" * (i + 1))
            if i == 0:
                # Chunks the first history never wrote: in a vault this small, both
                # histories could otherwise write the same chunks at the same generations,
                # which no key-less check can tell apart (docs/BACKUP.md §6.3).
                ov.write("/big.bin", random.Random(1).randbytes(1 << 20))
            ov.commit()
        expected = ov.files()
    versions = sorted(p.name for p in set_dir(dest, vault).iterdir())
    with pytest.raises(HistoryMismatch, match="does not continue the history of the backup set"):
        run_backup(vault.container, dest)
    assert sorted(p.name for p in set_dir(dest, vault).iterdir()) == versions  # nothing mixed in
    result = run_backup(vault.container, dest, rescan=True)
    assert result.method == "rescan"
    out = tmp_path / "now.kv"
    run_restore(dest, None, out)
    assert file_digest(out) == file_digest(vault.container)
    with OpenVault.of(vault, out, read_only=True) as ov:
        assert ov.files() == expected
    assert verify_set(dest, version=2).ok


def _descriptor_max(container: Path) -> int:
    from kryptvault.backup.engine import max_generation, read_descriptors
    from kryptvault.backup.fsutil import read_exact

    fd = os.open(container, os.O_RDONLY)
    try:
        return max_generation(read_descriptors(lambda n, o: read_exact(fd, n, o), Layout(),
                                               os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _crash_during_commit(vault: VaultFixture, writes: int) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.environ[CRASH_ENV] = str(writes)
            with OpenVault.of(vault) as ov:
                ov.write("/crashed.txt", b"never committed" * 5000)
                ov.commit()
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def test_change_tables_ahead_of_the_commit_record_do_not_lose_a_later_commit(tmp_path: Path) -> None:
    """A commit that dies after writing the change tables but before its commit record leaves
    the tables one generation ahead. An offline backup then records that generation; the
    retried commit reuses it, and the next backup must still copy what it wrote."""
    vault = make_vault(tmp_path)
    with OpenVault.of(vault) as ov:
        ov.write("/base.txt", b"base")
        durable = ov.commit()
    pristine = vault.container.read_bytes()
    for writes in range(1, 40):
        vault.container.write_bytes(pristine)
        _crash_during_commit(vault, writes)
        with OpenVault.of(vault, read_only=True) as ov:
            committed = ov.store.generation
        if committed == durable and _descriptor_max(vault.container) == durable + 1:
            break
    else:
        pytest.fail("could not stop a commit between its change tables and its commit record")
    dest = tmp_path / "dest"
    dest.mkdir()
    first = run_backup(vault.container, dest)
    assert first.generation == durable + 1  # the change tables' view: one ahead
    with OpenVault.of(vault) as ov:
        ov.write("/later.txt", b"written by the retried generation" * 3000)
        assert ov.commit() == durable + 1
        expected = ov.files()
    second = run_backup(vault.container, dest)
    assert second.method == "incremental", second.notes  # neither lost nor a full rescan
    out = tmp_path / "out.kv"
    run_restore(dest, None, out)
    assert file_digest(out) == file_digest(vault.container)
    with OpenVault.of(vault, out, read_only=True) as ov:
        assert ov.files() == expected


def test_manifest_records_what_the_docs_say(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    run_backup(vault.container, dest, clock=lambda: 1_700_000_000_123_456_789)
    raw = (set_dir(dest, vault) / manifest_name(1)).read_bytes()
    m = Manifest.decode(raw)
    assert str(m.vault_uuid) == vault.uuid and m.version == 1 and m.previous is None
    assert m.created_text == "2023-11-14T22:13:20Z"
    assert m.size == os.path.getsize(vault.container)
    assert m.generation == _descriptor_max(vault.container) and not m.generation_exact
    assert len(m.container.sha256) == -(-m.size // (1 << 20))
    assert raw.startswith(b"KVBACKUP-MANIFEST 1\n{") and raw.endswith(b"\n")
    geom = GroupGeometry(m.block_size, 4096)
    assert geom.chunks_per_group == 8184
