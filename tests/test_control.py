"""The control socket: who may connect, what may be asked, and what gets audited."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kryptvault.errors import KryptvaultError
from kryptvault.session.audit import AuditLog, read_entries
from kryptvault.session.control import (
    MAX_CONNECTIONS,
    MAX_REQUEST,
    MAX_REQUESTS_PER_CONNECTION,
    ControlClient,
    ControlServer,
    DaemonNotRunningError,
    NoAnswerError,
    PeerCred,
    list_sockets,
    socket_path_for,
)

VAULT = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab"
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid)")


def status(args: dict[str, object], peer: PeerCred) -> dict[str, object]:
    return {"state": "mounted"}


def echo(args: dict[str, object], peer: PeerCred) -> dict[str, object]:
    return {"args": args, "peer": [peer.pid, peer.uid, peer.gid]}


def refuse(args: dict[str, object], peer: PeerCred) -> dict[str, object]:
    raise KryptvaultError("no backup hold\nto release")


def crash(args: dict[str, object], peer: PeerCred) -> dict[str, object]:
    raise RuntimeError("secret internals")


def slow(args: dict[str, object], peer: PeerCred) -> dict[str, object]:
    time.sleep(float(str(args.get("seconds", 0.2))))
    return {}


HANDLERS = {"status": status, "echo": echo, "refuse": refuse, "crash": crash, "slow": slow}


@pytest.fixture
def run_dir(short_tmp: Path) -> Path:
    directory = short_tmp / "run"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def server(run_dir: Path, audit_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(run_dir / f"{VAULT}.sock", HANDLERS, AuditLog(audit_path))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def raw(path: Path, data: bytes) -> list[dict[str, object]]:
    """Send raw bytes and end our side; every reply until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already refused and closed; its reply is still readable
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # it closed with our request unread
                break
            if not chunk:
                break
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def audit_events(path: Path, event: str) -> list[dict[str, object]]:
    return [e for e in read_entries(path) if e["event"] == event]


# ---------------------------------------------------------------------- the socket


def test_socket_is_mode_0600_and_only_its_owner_can_reach_it(server: ControlServer, run_dir: Path) -> None:
    info = server.socket_path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in run_dir.iterdir()) == [f"{VAULT}.sock", f"{VAULT}.sock.lock"]


def test_directory_writable_by_others_is_refused(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(KryptvaultError, match="writable by others"):
        ControlServer(shared / "x.sock", HANDLERS, None).start()


def test_second_server_for_the_same_vault_refuses_to_start(server: ControlServer) -> None:
    with pytest.raises(KryptvaultError, match="already serving"):
        ControlServer(server.socket_path, HANDLERS, None).start()
    assert ControlClient(server.socket_path).request("status")["state"] == "mounted"


def test_a_live_server_without_our_lock_is_not_replaced(run_dir: Path) -> None:
    path = run_dir / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        with pytest.raises(KryptvaultError, match="already answering"):
            ControlServer(path, HANDLERS, None).start()
    assert path.exists()


def test_stale_socket_is_removed_and_replaced(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, then its process "died": nothing listens
    with ControlServer(path, HANDLERS, None):
        assert ControlClient(path).request("status")["ok"] is True


def test_existing_file_that_is_not_a_socket_is_left_alone(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    path.write_text("precious")
    with pytest.raises(KryptvaultError, match="not a socket"):
        ControlServer(path, HANDLERS, None).start()
    assert path.read_text() == "precious"


def test_stop_closes_open_connections_unlinks_the_socket_and_is_prompt(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    srv = ControlServer(path, HANDLERS, None)
    srv.start()
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(path))
    time.sleep(0.05)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 0.5
    assert not path.exists() and not (run_dir / f"{VAULT}.sock.lock").exists()
    idle.settimeout(2)
    assert idle.recv(100) == b""  # the server side was shut down
    idle.close()
    with pytest.raises(DaemonNotRunningError, match="no kryptvault daemon is running"):
        ControlClient(path).request("status")
    srv.stop()  # twice is harmless


# ---------------------------------------------------------------------- who may connect


def test_same_uid_client_gets_status_and_its_real_credentials(server: ControlServer) -> None:
    client = ControlClient(server.socket_path)
    assert client.request("status") == {"state": "mounted", "ok": True}
    reply = client.request("echo", hold=3, reason="command", dry=True, note=None)
    assert reply["args"] == {"hold": 3, "reason": "command", "dry": True, "note": None}
    assert reply["peer"] == [os.getpid(), os.getuid(), os.getgid()]


@ROOT
def test_another_uid_is_refused_by_its_peer_credentials(short_tmp: Path, audit_path: Path) -> None:
    # Only in this test: directory 0711 and socket 0666, so that uid 65534 can reach and
    # connect to the socket at all. Normally the 0700 directory and 0600 socket stop it
    # first; here the SO_PEERCRED check is the only thing left that can refuse it.
    run_dir = short_tmp / "open"
    run_dir.mkdir()
    run_dir.chmod(0o711)
    short_tmp.chmod(0o711)
    path = run_dir / f"{VAULT}.sock"
    with ControlServer(path, HANDLERS, AuditLog(audit_path)):
        path.chmod(0o666)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only raw syscalls, then _exit (the parent has threads)
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(str(path))
                    try:
                        sock.sendall(b'{"op": "status"}\n')
                    except OSError:
                        pass
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                os.write(write_end, data or b"(nothing)\n")
                os._exit(0)
            except BaseException as exc:
                os.write(write_end, f"child failed: {exc!r}\n".encode())
                os._exit(1)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            answer = f.read()
        _, code = os.waitpid(pid, 0)
        assert code == 0, answer
    reply = json.loads(answer)
    assert reply["ok"] is False and "uid 65534" in str(reply["error"])
    connects = audit_events(audit_path, "control_connect")
    assert {(e["uid"], e["accepted"], e["reason"]) for e in connects} == {(65534, False, "uid")}
    assert connects[0]["pid"] == pid
    assert audit_events(audit_path, "control_request") == []  # refused before reading anything


@ROOT
def test_root_may_control_a_vault_served_by_another_uid(short_tmp: Path) -> None:
    run_dir = short_tmp / "user-run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, 65534, 65534)
    short_tmp.chmod(0o711)
    path = run_dir / f"{VAULT}.sock"
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # serve as uid 65534 until the parent is done
        try:
            os.setgid(65534)
            os.setuid(65534)
            srv = ControlServer(path, {"status": echo}, None)
            srv.start()
            os.write(ready_w, b"ok")
            os.read(done_r, 1)
            srv.stop()
            os._exit(0)
        except BaseException as exc:
            os.write(ready_w, repr(exc).encode())
            os._exit(1)
    try:
        assert os.read(ready_r, 200) == b"ok"
        reply = ControlClient(path).request("status")
        assert reply["peer"][1] == 0  # type: ignore[index]
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)


# ---------------------------------------------------------------------- what may be asked


def test_unknown_op_is_rejected_with_the_known_ops(server: ControlServer) -> None:
    with pytest.raises(KryptvaultError, match="unknown op format-disk; known ops: crash, echo, "):
        ControlClient(server.socket_path).request("format-disk")
    [reply] = raw(server.socket_path, b'{"op": "../../etc"}\n')
    assert reply == {"ok": False, "error": reply["error"]}
    assert "(not an op name)" in str(reply["error"])


def test_malformed_requests_get_one_line_errors_and_the_connection_stays_usable(
    server: ControlServer,
) -> None:
    requests = [
        b"not json",
        b"[1, 2]",
        b'{"no-op": 1}',
        b'{"op": 5}',
        b'{"op": "echo", "nested": {"a": 1}}',
        b'{"op": "echo", "list": [1]}',
        b"\xff\xfe",
        b'{"op": "status"}',
    ]
    replies = raw(server.socket_path, b"\n".join(requests) + b"\n")
    assert [r["ok"] for r in replies] == [False] * 7 + [True]
    errors = [str(r["error"]) for r in replies[:7]]
    assert all("\n" not in e for e in errors)
    assert errors[0] == errors[6] == "malformed request: not JSON"
    assert errors[1] == "malformed request: not a JSON object"
    assert errors[2] == errors[3] == "malformed request: 'op' must be a string"
    assert "'nested' of echo must be" in errors[4] and "'list' of echo must be" in errors[5]


def test_request_of_exactly_4_kib_is_served_and_one_byte_more_is_refused(server: ControlServer) -> None:
    def request_of(size: int) -> bytes:
        head = b'{"op": "echo", "pad": "'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    assert len(request_of(MAX_REQUEST)) == MAX_REQUEST
    [ok] = raw(server.socket_path, request_of(MAX_REQUEST) + b"\n")
    assert ok["ok"] is True
    replies = raw(server.socket_path, request_of(MAX_REQUEST + 1) + b"\n" + b'{"op": "status"}\n')
    assert replies == [{"ok": False, "error": f"request too large (more than {MAX_REQUEST} bytes)"}]


def test_endless_request_without_newline_is_cut_off(server: ControlServer) -> None:
    replies = raw(server.socket_path, b"x" * 100_000)
    assert len(replies) == 1 and "too large" in str(replies[0]["error"])


def test_at_most_16_requests_are_served_per_connection(server: ControlServer) -> None:
    replies = raw(server.socket_path, b'{"op": "status"}\n' * (MAX_REQUESTS_PER_CONNECTION + 3))
    assert len(replies) == MAX_REQUESTS_PER_CONNECTION and all(r["ok"] for r in replies)


def test_silent_client_is_dropped_after_the_read_timeout(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    with ControlServer(path, HANDLERS, None, read_timeout=0.3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b'{"op": "sta')  # and then nothing
            started = time.monotonic()
            data = sock.recv(4096)
            assert sock.recv(4096) == b""
            waited = time.monotonic() - started
    assert json.loads(data) == {"ok": False, "error": "no complete request within 0.3 s"}
    assert 0.25 < waited < 2


def test_handler_errors_become_one_line_replies_without_internals(server: ControlServer) -> None:
    client = ControlClient(server.socket_path)
    with pytest.raises(KryptvaultError) as refused:
        client.request("refuse")
    assert str(refused.value) == "no backup hold to release"
    with pytest.raises(KryptvaultError) as crashed:
        client.request("crash")
    assert str(crashed.value) == "internal error while handling crash"
    assert client.request("status")["ok"] is True  # the server survived


def test_slow_handler_does_not_block_other_clients(server: ControlServer) -> None:
    slow_done = threading.Event()
    threading.Thread(
        target=lambda: (ControlClient(server.socket_path).request("slow", seconds=1.0), slow_done.set())
    ).start()
    time.sleep(0.1)
    started = time.monotonic()
    assert ControlClient(server.socket_path).request("status")["ok"] is True
    assert time.monotonic() - started < 0.5
    assert slow_done.wait(5)


def test_connections_beyond_the_limit_are_refused_as_busy(server: ControlServer, audit_path: Path) -> None:
    idle = []
    for _ in range(MAX_CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.socket_path))
        idle.append(sock)
    time.sleep(0.1)
    try:
        with pytest.raises(KryptvaultError, match="busy"):
            ControlClient(server.socket_path).request("status")
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.1)
    assert ControlClient(server.socket_path).request("status")["ok"] is True
    reasons = [e["reason"] for e in audit_events(audit_path, "control_connect")]
    assert reasons.count("busy") == 1


def test_client_times_out_on_a_daemon_that_does_not_answer(server: ControlServer) -> None:
    started = time.monotonic()
    with pytest.raises(KryptvaultError, match=r"did not answer within 0\.3 s"):
        ControlClient(server.socket_path, timeout=0.3).request("slow", seconds=1.5)
    assert time.monotonic() - started < 1.0


def test_client_says_in_one_line_that_no_daemon_runs(short_tmp: Path) -> None:
    with pytest.raises(DaemonNotRunningError) as missing:
        ControlClient(short_tmp / f"{VAULT}.sock").request("status")
    assert "\n" not in str(missing.value) and VAULT in str(missing.value)


# A server in a process of its own: `end` answers and then ends the process at once (as
# a lock does), `die` ends it before answering (a daemon killed or locked by another route).
ENDING_SERVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from kryptvault.session.control import AfterReply, ControlServer

    def end(args, peer):
        return AfterReply({"ending": True}, lambda: os._exit(7))

    def die(args, peer):
        os._exit(9)

    ControlServer(Path(sys.argv[1]), {"end": end, "die": die}, None).start()
    print("ready", flush=True)
    time.sleep(60)
    """
)


@contextlib.contextmanager
def _ending_server(path: Path) -> Iterator[subprocess.Popen[str]]:
    """The ENDING_SERVER, serving at `path` until the block ends (then killed)."""
    child = subprocess.Popen(
        [sys.executable, "-c", ENDING_SERVER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        child.stdout.close()
        yield child
    finally:
        child.kill()
        child.wait()


def test_an_op_that_ends_the_process_still_gets_its_answer_to_the_client(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    for _ in range(5):
        with _ending_server(path) as child:
            assert ControlClient(path, timeout=10).request("end") == {"ending": True, "ok": True}
            assert child.wait(10) == 7  # the action ran, after the answer


def test_the_action_after_the_answer_runs_even_if_the_client_left_first(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    with _ending_server(path) as child:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b'{"op":"end"}\n')
        assert child.wait(10) == 7


def test_client_tells_a_connection_closed_without_an_answer_apart(run_dir: Path) -> None:
    path = run_dir / f"{VAULT}.sock"
    with _ending_server(path) as child:
        with pytest.raises(NoAnswerError, match="closed the connection without answering"):
            ControlClient(path, timeout=10).request("die")
        assert child.wait(10) == 9


# ---------------------------------------------------------------------- audit


def test_every_connection_and_request_is_audited_with_peer_pid_uid_and_op_only(
    server: ControlServer, audit_path: Path
) -> None:
    client = ControlClient(server.socket_path)
    client.request("status")
    client.request("echo", reason="hunter2-looks-secret")
    with pytest.raises(KryptvaultError):
        client.request("no-such-op")
    raw(server.socket_path, b'{"op": "status"}\n{"op": "status"}\n')
    connects = audit_events(audit_path, "control_connect")
    requests = audit_events(audit_path, "control_request")
    assert len(connects) == 4
    assert all(
        (e["pid"], e["uid"], e["accepted"], e["vault"]) == (os.getpid(), os.getuid(), True, VAULT)
        for e in connects
    )
    assert [(e["op"], e["outcome"]) for e in requests] == [
        ("status", "ok"),
        ("echo", "ok"),
        ("no-such-op", "unknown_op"),
        ("status", "ok"),
        ("status", "ok"),
    ]
    assert all(e["pid"] == os.getpid() and e["uid"] == os.getuid() for e in requests)
    assert "hunter2" not in audit_path.read_text()


# ---------------------------------------------------------------------- paths


def test_socket_paths_live_in_the_private_runtime_dir(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp / "xdg"))
    (short_tmp / "xdg").mkdir(mode=0o700)
    path = socket_path_for(VAULT.replace("-", ""))  # the 32-hex spelling of unit names
    assert path == short_tmp / "xdg" / "kryptvault" / f"{VAULT}.sock"
    assert list_sockets() == []
    with ControlServer(path, HANDLERS, None):
        (path.parent / "not-a-socket.sock").write_text("")
        assert list_sockets() == [path]
    with pytest.raises(KryptvaultError, match="not a vault UUID"):
        socket_path_for("../../etc/passwd")


def test_socket_path_too_long_for_sun_path_is_a_one_line_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    with pytest.raises(KryptvaultError, match="too long"):
        ControlServer(deep / f"{VAULT}.sock", HANDLERS, None).start()
    with pytest.raises(KryptvaultError, match="cannot connect"):
        ControlClient(deep / f"{VAULT}.sock").request("status")
