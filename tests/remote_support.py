"""Real rclone remotes on 127.0.0.1 for tests/test_remote_backup*.py (no tests here).

`rclone serve webdav` and `rclone serve sftp` serve a directory the test can inspect and
damage; moto's server is an S3 endpoint reached through rclone's s3 backend. Each
remote is configured the way a user may do it, with RCLONE_CONFIG_<NAME>_* variables.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from needs import require_tool, unavailable

MOTO = Path(sys.executable).parent / "moto_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Remote:
    kind: str  # webdav, sftp, s3
    name: str  # the rclone remote's name
    env: dict[str, str]  # RCLONE_CONFIG_* for it
    root: Path | None  # the served directory (webdav, sftp), None for S3
    bucket: str = ""
    port: int = 0
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dest(self) -> str:
        """A DEST for kryptvault: rclone:NAME:path."""
        return f"rclone:{self.name}:{self.bucket + '/' if self.bucket else ''}backups"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=_server_env(), start_new_session=True)
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def rclone(self, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(["rclone", *args], input=data, capture_output=True, check=False,
                              env={**os.environ, **self.env}, timeout=60)
        assert done.returncode == 0, f"rclone {' '.join(args)}: {done.stderr.decode(errors='replace')}"
        return done

    def put(self, path: str, data: bytes, scratch: Path) -> None:
        """Replace an object through the remote's own protocol."""
        local = scratch / "object-to-put"
        local.write_bytes(data)
        self.rclone("copyto", "--no-check-dest", str(local), path)  # even when size and time match
        local.unlink()

    def path(self, *parts: str) -> str:
        """An rclone path inside the vault's set directory."""
        base = f"{self.name}:{self.bucket + '/' if self.bucket else ''}backups"
        return "/".join([base, *parts])


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # set on this machine; breaks rclone's and moto's HTTP
    return env


def start_remote(kind: str, tmp: Path, name: str | None = None) -> Remote:
    rclone = require_tool("rclone", "rclone")
    port = free_port()
    name = name or f"kvt{kind}"
    prefix = f"RCLONE_CONFIG_{name.upper()}_"
    if kind == "webdav":
        root = tmp / "webdav-root"
        root.mkdir()
        remote = Remote(kind, name, {prefix + "TYPE": "webdav", prefix + "URL": f"http://127.0.0.1:{port}/"},
                        root, port=port,
                        argv=[rclone, "serve", "webdav", str(root), "--addr", f"127.0.0.1:{port}"])
    elif kind == "sftp":
        root = tmp / "sftp-root"
        root.mkdir()
        password = os.urandom(8).hex()
        obscured = subprocess.run([rclone, "obscure", "-"], input=password.encode(), capture_output=True,
                                  check=True).stdout.decode().strip()
        remote = Remote(kind, name, {prefix + "TYPE": "sftp", prefix + "HOST": "127.0.0.1",
                                     prefix + "PORT": str(port), prefix + "USER": "kv",
                                     prefix + "PASS": obscured, prefix + "SHELL_TYPE": "none",
                                     prefix + "DISABLE_HASHCHECK": "true"},
                        root, port=port,
                        argv=[rclone, "serve", "sftp", str(root), "--addr", f"127.0.0.1:{port}",
                              "--user", "kv", "--pass", password])
    elif kind == "s3":
        if not MOTO.exists():
            unavailable("needs moto_server (pip package moto[server], in the test extras)")
        remote = Remote(kind, name, {prefix + "TYPE": "s3", prefix + "PROVIDER": "Other",
                                     prefix + "ENDPOINT": f"http://127.0.0.1:{port}",
                                     prefix + "ACCESS_KEY_ID": "test", prefix + "SECRET_ACCESS_KEY": "test",
                                     prefix + "REGION": "us-east-1"},
                        None, bucket="kvt-bucket", port=port,
                        argv=[str(MOTO), "-H", "127.0.0.1", "-p", str(port)])
    else:
        raise ValueError(kind)
    remote.start()
    if kind == "s3":
        remote.rclone("mkdir", f"{name}:{remote.bucket}")
    return remote
