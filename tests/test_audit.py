"""The audit log, the failed-password backoff, and `kryptvault log`."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cli_helpers import assert_clean_error, run_cli, run_process

from kryptvault.session.audit import (
    MAX_LINE,
    AuditLog,
    Backoff,
    follow_entries,
    make_entry,
    nominal_delay,
    read_entries,
)

VAULT = uuid.UUID("6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab")
OTHER = uuid.UUID("00000000-0000-4000-8000-000000000001")


# ---------------------------------------------------------------------- writing


def test_entries_made_earlier_keep_their_own_time_and_order_when_written_together(tmp_path: Path) -> None:
    # The lock writes "token_removed" (stamped when the watcher saw it) and "lock" at once.
    removed = make_entry("token_removed", VAULT, {"route": "uevent"})
    time.sleep(0.01)
    lock = make_entry("lock", VAULT, {"reason": "unplug"})
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.append_entries([removed, lock])
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["token_removed", "lock"]
    assert lines[0]["ts"] == removed["ts"] < lines[1]["ts"] == lock["ts"]



def test_entry_is_one_json_line_with_utc_millisecond_time_event_and_vault(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    before = datetime.datetime.now(datetime.UTC)
    assert AuditLog(path).append("lock", vault=VAULT, reason="unplug", route="uevent", commit_ms=12)
    line = path.read_bytes()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    entry = json.loads(line)
    assert list(entry)[:3] == ["ts", "event", "vault"]
    assert entry["event"] == "lock" and entry["vault"] == str(VAULT)
    assert (entry["reason"], entry["route"], entry["commit_ms"]) == ("unplug", "uevent", 12)
    ts = entry["ts"]
    assert len(ts) == len("2026-11-30T11:20:01.123Z") and ts.endswith("Z")
    moment = datetime.datetime.fromisoformat(ts)
    assert before - datetime.timedelta(seconds=1) <= moment <= datetime.datetime.now(datetime.UTC)


def test_vault_may_be_absent_or_a_string(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.append("control_connect", pid=1, uid=0, accepted=True)
    log.append("mount", vault=str(VAULT).upper())
    assert [e["vault"] for e in read_entries(log.path)] == [None, str(VAULT)]


def test_log_file_is_created_0600_and_a_loose_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    AuditLog(path).append("mount", vault=VAULT)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    AuditLog(path).append("unmount", vault=VAULT)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_log_refuses_to_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    assert AuditLog(link).append("mount") is False  # ELOOP: not written, not raised
    assert target.read_text() == ""


def test_long_strings_are_truncated_and_non_scalars_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.append("mount", vault=VAULT, mountpoint="/m/" + "x" * 1000)
    [entry] = read_entries(log.path)
    assert len(entry["mountpoint"]) == 200 and entry["mountpoint"].endswith("…")
    with pytest.raises(TypeError, match="bytes are never logged"):
        log.append("unlock_ok", vault=VAULT, key=b"\x00" * 32)
    with pytest.raises(TypeError, match="must be a scalar"):
        log.append("mount", details={"a": 1})
    with pytest.raises(ValueError, match="field name"):
        log.append("mount", **{"ts": "forged"})
    with pytest.raises(ValueError, match="event name"):
        log.append("Mount\nforged")
    with pytest.raises(ValueError, match="too many"):
        log.append("mount", **{f"f{i}": i for i in range(17)})
    assert len(list(read_entries(log.path))) == 1


def test_a_line_never_exceeds_4_kib_even_with_escaped_control_characters(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    for length in (50, 100, 500):
        log.append("mount", vault=VAULT, **{f"f{i}": "\x01" * length for i in range(16)})
    lines = log.path.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 3 and all(len(line) < MAX_LINE for line in lines)
    assert all(json.loads(line)["truncated"] is True for line in lines)


def test_non_finite_numbers_stay_valid_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.append("lock", vault=VAULT, commit_ms=float("nan"))
    json.loads(log.path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


APPENDER = """
import sys
from pathlib import Path
from kryptvault.session.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
me = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    log.append("control_request", pid=me, uid=i, op="x" * (i % 200))
"""


def test_appends_from_several_processes_keep_every_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers, each = 6, 400
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(n), str(each)])
        for n in range(writers)
    ]
    assert all(p.wait(120) == 0 for p in procs)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    entries = [json.loads(line) for line in lines[:-1]]  # every line parses on its own
    assert len(entries) == writers * each
    for n in range(writers):
        mine = [e for e in entries if e["pid"] == n]
        assert [e["uid"] for e in mine] == list(range(each))  # each writer's order kept
        assert all(e["op"] == "x" * (e["uid"] % 200) for e in mine)


# ---------------------------------------------------------------------- reading


def test_reader_skips_a_torn_last_line_and_damaged_lines(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.append("mount", vault=VAULT)
    with open(log.path, "ab") as f:
        f.write(b"\x00garbage\n[1,2]\n")
    log.append("unmount", vault=VAULT)
    with open(log.path, "ab") as f:
        f.write(b'{"ts": "2026-11-30T11:20:01.123Z", "event": "lo')  # crash mid-write
    assert [e["event"] for e in read_entries(log.path)] == ["mount", "unmount"]
    assert list(read_entries(tmp_path / "missing.jsonl")) == []


def test_reader_filters_by_vault_and_time(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        {"ts": "2026-11-30T10:00:00.000Z", "event": "mount", "vault": str(VAULT)},
        {"ts": "2026-11-30T11:00:00.000Z", "event": "mount", "vault": str(OTHER)},
        {"ts": "2026-11-30T12:00:00.000Z", "event": "lock", "vault": str(VAULT)},
        {"ts": "not a time", "event": "lock", "vault": str(VAULT)},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    since = datetime.datetime(2026, 11, 30, 10, 30, tzinfo=datetime.UTC)
    assert [e["ts"][11:13] for e in read_entries(path, vault=VAULT)] == ["10", "12", ""]
    assert [e["ts"][11:13] for e in read_entries(path, since=since)] == ["11", "12"]  # no time: not "since"
    assert [e["event"] for e in read_entries(path, vault=str(VAULT).replace("-", ""), since=since)] == [
        "lock"
    ]


def test_follow_yields_old_entries_then_new_ones_as_they_are_appended(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.append("mount", vault=VAULT)
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        for entry in follow_entries(log.path, vault=VAULT, interval=0.02, stop=stop):
            seen.append(entry["event"])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(0.1)
        log.append("token_removed", vault=VAULT, route="uevent")
        log.append("lock", vault=OTHER, reason="unplug")  # another vault: filtered out
        with open(log.path, "ab") as f:
            f.write(b'{"ts": "2026-11-30T11:20:01.123Z", "event": "lo')  # half a line, for now
        time.sleep(0.1)
        with open(log.path, "ab") as f:
            f.write(f'ck", "vault": "{VAULT}", "reason": "unplug"}}\n'.encode())
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(5)
    assert seen == ["mount", "token_removed", "lock"]


# ---------------------------------------------------------------------- backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_nominal_delay_doubles_from_one_second_and_caps_at_a_minute() -> None:
    assert [nominal_delay(n) for n in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert nominal_delay(10_000) == 60


def test_backoff_doubles_with_each_failure_and_resets_on_success(tmp_path: Path) -> None:
    clock = Clock()
    backoff = Backoff(tmp_path / "backoff.json", clock=clock)
    assert backoff.delay_for(VAULT) == 0
    delays = []
    for _ in range(8):
        backoff.record_failure(VAULT)
        delays.append(backoff.delay_for(VAULT))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay_for(OTHER) == 0  # per vault
    backoff.record_success(VAULT)
    assert backoff.delay_for(VAULT) == 0 and backoff.failures(VAULT) == 0
    backoff.record_failure(VAULT)
    assert backoff.delay_for(VAULT) == 1


def test_backoff_wait_counts_down_from_the_last_failure(tmp_path: Path) -> None:
    clock = Clock()
    backoff = Backoff(tmp_path / "backoff.json", clock=clock)
    for _ in range(3):
        backoff.record_failure(VAULT)
    assert backoff.delay_for(VAULT) == 4
    clock.now += 3
    assert backoff.delay_for(VAULT) == 1
    clock.now += 10
    assert backoff.delay_for(VAULT) == 0
    clock.now -= 3600  # the clock was set back: never more than the nominal delay
    assert backoff.delay_for(VAULT) == 4
    backoff.record_failure(VAULT)
    clock.now += 0.5
    assert backoff.delay_for(VAULT) == 7.5


FAILER = """
import sys, uuid
from pathlib import Path
from kryptvault.session.audit import Backoff
backoff = Backoff(Path(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    backoff.record_failure(uuid.UUID(sys.argv[3]))
print(backoff.delay_for(uuid.UUID(sys.argv[3])))
"""


def test_backoff_persists_across_processes_and_counts_concurrent_failures(tmp_path: Path) -> None:
    path = tmp_path / "state" / "backoff.json"
    procs = [
        subprocess.Popen([sys.executable, "-c", FAILER, str(path), "15", str(VAULT)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    backoff = Backoff(path)
    assert backoff.failures(VAULT) == 60  # no lost update among 4 x 15 read-modify-writes
    assert 59 < backoff.delay_for(VAULT) <= 60
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    backoff.record_success(VAULT)
    out = subprocess.run(
        [sys.executable, "-c", FAILER, str(path), "2", str(VAULT)], capture_output=True, text=True, check=True
    )
    assert 1.9 < float(out.stdout) <= 2.0  # another process sees the reset, then 2 failures


def test_damaged_backoff_state_is_treated_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "backoff.json"
    path.write_text("{not json")
    backoff = Backoff(path)
    assert backoff.delay_for(VAULT) == 0
    backoff.record_failure(VAULT)
    assert backoff.failures(VAULT) == 1


# ---------------------------------------------------------------------- kryptvault log


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    log = AuditLog()
    assert log.path == tmp_path / "state" / "kryptvault" / "audit.jsonl"
    log.path.write_text(
        json.dumps({"ts": "2026-11-30T11:20:01.123Z", "event": "lock", "vault": str(VAULT),
                    "reason": "unplug", "route": "uevent", "error": None}) + "\n"
        + json.dumps({"ts": "2026-11-30T11:25:00.000Z", "event": "control_connect", "vault": str(OTHER),
                      "pid": 42, "uid": 1000, "accepted": False, "reason": "uid"}) + "\n"
        + json.dumps({"ts": "2026-11-30T11:30:00.000Z", "event": "mount", "vault": str(VAULT),
                      "mountpoint": "/home/a b/Vault"}) + "\n"
    )  # fmt: skip
    return tmp_path / "state"


def test_log_command_prints_one_human_line_per_entry(state_home: Path) -> None:
    result = run_cli("log")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"2026-11-30 11:20:01.123 lock vault={VAULT} reason=unplug route=uevent",
        f"2026-11-30 11:25:00.000 control_connect vault={OTHER} pid=42 uid=1000 accepted=no reason=uid",
        f'2026-11-30 11:30:00.000 mount vault={VAULT} mountpoint="/home/a b/Vault"',
    ]


def test_log_command_filters_and_prints_json(state_home: Path) -> None:
    result = run_cli("log", "--vault", str(VAULT), "--since", "2026-11-30T11:21:00+00:00", "--json")
    assert result.exit_code == 0, result.output
    [entry] = [json.loads(line) for line in result.output.splitlines()]
    assert entry["event"] == "mount" and entry["mountpoint"] == "/home/a b/Vault"


def test_log_command_without_a_log_prints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "empty"))
    result = run_cli("log")
    assert (result.exit_code, result.output) == (0, "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since: not an ISO-8601 time"),
        (["--vault", "nope"], "--vault: not a vault UUID"),
    ],
)
def test_log_command_bad_options_are_one_line_usage_errors(
    state_home: Path, args: list[str], message: str
) -> None:
    result = run_process("log", *args)
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert message in result.stderr


def test_log_follow_prints_new_entries_until_interrupted(state_home: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(state_home), "TZ": "UTC"}
    from cli_helpers import KRYPTVAULT

    proc = subprocess.Popen(
        [KRYPTVAULT, "log", "--follow", "--vault", str(VAULT)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert " lock " in proc.stdout.readline()
        assert " mount " in proc.stdout.readline()
        AuditLog(state_home / "kryptvault" / "audit.jsonl").append("unmount", vault=VAULT)
        assert " unmount vault=" in proc.stdout.readline()
    finally:
        proc.send_signal(2)
        assert proc.wait(10) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_commands_other_than_mount_back_off_and_audit_failed_unlocks(tmp_path: Path) -> None:
    """passwd and fsck (any command that unlocks) pay the back-off and leave
    `unlock_failed`; a right password resets the count and leaves `unlock_ok`."""
    from cli_helpers import make_vault, write_password_file

    from kryptvault.session.paths import state_dir

    vault = make_vault(tmp_path)
    vault_uuid = uuid.UUID(vault.uuid)
    bad = write_password_file(tmp_path / "bad", "not the password at all")
    new = write_password_file(tmp_path / "new", "another good password")
    wrong = ["--token", str(vault.token), "--password-file", str(bad)]

    first = run_process("passwd", vault.container, *wrong, "--new-password-file", new)
    assert first.returncode == 1 and "wrong password or wrong token" in first.stderr
    assert_clean_error(first.stderr)
    assert Backoff().failures(vault_uuid) == 1
    started = time.monotonic()
    second = run_process("fsck", vault.container, *wrong)
    waited = time.monotonic() - started
    assert second.returncode == 1 and "wrong password or wrong token" in second.stderr
    assert_clean_error(second.stderr)  # the wait is announced on a terminal only
    assert waited >= 1.0  # an unlock with the test's 8 MiB Argon2 takes well under that
    assert Backoff().failures(vault_uuid) == 2

    entries = list(read_entries(state_dir() / "audit.jsonl", vault=vault_uuid))
    failed = [e for e in entries if e["event"] == "unlock_failed"]
    assert len(failed) == 2 and all(e["method"] == "token+password" for e in failed)
    assert "not the password" not in (state_dir() / "audit.jsonl").read_text()

    started = time.monotonic()
    ok = run_process("recovery-key", "add", vault.container, *vault.pw())
    assert ok.returncode == 0, ok.stderr
    # The second failure doubled the wait to 2 s, counted from that failure (which ended
    # just before `started`): a single wait would be 1 s.
    assert time.monotonic() - started >= 1.5
    assert Backoff().failures(vault_uuid) == 0
    last = list(read_entries(state_dir() / "audit.jsonl", vault=vault_uuid))[-1]
    assert last["event"] == "unlock_ok" and last["slot"] == 0
