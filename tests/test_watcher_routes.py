"""Each automatic route on its own, against real mounts and real kernel uevents (root only).

The host has no USB stack, but loop devices are real block devices with real uevents.
Measured on the host: `losetup -d` sends only `change` uevents (loop devices persist);
removing the device with LOOP_CTL_REMOVE sends the `remove` uevent a pulled stick sends.
Latencies are printed (run with -s) and checked against generous bounds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kryptvault.token.base import Token
from kryptvault.token.dirtoken import DirectoryToken
from kryptvault.token.fstoken import FsUuidToken
from kryptvault.watcher.watcher import TokenWatcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, losetup)")

LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81  # linux/loop.h


class Fired:
    def __init__(self) -> None:
        self.routes: list[str] = []
        self.at: float | None = None
        self.details: list[dict[str, object]] = []
        self.event = threading.Event()

    def on_removed(self, route: str) -> None:
        self.at = time.monotonic()
        self.routes.append(route)
        self.event.set()

    def on_event(self, kind: str, details: dict[str, object]) -> None:
        if kind == "token_removed":
            self.details.append(details)

    def latency_since(self, start: float, timeout: float = 3.0) -> float:
        assert self.event.wait(timeout), "the watcher did not fire"
        assert self.at is not None
        return self.at - start


def report(what: str, seconds: float) -> None:
    print(f"\n[latency] {what}: {seconds * 1000:.1f} ms")


def mount_tmpfs(where: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kvtest", str(where)], check=True)


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mount_tmpfs(mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@dataclass
class Loop:
    image: Path
    dev: str
    number: int
    mnt: Path
    attached: bool = True
    mounted: bool = True

    @property
    def devpath(self) -> str:
        return f"/devices/virtual/block/loop{self.number}"

    def umount(self) -> None:
        umount(self.mnt)
        self.mounted = False

    def detach(self) -> None:
        subprocess.run(["losetup", "-d", self.dev], check=True)
        self.attached = False

    def remove_device(self) -> tuple[float, float]:
        """LOOP_CTL_REMOVE: the block device leaves the kernel, and sends `remove`.

        Returns when the ioctl started and when it returned. Measured here: the uevent comes
        20-30 ms after the start, and the ioctl returns about 15 ms after the uevent.
        """
        fd = os.open("/dev/loop-control", os.O_RDWR)
        try:
            started = time.monotonic()
            fcntl.ioctl(fd, LOOP_CTL_REMOVE, self.number)
            return started, time.monotonic()
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                pytest.skip(f"loop{self.number} was taken by another process meanwhile")
            raise
        finally:
            os.close(fd)


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[Loop]:
    image = tmp_path / "stick.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    mnt = tmp_path / "stick"
    mnt.mkdir()
    loop = Loop(image, dev, int(dev.removeprefix("/dev/loop")), mnt)
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        (mnt / "token").mkdir()
        yield loop
    finally:
        if loop.mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop.attached:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        if not os.path.exists(f"/sys/class/block/loop{loop.number}"):
            fd = os.open("/dev/loop-control", os.O_RDWR)
            try:  # leave the machine with the loop devices it had
                fcntl.ioctl(fd, LOOP_CTL_ADD, loop.number)
            except OSError:
                pass  # someone else's losetup already created it again
            finally:
                os.close(fd)


def make_token(kind: str, loop: Loop) -> Token:
    if kind == "dir":
        return DirectoryToken(loop.mnt / "token")
    fs_uuid = subprocess.run(["blkid", "-s", "UUID", "-o", "value", loop.dev], check=True,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    return FsUuidToken(fs_uuid)


# ---------------------------------------------------------------------- polling


def test_poll_route_fires_within_two_intervals_of_an_unmount(tmpfs_dir: Path) -> None:
    fired = Fired()
    interval = 0.2
    with TokenWatcher(DirectoryToken(tmpfs_dir), fired.on_removed, interval, routes=("poll",)):
        time.sleep(0.05)
        assert not fired.event.is_set()
        started = time.monotonic()
        umount(tmpfs_dir)
        latency = fired.latency_since(started)
    report("poll route (200 ms interval), tmpfs unmount", latency)
    assert fired.routes == ["poll"]
    assert latency < 2 * interval + 0.1


def test_poll_route_alone_also_sees_an_unmounted_loop_filesystem(loop_ext4: Loop) -> None:
    fired = Fired()
    with TokenWatcher(make_token("fs", loop_ext4), fired.on_removed, 0.1, routes=("poll",)):
        started = time.monotonic()
        loop_ext4.umount()
        latency = fired.latency_since(started)
    report("poll route (100 ms interval), ext4 unmount", latency)
    assert fired.routes == ["poll"] and latency < 0.3


def test_watcher_started_on_an_absent_token_fires_at_once(tmpfs_dir: Path) -> None:
    token = DirectoryToken(tmpfs_dir)
    umount(tmpfs_dir)
    fired = Fired()
    started = time.monotonic()
    with TokenWatcher(token, fired.on_removed, 0.5, routes=("poll",)):
        latency = fired.latency_since(started)
    assert latency < 0.1


# ---------------------------------------------------------------------- mount table


def test_mount_route_sees_an_unmount_without_waiting_for_a_poll(tmpfs_dir: Path) -> None:
    fired = Fired()
    with TokenWatcher(DirectoryToken(tmpfs_dir), fired.on_removed, routes=("mount",)):
        time.sleep(0.05)
        started = time.monotonic()
        umount(tmpfs_dir)
        latency = fired.latency_since(started)
    report("mount route, tmpfs unmount", latency)
    assert fired.routes == ["mount"] and latency < 0.25  # includes running umount(8)


def test_mount_route_ignores_other_mounts_coming_and_going(tmpfs_dir: Path, tmp_path: Path) -> None:
    fired = Fired()
    other = tmp_path / "other"
    other.mkdir()
    with TokenWatcher(DirectoryToken(tmpfs_dir), fired.on_removed, routes=("mount",)):
        for _ in range(5):
            mount_tmpfs(other)
            umount(other)
        time.sleep(0.1)
        assert not fired.event.is_set()


# ---------------------------------------------------------------------- uevents


@pytest.mark.parametrize("kind", ["dir", "fs"])
def test_uevent_route_fires_on_the_remove_uevent_of_the_token_block_device(
    loop_ext4: Loop, kind: str
) -> None:
    fired = Fired()
    # Built while the token is present (that is when its devices are resolved), started
    # only after the unmount and the detach, whose `change` uevents would otherwise win:
    # what is left to see is the kernel's `remove`, as for a pulled stick.
    watcher = TokenWatcher(make_token(kind, loop_ext4), fired.on_removed, on_event=fired.on_event,
                           routes=("uevent",))  # fmt: skip
    assert watcher.devices.block == loop_ext4.devpath
    loop_ext4.umount()
    loop_ext4.detach()
    time.sleep(0.1)
    with watcher:
        assert watcher.active_routes == ("uevent",)
        time.sleep(0.05)
        assert not fired.event.is_set()  # no presence check without a uevent about our device
        started, returned = loop_ext4.remove_device()
        latency = fired.latency_since(started)
    after_ioctl = latency - (returned - started)
    report(f"uevent route ({kind} token), from LOOP_CTL_REMOVE start", latency)
    report(f"uevent route ({kind} token), from LOOP_CTL_REMOVE return (< 0: before it)", after_ioctl)
    assert fired.routes == ["uevent"]
    assert fired.details == [{"route": "uevent", "device": loop_ext4.devpath}]
    assert latency < 0.5 and after_ioctl < 0.1


def test_change_uevent_of_the_token_device_triggers_a_presence_check(loop_ext4: Loop) -> None:
    fired = Fired()
    with TokenWatcher(make_token("dir", loop_ext4), fired.on_removed, routes=("uevent",)):
        loop_ext4.umount()
        time.sleep(0.1)
        assert not fired.event.is_set()
        started = time.monotonic()
        loop_ext4.detach()  # the kernel sends change@/devices/virtual/block/loopN
        latency = fired.latency_since(started)
    report("uevent route, change of block/loopN + presence check", latency)
    assert fired.routes == ["uevent"] and latency < 0.3  # includes running losetup(8)


def test_all_routes_together_fire_once_and_fast_on_unmount_and_device_removal(loop_ext4: Loop) -> None:
    fired = Fired()
    with TokenWatcher(make_token("fs", loop_ext4), fired.on_removed, on_event=fired.on_event) as watcher:
        assert watcher.active_routes == ("uevent", "mount", "poll")
        time.sleep(0.05)
        started = time.monotonic()
        loop_ext4.umount()
        loop_ext4.detach()
        loop_ext4.remove_device()
        latency = fired.latency_since(started)
        time.sleep(0.3)  # later routes must not fire again
    report(f"all routes, unmount + detach + remove (won by {fired.routes[0]})", latency)
    assert len(fired.routes) == 1 and len(fired.details) == 1
    assert latency < 0.25
