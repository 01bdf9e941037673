"""Tokens on a real block-device filesystem (ext4 on a loop device), including "unplug".

The host kernel has no vfat and no USB stack, so an ext4 image stands in for the stick;
detaching the loop device after unmounting it is the unplug.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kryptvault.errors import TokenError
from kryptvault.token import (
    DirectoryToken,
    FsUuidToken,
    Share,
    list_registrations,
    resolve_token,
)

pytestmark = pytest.mark.root


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class Stick:
    image: Path
    mountpoint: Path
    dev: str = ""
    fs_uuid: str = ""
    mounted: bool = False

    def plug(self) -> None:
        self.dev = run("losetup", "-f", "--show", str(self.image))
        run("mount", self.dev, str(self.mountpoint))
        self.mounted = True
        self.fs_uuid = run("blkid", "-o", "value", "-s", "UUID", self.dev)

    def unplug(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            self.mounted = False
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = ""


@pytest.fixture
def stick(tmp_path: Path) -> Iterator[Stick]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mount)")
    image, mountpoint = tmp_path / "stick.img", tmp_path / "mnt"
    mountpoint.mkdir()
    run("mkfs.ext4", "-q", "-F", str(image), "8M")
    s = Stick(image, mountpoint)
    try:
        s.plug()
        yield s
    finally:
        s.unplug()


def fill(path: Path) -> None:
    """Write until the filesystem refuses: as root, its reserved blocks are used up too."""
    with open(path / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 4096, 1024, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.fsync(f.fileno())


def leftovers(share_dir: Path) -> list[str]:
    return [n for n in os.listdir(share_dir) if ".tmp-" in n] if share_dir.is_dir() else []


def test_a_directory_on_the_stick_is_a_token_until_unplugged(stick: Stick) -> None:
    folder = stick.mountpoint / "keys"
    folder.mkdir()
    token = resolve_token(str(folder))
    assert isinstance(token, DirectoryToken)
    assert token.is_present()
    vault = uuid.uuid4()
    token.write_share(Share.generate(vault, generation=11))
    assert token.read_share(vault).generation == 11
    stick.unplug()
    # The empty mountpoint directory is still there, on the parent filesystem.
    assert not token.is_present()
    with pytest.raises(TokenError, match="not present"):
        token.read_share(vault)


def test_a_filesystem_uuid_token_keeps_shares_in_dot_kryptvault(stick: Stick) -> None:
    token = resolve_token(f"fs:{stick.fs_uuid.upper()}")
    assert isinstance(token, FsUuidToken)
    # The device's own spelling is recorded, whatever case the user typed.
    assert token.identity.fs_uuid == stick.fs_uuid
    assert token.identity.binding() == b"fs-uuid:" + stick.fs_uuid.encode()
    assert token.share_dir == stick.mountpoint / ".kryptvault"
    assert token.is_present()
    vault = uuid.uuid4()
    token.write_share(Share.generate(vault))
    assert (stick.mountpoint / ".kryptvault").stat().st_mode & 0o777 == 0o700
    assert list_registrations(token) == [vault]
    assert token.has_share(vault)
    stick.unplug()
    assert not token.is_present()
    with pytest.raises(TokenError, match="not present"):
        token.read_share(vault)
    with pytest.raises(TokenError, match="no mounted filesystem has UUID"):
        resolve_token(f"fs:{stick.fs_uuid}")


def test_a_full_token_fails_with_token_is_full_and_leaves_no_temp_file(stick: Stick) -> None:
    token = resolve_token(f"fs:{stick.fs_uuid}")
    first = uuid.uuid4()
    token.write_share(Share.generate(first))
    fill(stick.mountpoint)
    with pytest.raises(TokenError, match="token is full"):
        token.write_share(Share.generate(uuid.uuid4()))
    assert leftovers(token.share_dir) == []
    assert list_registrations(token) == [first]
    assert token.read_share(first).vault_uuid == first


def test_a_read_only_token_fails_with_read_only(stick: Stick) -> None:
    token = resolve_token(f"fs:{stick.fs_uuid}")
    vault = uuid.uuid4()
    token.write_share(Share.generate(vault, generation=1))
    run("mount", "-o", "remount,ro", str(stick.mountpoint))
    assert token.is_present()
    with pytest.raises(TokenError, match="token filesystem is read-only"):
        token.write_share(Share.generate(vault, generation=2))
    assert token.read_share(vault).generation == 1
    folder_token = resolve_token(str(stick.mountpoint / ".kryptvault"))
    with pytest.raises(TokenError, match="read-only"):
        folder_token.write_share(Share.generate(uuid.uuid4()))


def test_a_fresh_read_only_token_cannot_get_its_share_directory(stick: Stick) -> None:
    run("mount", "-o", "remount,ro", str(stick.mountpoint))
    token = resolve_token(f"fs:{stick.fs_uuid}")
    with pytest.raises(TokenError, match="read-only"):
        token.write_share(Share.generate(uuid.uuid4()))


def test_a_different_filesystem_mounted_in_its_place_is_not_the_token(stick: Stick, tmp_path: Path) -> None:
    token = resolve_token(f"fs:{stick.fs_uuid}")
    stick.unplug()
    other = Stick(tmp_path / "other.img", stick.mountpoint)
    run("mkfs.ext4", "-q", "-F", str(other.image), "8M")
    try:
        other.plug()
        assert not token.is_present()
    finally:
        other.unplug()


def test_presence_checks_are_cheap_enough_to_poll(stick: Stick) -> None:
    folder = stick.mountpoint / "keys"
    folder.mkdir()
    for token in (resolve_token(f"fs:{stick.fs_uuid}"), resolve_token(str(folder))):
        times = []
        for _ in range(200):
            start = time.perf_counter()
            assert token.is_present()
            times.append(time.perf_counter() - start)
        assert sorted(times)[len(times) // 2] < 0.005
