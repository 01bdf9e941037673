"""The incremental target: 1 MiB changed in a 1 GiB vault reads a few MiB from the
container and takes a small fraction of a full backup's time (figures are printed)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from cli_helpers import make_vault
from test_backup_support import OpenVault, file_digest, set_dir

from kryptvault.backup.engine import run_backup
from kryptvault.backup.verify import verify_set

GIB = 1 << 30
MIB = 1 << 20


@pytest.mark.slow
def test_one_mib_changed_in_a_one_gib_vault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * GIB:
        pytest.skip(f"needs 3 GiB free in {tmp_path}")
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    pattern = os.urandom(8 * MIB)
    with OpenVault.of(vault) as ov:
        ov.write("/big.bin", pattern * (GIB // len(pattern)))
        ov.write("/small.txt", b"small")
        ov.commit()
    size = os.path.getsize(vault.container)

    started = time.perf_counter()
    full = run_backup(vault.container, dest)
    full_time = time.perf_counter() - started

    with OpenVault.of(vault) as ov:
        ov.write("/big.bin", os.urandom(MIB), offset=517 * MIB, truncate=False)
        ov.commit()
    started = time.perf_counter()
    inc = run_backup(vault.container, dest)
    inc_time = time.perf_counter() - started

    with capsys.disabled():
        print(f"\n  container {size / MIB:.0f} MiB; full backup: read {full.source_bytes_read / MIB:.0f} MiB "
              f"in {full_time:.2f} s")
        print(f"  1 MiB changed -> incremental ({inc.strategy}): read {inc.source_bytes_read / MIB:.2f} MiB "
              f"from the container ({inc.changed_ranges} ranges), wrote "
              f"{inc.bytes_written / MIB:.2f} MiB, increment {inc.increment_bytes / MIB:.2f} MiB, "
              f"{inc_time * 1000:.0f} ms = {100 * inc_time / full_time:.1f} % of the full backup")
    assert inc.method == "incremental"
    assert inc.source_bytes_read < 16 * MIB
    assert inc_time < 0.3 * full_time
    # And it is exact: current.kv is the container byte for byte, version 1 still rebuilds.
    assert file_digest(set_dir(dest, vault) / "current.kv") == file_digest(vault.container)
    report = verify_set(dest)
    assert report.ok, [p.text() for p in report.problems]
