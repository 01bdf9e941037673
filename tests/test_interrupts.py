"""Ctrl-C while a password is being checked: exit 130 with one line, nothing written."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import KRYPTVAULT, PASSWORD, run_cli, run_process

from kryptvault.crypto.kdf import argon2id
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import Secret

SLOW_KDF = ["--kdf-time-ms", "2000", "--kdf-memory-mib", "8"]
# Makes the tty the child's controlling terminal, so that ^C typed on it is a real SIGINT.
WITH_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _wait_until_hashing(pid: int, timeout: float = 30.0) -> None:
    """Argon2id runs its lanes in threads of its own (parallelism 2 or more here): a second
    thread in the single-threaded CLI means the password hash is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(f"/proc/{pid}/task")) > 1:
            return
        time.sleep(0.0005)
    raise AssertionError("the password hash never started")


MULTI_CORE = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="Argon2id runs without threads on 1 CPU")


def test_an_interrupted_argon2id_raises_keyboardinterrupt_and_leaves_no_buffer_exported() -> None:
    password = Secret.from_bytes(b"a long test password")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        argon2id(password, bytes(32), Argon2Params(1000, 8 * 1024, 1)).wipe()
    timer.join()
    assert time.monotonic() - started > 0.3, "the hash ended before the interrupt: nothing tested"
    password.wipe()
    assert password._map.closed  # no view of the password left exported: the page is gone


class _Terminal:
    """The real kryptvault on a pseudo-terminal, typed at like a person would."""

    def __init__(self, *args: str | Path, cwd: Path) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WITH_TTY, KRYPTVAULT, *map(str, args)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            start_new_session=True,
        )
        os.close(slave)
        self.seen = b""
        self._cursor = 0  # where the next expect() starts looking

    def expect(self, text: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen[self._cursor :]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"no {text!r} in {self.seen!r}"
                self.seen += chunk
        self._cursor = self.seen.index(text, self._cursor) + len(text)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.master)
        return code


@MULTI_CORE
def test_ctrl_c_during_init_after_the_second_prompt_exits_130_and_writes_nothing(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.mkdir()
    term = _Terminal("init", "v.kv", "--token", token, *SLOW_KDF, cwd=tmp_path)
    term.expect(b"password: ")
    term.type(PASSWORD.encode() + b"\n")
    term.expect(b"Repeat")  # the second prompt
    term.expect(b"password: ")
    term.type(PASSWORD.encode() + b"\n")
    _wait_until_hashing(term.proc.pid)  # calibrating, then the 2 s hash
    term.type(b"\x03")
    code = term.finish()
    output = term.seen.decode(errors="replace")
    assert code == 130, output
    assert "kryptvault: interrupted" in output
    assert "internal error" not in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]  # no container, no temp file
    assert list(token.iterdir()) == []  # no share file


def _start_mount(tmp_path: Path, kdf: list[str]) -> tuple[subprocess.Popen[str], Path]:
    """A new vault (Argon2id as `kdf` says) and the real `kryptvault mount` of it, running."""
    token = tmp_path / "token"
    token.mkdir()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    made = run_cli("init", tmp_path / "v.kv", "--token", token, "--password-file", pw, *kdf)
    assert made.exit_code == 0, made.output
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["mount", tmp_path / "v.kv", mnt, "--token", token, "--password-file", pw]
    proc = subprocess.Popen(
        [KRYPTVAULT, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, mnt


@MULTI_CORE
@pytest.mark.fuse
def test_sigint_during_the_password_check_of_mount_exits_130_and_mounts_nothing(tmp_path: Path) -> None:
    proc, mnt = _start_mount(tmp_path, SLOW_KDF)
    try:
        _wait_until_hashing(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if os.path.ismount(mnt):
            run_process("lock", mnt)
    assert proc.returncode == 130, err
    assert err.strip() == "kryptvault: interrupted"
    assert not os.path.ismount(mnt)
    mounted = json.loads(run_process("status", "--json").stdout)
    assert not [s for s in mounted if s.get("mountpoint") == str(mnt)]


def _wait_for_daemon(pid: int, timeout: float = 30.0) -> int:
    """The mount daemon child of `pid` (other children, e.g. ldconfig run by ctypes'
    find_library at import, are not it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:  # a task (or child) may end between listing and reading
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"kryptvault.session.daemon" in cmdline:
                    return int(child)
        time.sleep(0.0005)
    raise AssertionError("the mount daemon was never started")


@pytest.mark.fuse
def test_sigint_while_the_daemon_starts_exits_130_and_leaves_no_mount_or_daemon(tmp_path: Path) -> None:
    proc, mnt = _start_mount(tmp_path, ["--kdf-time-ms", "30", "--kdf-memory-mib", "8"])
    try:
        daemon = _wait_for_daemon(proc.pid)
        proc.send_signal(signal.SIGINT)  # the password is checked: the daemon is coming up
        _, err = proc.communicate(timeout=30)
        time.sleep(1.0)  # a daemon left running would have mounted by now
        assert proc.returncode == 130, err
        assert err.strip() == "kryptvault: interrupted"
        assert not os.path.exists(f"/proc/{daemon}") or "Z" in Path(f"/proc/{daemon}/stat").read_text()
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            run_process("lock", mnt)
