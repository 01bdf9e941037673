"""`kryptvault demo`: the whole story on a machine with no USB stick, in one command."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click

from kryptvault.cli.app import cli
from kryptvault.errors import KryptvaultError

STEP_PAUSE = 0.0


def _say(text: str) -> None:
    click.secho(f"\n==> {text}", bold=True)


def _run(*args: str, password: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run our own CLI as a user would (a real process), with the password on a pipe."""
    argv = [sys.executable, "-m", "kryptvault.cli.main", *args]
    pass_fds: tuple[int, ...] = ()
    r = -1
    if password is not None:
        r, w = os.pipe()
        os.write(w, password.encode() + b"\n")
        os.close(w)
        argv += ["--password-fd", str(r)]
        pass_fds = (r,)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, pass_fds=pass_fds, timeout=120)
    finally:
        if r >= 0:
            os.close(r)
    shown = " ".join(a for a in args)
    click.echo(f"$ kryptvault {shown}" + (" --password-fd N" if password else ""))
    for line in (result.stdout + result.stderr).splitlines():
        click.echo(f"  {line}")
    if check and result.returncode != 0:
        raise KryptvaultError(f"demo step failed: kryptvault {args[0]} exited {result.returncode}")
    return result


class LoopStick:
    """An ext4 image on a loop device, mounted: the closest thing to a USB stick here."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.device: str | None = None

    def create(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "KVDEMO", str(self.image)], check=True, capture_output=True
        )

    def plug(self) -> None:
        self.device = subprocess.run(
            ["losetup", "-f", "--show", str(self.image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.mountpoint.mkdir(exist_ok=True)
        subprocess.run(["mount", self.device, str(self.mountpoint)], check=True)

    def unplug(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False)
            self.device = None

    def fs_uuid(self) -> str:
        return subprocess.run(
            ["blkid", "-o", "value", "-s", "UUID", str(self.image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()


@contextlib.contextmanager
def _workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kryptvault-demo-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def _wait_unmounted(mountpoint: Path, timeout: float = 10.0) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not os.path.ismount(mountpoint):
            return time.monotonic() - start
        time.sleep(0.005)
    return None


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the throw-away files (printed at the end).")
def demo(keep: bool) -> None:
    """Walk through the whole story with a throw-away vault and a simulated token."""
    as_root = (
        os.geteuid() == 0 and shutil.which("losetup") is not None and shutil.which("mkfs.ext4") is not None
    )
    password = "demo " + secrets.token_hex(8)
    with _workspace(keep) as work:
        container = work / "vault.kv"
        folder = work / "Private"
        folder.mkdir()
        stick: LoopStick | None = None
        if as_root:
            _say("Making a pretend USB stick: an ext4 image on a loop device, mounted like a stick")
            stick = LoopStick(work / "stick.img", work / "stick")
            stick.create()
            stick.plug()
            token = f"fs:{stick.fs_uuid()}"
            click.echo(f"  the stick's filesystem UUID is {token[3:]}; the vault will be bound to it")
        else:
            _say("Not root, so no loop device: the token is a plain temporary directory this time")
            token_dir = work / "token"
            token_dir.mkdir()
            token = str(token_dir)
        try:
            _say("Creating a vault (password generated for the demo; real use asks you twice)")
            created = _run(
                "init", str(container), "--token", token, "--kdf-time-ms", "200", password=password
            )
            vault_uuid = created.stdout.split()[2]
            _say("Mounting it on a normal folder")
            _run("mount", str(container), str(folder), "--token", token, password=password)
            (folder / "hello.txt").write_text("the vault works\n")
            with open(folder / "hello.txt", "rb+") as f:
                os.fsync(f.fileno())
            click.echo(f"  wrote and fsync-ed {folder / 'hello.txt'}")
            click.echo(
                f"  the container holds no trace of the name: {b'hello.txt' not in container.read_bytes()}"
            )
            _say("Pulling the token out")
            start = time.monotonic()
            if stick is not None:
                stick.unplug()
            else:
                os.rename(work / "token", work / "token-elsewhere")
            gone = _wait_unmounted(folder)
            if gone is None:
                raise KryptvaultError("the vault did not lock after the token left")
            click.echo(
                f"  the folder was unmounted {1000 * (time.monotonic() - start):.0f} ms after the unplug"
            )
            click.echo(f"  {folder} is now an empty directory: {sorted(os.listdir(folder))}")
            _say("The audit log")
            _run("log", "--vault", vault_uuid, check=False)
            _say("Plugging the token back in does not reopen anything by itself; mounting needs the password")
            if stick is not None:
                stick.plug()
            else:
                os.rename(work / "token-elsewhere", work / "token")
            _run("mount", str(container), str(folder), "--token", token, password=password)
            click.echo(f"  {folder / 'hello.txt'}: {(folder / 'hello.txt').read_text().strip()!r}")
            _run("lock", str(folder))
        finally:
            if os.path.ismount(folder):
                _run("lock", str(folder), check=False)
            if stick is not None:
                stick.unplug()
        _say("Done" + (f"; files kept in {work}" if keep else ""))
