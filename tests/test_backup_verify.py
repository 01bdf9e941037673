"""verify finds every damaged byte of a backup without secrets and names the chunk (and
the container region it holds); verify --full authenticates every block with the key."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import VaultFixture, assert_clean_error, make_vault, run_process
from test_backup_support import OpenVault, set_dir

from kryptvault.backup.engine import run_backup
from kryptvault.backup.manifest import CHUNK_SIZE, ChunkSums, Manifest, increment_name, manifest_name
from kryptvault.backup.verify import describe_region, verify_set


@pytest.fixture(scope="module")
def small_backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[VaultFixture, Path]:
    """Three versions of a small vault (current.kv is two chunks; two increments)."""
    tmp = tmp_path_factory.mktemp("verify")
    vault = make_vault(tmp)
    dest = tmp / "dest"
    dest.mkdir()
    for i in range(3):
        with OpenVault.of(vault) as ov:
            ov.write(f"/f{i}.bin", os.urandom(20_000 + 7000 * i))
            ov.commit()
        run_backup(vault.container, dest)
    assert verify_set(dest).ok
    return vault, dest


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _check_every(path: Path, dest: Path, offsets: list[int], expect_chunk: bool) -> int:
    checked = 0
    for offset in offsets:
        _flip(path, offset)
        try:
            report = verify_set(dest)
        finally:
            _flip(path, offset)
        assert not report.ok, f"{path.name}: flipped byte {offset} went unnoticed"
        mine = [p for p in report.problems if p.file == path.name]
        assert mine, (offset, [p.text() for p in report.problems])
        if expect_chunk:
            # Exactly the damaged chunk (a broken extent table is also reported, without chunk).
            chunks = [p.chunk for p in mine if p.chunk is not None]
            assert chunks == [offset // CHUNK_SIZE], (offset, [p.text() for p in mine])
        checked += 1
    assert verify_set(dest).ok
    return checked


def test_every_sampled_flipped_byte_of_current_kv_is_found_and_its_chunk_named(
        small_backup: tuple[VaultFixture, Path]) -> None:
    vault, dest = small_backup
    current = set_dir(dest, vault) / "current.kv"
    size = current.stat().st_size
    offsets = sorted({*range(0, size, 2039), size - 1, CHUNK_SIZE - 1, CHUNK_SIZE})
    assert _check_every(current, dest, offsets, expect_chunk=True) > 500


def test_every_sampled_flipped_byte_of_an_increment_is_found_and_its_chunk_named(
        small_backup: tuple[VaultFixture, Path]) -> None:
    vault, dest = small_backup
    inc = set_dir(dest, vault) / increment_name(1)
    size = inc.stat().st_size
    # Every 131st data byte, and every byte of the extent table, footer and trailer.
    offsets = sorted({*range(0, size, 131), *range(max(0, size - 400), size)})
    assert _check_every(inc, dest, offsets, expect_chunk=True) > 500


def test_every_flipped_byte_of_a_manifest_is_found(small_backup: tuple[VaultFixture, Path]) -> None:
    vault, dest = small_backup
    manifest = set_dir(dest, vault) / manifest_name(2)
    assert _check_every(manifest, dest, list(range(manifest.stat().st_size)), expect_chunk=False) > 500


def test_truncation_missing_files_and_leftovers_are_reported(small_backup: tuple[VaultFixture, Path],
                                                            tmp_path: Path) -> None:
    vault, dest = small_backup
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dest, copy)
    sdir = set_dir(copy, vault)
    current = sdir / "current.kv"
    os.truncate(current, current.stat().st_size - 4096)
    (sdir / increment_name(1)).unlink()
    (sdir / ".tmp-increment-1-abcd").write_bytes(b"x")
    report = verify_set(copy)
    texts = [p.text() for p in report.problems]
    assert any("current.kv" in t and "bytes" in t and "was" in t for t in texts), texts
    assert any(t.startswith("current.kv chunk 1: is truncated") for t in texts), texts
    assert any(t.startswith(increment_name(1)) and "missing" in t for t in texts), texts
    assert any("left over" in n for n in report.notes)


def test_damage_names_the_container_region() -> None:
    assert describe_region(0, 100, 65536) == "header copy A"
    assert describe_region(16384 + 5, 1, 65536) == "header copy B"
    assert describe_region(32768, 8192, 65536) == "commit slot 0, commit slot 1"
    whole = describe_region(0, CHUNK_SIZE, 65536)
    assert whole.startswith("header copy A, header copy B, commit slot 0, commit slot 1, reserved area, ")
    assert whole.endswith("data units 0-239 (group 0, store chunks 0-14, incl. its change table)")
    second = describe_region(CHUNK_SIZE, CHUNK_SIZE, 65536)
    assert second == "data units 240-495 (group 0, store chunks 15-30)"


def test_cli_verify_reports_damage_on_stdout_and_fails_with_one_line(
        small_backup: tuple[VaultFixture, Path]) -> None:
    vault, dest = small_backup
    current = set_dir(dest, vault) / "current.kv"
    offset = CHUNK_SIZE + 12345
    _flip(current, offset)
    try:
        result = run_process("verify", dest)
    finally:
        _flip(current, offset)
    assert result.returncode == 1
    assert_clean_error(result.stderr)
    assert "the backup is damaged: 1 problem(s)" in result.stderr
    assert "DAMAGED current.kv chunk 1: bytes 1048576..1179648 do not match their checksum" in result.stdout
    assert "[version 3: data units 240-" in result.stdout


def _forge_newest(sdir: Path, damage_at: list[int]) -> None:
    """Change current.kv and re-sign nothing but the manifest's checksums: what only the key
    can catch (an attacker, or a bug, that keeps the checksums consistent)."""
    current = sdir / "current.kv"
    for offset in damage_at:
        _flip(current, offset)
    newest = max(int(p.name[1:9]) for p in sdir.glob("v*.manifest"))
    path = sdir / manifest_name(newest)
    m = Manifest.decode(path.read_bytes())
    data = current.read_bytes()
    sums = tuple(hashlib.sha256(data[i : i + CHUNK_SIZE]).digest() for i in range(0, len(data), CHUNK_SIZE))
    path.write_bytes(replace(m, container=ChunkSums(len(data), sums)).encode())


def test_verify_full_authenticates_every_block_with_the_key(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with OpenVault.of(vault) as ov:
        ov.write("/a.bin", os.urandom(300_000))
        ov.commit()
    run_backup(vault.container, dest)
    with OpenVault.of(vault) as ov:
        ov.write("/b.bin", os.urandom(100_000))
        ov.commit()
    run_backup(vault.container, dest)
    ok = run_process("verify", dest, "--full", *vault.pw())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "version 2: every block authenticates" in ok.stdout
    old = run_process("verify", dest, "--full", "--version", "1", *vault.pw(), "--json")
    assert old.returncode == 0, old.stderr
    assert '"rebuilt_versions": [\n    1\n  ]' in old.stdout and '"damage": []' in old.stdout
    # One flipped byte in every data unit of chunk 0 past the change table, checksums forged.
    _forge_newest(set_dir(dest, vault), list(range(65536 * 2 + 100, CHUNK_SIZE, 4096)))
    assert verify_set(dest).ok  # the checksums alone cannot tell
    bad = run_process("verify", dest, "--full", *vault.pw())
    assert bad.returncode == 1
    assert_clean_error(bad.stderr)
    assert "DAMAGED version 2: object" in bad.stdout, bad.stdout
