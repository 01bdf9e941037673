"""`kryptvault log --vault` with the short id `mount`/`df` show, and every command's
output into a pipe whose reader stops early (`kryptvault log | head -1`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import KRYPTVAULT, assert_clean_error

from kryptvault.session.audit import AuditLog, make_entry

ONE = "abcd1234-0000-4000-8000-000000000001"
TWIN_A = "5eed0000-1111-4000-8000-00000000000a"
TWIN_B = "5eed0000-2222-4000-8000-00000000000b"


@pytest.fixture
def state_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An audit log of our own, with three vaults; the environment for processes."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    log = AuditLog(tmp_path / "state" / "kryptvault" / "audit.jsonl")
    for vault in (ONE, TWIN_A, TWIN_B):
        log.append("mount", vault=vault, mountpoint=f"/mnt/{vault[:4]}")
        log.append("lock", vault=vault, reason="command", route="control pid 1")
    log.close()
    yield env


def _log(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KRYPTVAULT, "log", "--json", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    "given", ["kryptvault:abcd1234", "abcd1234", "ABCD", "a", "abcd1234-00", ONE, ONE.replace("-", "")]
)
def test_log_vault_takes_the_short_id_or_any_unique_start_of_the_uuid(
    state_home: dict[str, str], given: str
) -> None:
    result = _log(state_home, "--vault", given)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in entries] == ["mount", "lock"]
    assert {e["vault"] for e in entries} == {ONE}


def test_log_vault_with_an_ambiguous_start_is_a_one_line_error_naming_the_candidates(
    state_home: dict[str, str],
) -> None:
    result = _log(state_home, "--vault", "5eed")
    assert result.returncode == 2 and result.stdout == ""
    assert_clean_error(result.stderr)
    assert "5eed is the start of 2 vault ids" in result.stderr
    assert TWIN_A[:13] in result.stderr and TWIN_B[:13] in result.stderr
    assert _log(state_home, "--vault", "5eed00001").returncode == 0


@pytest.mark.parametrize(
    ("given", "message"),
    [("ffff", "no vault in the audit log has an id starting with ffff"), ("xyz", "not a vault UUID")],
)
def test_log_vault_matching_nothing_or_not_hex_is_a_one_line_error(
    state_home: dict[str, str], given: str, message: str
) -> None:
    result = _log(state_home, "--vault", given)
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert message in result.stderr


# ---------------------------------------------------------------------- broken pipes


@pytest.fixture
def long_log(tmp_path: Path) -> dict[str, str]:
    """A log of ~1 MiB: far more than a pipe holds, so `log` is still writing when its
    reader goes away."""
    log = AuditLog(tmp_path / "state" / "kryptvault" / "audit.jsonl")
    log.append_entries([make_entry("control_request", ONE, {"op": "status", "n": i}) for i in range(10000)])
    log.close()
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_log_into_a_pipe_closed_after_one_line_ends_silently_by_sigpipe(
    long_log: dict[str, str], fmt: list[str]
) -> None:
    proc = subprocess.Popen(
        [KRYPTVAULT, "log", *fmt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=long_log
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    assert proc.wait(60) == -signal.SIGPIPE
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_shell_pipeline_into_head_prints_one_line_and_reports_141(long_log: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {KRYPTVAULT} log | head -1"],
        capture_output=True,
        text=True,
        env=long_log,
        timeout=60,
    )
    assert result.returncode == 141
    assert len(result.stdout.splitlines()) == 1 and " control_request " in result.stdout
    assert result.stderr == ""


def test_any_command_whose_reader_is_already_gone_ends_by_sigpipe_without_a_message() -> None:
    """The handling sits where every command's errors end up, not in `log`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [KRYPTVAULT, "status"], stdout=write_end, stderr=subprocess.PIPE, timeout=60, check=False
        )
    finally:
        os.close(write_end)
    assert proc.returncode == -signal.SIGPIPE
    assert proc.stderr == b""
