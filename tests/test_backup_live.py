"""Live backups: the vault stays open and keeps being written and committed while a
backup hold keeps the held generation's units from being reused.

* in-process, against a real ObjectStore: the copy is exactly the held generation;
* against a real `kryptvault mount` daemon over its control socket;
* the hold is always released, whatever fails.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import make_vault, mounted_vault_and_dest, run_process
from test_backup_support import OpenVault

from kryptvault.backup.engine import run_backup
from kryptvault.backup.restore import run_restore
from kryptvault.backup.source import HoldInfo, StoreHold
from kryptvault.backup.verify import verify_set
from kryptvault.errors import KryptvaultError, UsageError
from kryptvault.session.paths import state_dir


def test_live_backup_in_process_is_exactly_the_held_generation(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    ov = OpenVault.of(vault)
    rnd = random.Random(5)
    big = bytearray(rnd.randbytes(3 << 20))
    ov.write("/big.bin", bytes(big))
    expected: dict[str, bytes] = {"/big.bin": bytes(big)}
    states: dict[int, dict[str, bytes]] = {ov.commit(): dict(expected)}
    stop = threading.Event()
    cond = threading.Condition()
    commits = [0]
    failures: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                name = f"/f{i % 5}.bin"
                data = rnd.randbytes(rnd.randrange(1000, 150_000))
                ov.write(name, data)
                expected[name] = data
                at = rnd.randrange(0, len(big) - 65536)
                patch = rnd.randbytes(65536)
                ov.write("/big.bin", patch, offset=at, truncate=False)  # frees the old blocks
                big[at : at + len(patch)] = patch
                expected["/big.bin"] = bytes(big)
                generation = ov.commit()
                states[generation] = dict(expected)
                with cond:
                    commits[0] += 1
                    cond.notify_all()
        except BaseException as exc:
            failures.append(exc)
            with cond:
                cond.notify_all()

    def interleave(done: int, total: int) -> None:
        """Between steps of the copy, let the writer commit (and free held units) twice."""
        with cond:
            target = commits[0] + 2
            cond.wait_for(lambda: commits[0] >= target or bool(failures), timeout=20)

    hold = StoreHold(ov.store, ov.fd, lock=ov.store._lock)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        first = run_backup(vault.container, dest, live_hold=hold, progress=interleave)
        with cond:
            cond.wait_for(lambda: commits[0] >= 3, timeout=20)
        second = run_backup(vault.container, dest, live_hold=hold, progress=interleave)
    finally:
        stop.set()
        thread.join()
        ov.close()
    assert not failures, failures
    assert hold.held == 0
    assert first.live and second.live and second.method == "incremental"
    assert first.generation < second.generation
    assert commits[0] > 6, "the writer did not run during the backups"
    for result in (first, second):
        out = tmp_path / f"v{result.version}.kv"
        run_restore(dest, result.version, out)
        with OpenVault.of(vault, out, read_only=True) as restored:
            assert restored.store.generation == result.generation
            assert restored.files() == states[result.generation]
            assert restored.store.verify() == []
    assert verify_set(dest, version=1).ok


class _RecordingHold:
    def __init__(self, inner: StoreHold | None = None, generation: int = 1) -> None:
        self.inner = inner
        self.generation = generation
        self.calls: list[str] = []

    def hold(self) -> HoldInfo:
        self.calls.append("hold")
        if self.inner is not None:
            return self.inner.hold()
        return HoldInfo(self.generation)

    def release(self) -> None:
        self.calls.append("release")
        if self.inner is not None:
            self.inner.release()


def test_the_hold_is_released_when_the_backup_fails(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    hold = _RecordingHold()
    with pytest.raises(UsageError, match="does not exist"):
        run_backup(vault.container, tmp_path / "missing", live_hold=hold)
    assert hold.calls == ["hold", "release"]
    # A mounted container (held exclusively) goes to the daemon that serves it.
    import fcntl

    dest = tmp_path / "dest"
    dest.mkdir()
    found: list[object] = []
    with OpenVault.of(vault) as ov:
        fd = os.open(vault.container, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            daemon = _RecordingHold(StoreHold(ov.store, ov.fd))

            def find(vault_uuid: object) -> _RecordingHold:
                found.append(vault_uuid)
                return daemon

            result = run_backup(vault.container, dest, find_daemon=find)
        finally:
            os.close(fd)
    assert result.live and daemon.calls == ["hold", "release"]
    assert [str(u) for u in found] == [vault.uuid]


def test_a_daemon_answer_without_a_generation_is_refused(tmp_path: Path) -> None:
    from kryptvault.backup.source import ControlHold

    class Client:
        def __init__(self, reply: dict[str, object]) -> None:
            self.reply = reply
            self.ops: list[str] = []

        def request(self, op: str, **args: object) -> dict[str, object]:
            self.ops.append(op)
            return self.reply if op == "backup-hold" else {"released": True}

    with pytest.raises(KryptvaultError, match="no generation"):
        ControlHold(Client({"ok": True})).hold()
    area = os.urandom(65536)
    import base64

    client = Client({"generation": 7, "header_area": base64.b64encode(area).decode()})
    info = ControlHold(client).hold()
    assert info == HoldInfo(7, area)


@pytest.mark.fuse
def test_live_backup_of_a_mounted_vault_through_the_control_socket(tmp_path: Path) -> None:
    vault, mnt, dest = mounted_vault_and_dest(tmp_path)

    def content(prefix: str, i: int) -> bytes:
        return random.Random(f"{prefix}{i}").randbytes(20_000 + 997 * i)

    stop = threading.Event()
    written: list[int] = []
    try:
        for i in range(10):
            (mnt / f"before{i}.bin").write_bytes(content("before", i))
        ready_before = 10

        def writer() -> None:
            i = 0
            while not stop.is_set():
                (mnt / f"during{i}.bin").write_bytes(content("during", i))
                written.append(i)
                i += 1
                time.sleep(0.005)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            first = run_process("backup", vault.container, dest, "--json")
            time.sleep(0.3)
            second = run_process("backup", vault.container, dest, "--json")
        finally:
            stop.set()
            thread.join()
        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
        results = [json.loads(first.stdout), json.loads(second.stdout)]
        assert all(r["live"] for r in results) and results[1]["method"] == "incremental"
        status = json.loads(run_process("status", "--json").stdout)
        assert [s["backup_holds"] for s in status if s["vault"] == vault.uuid] == [0]
    finally:
        run_process("lock", mnt)
    assert written, "the writer did not run"
    for result in results:
        out = tmp_path / f"restored-{result['version']}.kv"
        run_restore(dest, result["version"], out)
        with OpenVault.of(vault, out, read_only=True) as restored:
            assert restored.store.verify() == []
            files = restored.files()
        for i in range(ready_before):
            assert files[f"/before{i}.bin"] == content("before", i)
        during = sorted(int(name[7:-4]) for name in files if name.startswith("/during"))
        assert during == list(range(len(during)))  # a prefix of what was written, in order
        for i in during:
            full = content("during", i)
            got = files[f"/during{i}.bin"]
            assert got == full or (i == during[-1] and full.startswith(got)), i
    full_check = run_process("verify", dest, "--full", "--version", "1", *vault.pw())
    assert full_check.returncode == 0, full_check.stdout + full_check.stderr


def test_the_hold_of_a_backup_killed_mid_way_is_released_by_the_daemon(tmp_path: Path) -> None:
    """A backup killed before it could release its hold must not keep the vault's freed
    space from being reused until the next lock: the daemon notices the dead process."""
    vault, mnt, _dest = mounted_vault_and_dest(tmp_path)
    taker = (
        "import sys, time, uuid\n"
        "from pathlib import Path\n"
        "from kryptvault.backup.source import ControlHold\n"
        "hold = ControlHold.for_container(uuid.UUID(sys.argv[1]), Path(sys.argv[2]))\n"
        "assert hold is not None\n"
        "hold.hold()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    audit_path = state_dir() / "audit.jsonl"
    audit_start = audit_path.stat().st_size if audit_path.exists() else 0
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", taker, vault.uuid, str(vault.container)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert _holds(vault.uuid) == 1
        finally:
            holder.kill()
            holder.wait()
        deadline = time.monotonic() + 10
        while _holds(vault.uuid) != 0:
            assert time.monotonic() < deadline, "the dead backup's hold was never released"
            time.sleep(0.1)
        with audit_path.open("rb") as f:
            f.seek(audit_start)
            entries = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        expired = [e for e in entries if e.get("event") == "backup_hold_expired"]
        assert [e.get("pid") for e in expired] == [holder.pid], entries
    finally:
        run_process("lock", mnt)


def _holds(vault_uuid: str) -> int:
    status = json.loads(run_process("status", "--json").stdout)
    found = [s["backup_holds"] for s in status if s["vault"] == vault_uuid]
    assert len(found) == 1, status
    return int(found[0])
