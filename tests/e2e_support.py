"""Host side of the kryptvault end-to-end tests in the QEMU USB rig (see tests/usbrig).

`KvGuest` starts ``tests/usbrig_scripts/kvguest.py`` inside the guest and talks to it
through ``<workdir>/chan/kvz``: ``cli(...)`` runs a ``kryptvault`` command there (in a
child forked from a process that has the CLI imported already: a fresh interpreter spends
3-5 s importing under TCG), ``call(...)`` runs any other request. While it waits for an
answer, the host carries out the stick actions the guest asks for (QMP ``device_del`` /
``device_add``), so a whole unplug cycle can run in the guest without round trips.

The guest keeps kryptvault's state and runtime files on its own tmpfs (XDG_STATE_HOME,
XDG_RUNTIME_DIR): the host's ``~/.local/state`` shows through the overlay otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import select
import shlex
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from needs import qemu_opt_out
from usbrig.rig import GuestProcess, RigError, Stick, UsbRig

GUEST_SCRIPTS = Path(__file__).resolve().parent / "usbrig_scripts"
KVGUEST = GUEST_SCRIPTS / "kvguest.py"
PASSWORD = "correct horse battery staple 42"
GUEST_STATE = "/tmp/kvstate"  # XDG_STATE_HOME in the guest: audit.jsonl, daemon logs
GUEST_RUNTIME = "/run/kvuser"  # XDG_RUNTIME_DIR in the guest: control sockets
GUEST_SCRATCH = "/tmp/kvz"  # CLI output, probe files
PASSWORD_FILE = "/tmp/kvz-pw"
KDF = ("--kdf-time-ms", "50", "--kdf-memory-mib", "8")


@dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    rc: int
    out: str
    err: str
    seconds: float

    def check(self) -> CliResult:
        if self.rc != 0:
            what = f"kryptvault {shlex.join(self.args)} -> rc={self.rc}"
            raise AssertionError(f"{what}\n--- stdout\n{self.out}--- stderr\n{self.err}")
        return self

    def json(self) -> Any:
        return json.loads(self.check().out)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class DirectoryWatch:
    """Sleep until a file lands in a directory (inotify), instead of polling for it.

    The guest's requests and answers arrive as renames in the shared directory, written
    by QEMU's 9p server on this host. Polling for them every millisecond cost this side
    ~8 % of a core and ~900 wake-ups a second, taken from the two host cores that run the
    guest's vCPUs while the guest measures its lock latency; inotify costs nothing while
    it waits. `wait()` also returns after `timeout` s, so a missed event only costs time."""

    _IN_CLOSE_WRITE = 0x008  # linux/inotify.h
    _IN_MOVED_TO = 0x080
    _IN_CREATE = 0x100

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = self._IN_MOVED_TO | self._IN_CLOSE_WRITE | self._IN_CREATE
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            errno = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(errno, f"inotify_add_watch {directory} failed")

    def wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._fd, 65536):
                    pass

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


class KvGuest:
    """The guest-side helper process, plus the stick bookkeeping the tests need."""

    def __init__(self, rig: UsbRig, env: Mapping[str, str] | None = None) -> None:
        self.rig = rig
        self.env = dict(env or {})
        self.dir = rig.chan_dir / "kvz"
        self.proc: GuestProcess | None = None
        self._requests = 0
        self._acts = 1
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 180) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {"XDG_STATE_HOME": GUEST_STATE, "XDG_RUNTIME_DIR": GUEST_RUNTIME, **self.env}
        env_args = " ".join(f"--env {shlex.quote(f'{k}={v}')}" for k, v in env.items())
        t0 = time.monotonic()
        self.proc = self.rig.spawn(
            f"mkdir -p {GUEST_RUNTIME} && chmod 700 {GUEST_RUNTIME} && "
            f"printf '%s\\n' {shlex.quote(PASSWORD)} > {PASSWORD_FILE} && "
            f"exec {self.rig.python} -u {KVGUEST} --chan {self.rig.guest_path(self.dir)} "
            f"--scratch {GUEST_SCRATCH} {env_args}"
        )
        self.proc.wait_for_output("# ready", timeout=timeout)
        self.timings["helper_start_s"] = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None or not self.rig.running:
            return
        with contextlib.suppress(RigError, TimeoutError, AssertionError):
            self.call("quit", wait_s=30)
            self.proc.wait(30)

    # ------------------------------------------------------------------ requests
    def call(self, op: str, wait_s: float = 300, **args: Any) -> Any:
        assert self.proc is not None, "start() first"
        self._requests += 1
        number = self._requests
        request = self.dir / f"req-{number}.json"
        tmp = self.dir / f".req-{number}.tmp"
        tmp.write_text(json.dumps({"op": op, "args": args}))
        tmp.rename(request)
        response = self.dir / f"res-{number}.json"
        deadline = time.monotonic() + wait_s
        with DirectoryWatch(self.dir) as changes:
            while not response.exists():
                self._serve_actions()
                if self.proc.poll() is not None:
                    raise RigError(f"the guest helper died: {self.proc.poll()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"guest request {op} {args} took more than {wait_s} s")
                changes.wait(0.05)
        answer = json.loads(response.read_text())
        if not answer["ok"]:
            raise AssertionError(f"guest request {op} failed:\n{answer['error']}")
        return answer["result"]

    def cli(self, *args: str, timeout: float = 120, stdin: str | None = None) -> CliResult:
        res = self.call("cli", wait_s=timeout + 30, args=list(args), timeout=timeout, stdin=stdin)
        return CliResult(tuple(args), res["rc"], res["out"], res["err"], res["s"])

    def sh(self, command: str, timeout: float = 120) -> CliResult:
        res = self.call("sh", wait_s=timeout + 30, command=command, timeout=timeout)
        return CliResult(("sh", command), res["rc"], res["out"], res["err"], res["s"])

    def _serve_actions(self) -> None:
        path = self.dir / f"act-{self._acts}.json"
        try:
            ctime_ns = path.stat().st_ctime_ns  # when the guest's rename landed on our side
        except FileNotFoundError:
            return
        seen_mono, seen_real = time.monotonic_ns(), time.time_ns()
        action = json.loads(path.read_text())
        done: dict[str, Any] = {}
        try:
            if action["kind"] == "unplug":
                self.rig.unplug(action["stick"])
                assert self.rig.last_unplug_ns is not None
                # From the guest's request becoming visible here to QMP device_del.
                done["host_delay_ns"] = (self.rig.last_unplug_ns - seen_mono) + max(0, seen_real - ctime_ns)
                done["unplug_s"] = self.rig.timings.get("unplug_s")
            elif action["kind"] == "plug":
                self.rig.plug(action["stick"])
            else:
                raise ValueError(f"unknown action {action}")
        except Exception as exc:
            done["error"] = f"{type(exc).__name__}: {exc}"
        out = self.dir / f"act-{self._acts}.done.json"
        tmp = self.dir / f".act-{self._acts}.done.tmp"
        tmp.write_text(json.dumps(done))
        tmp.rename(out)
        self._acts += 1

    # ------------------------------------------------------------------ sticks
    def mount_stick(self, stick_id: str, mountpoint: str) -> str:
        """Mount the stick's vfat (a superfloppy: the whole disk) at `mountpoint`."""
        dev = self.rig.wait_for_stick(stick_id)
        assert dev is not None
        self.sh(
            f"mkdir -p {mountpoint}; umount -l {mountpoint} 2>/dev/null; mount -o uid=0 {dev} {mountpoint}"
        ).check()
        return dev

    def unplug(self, stick_id: str, mountpoint: str | None = None) -> None:
        """Pull the stick; its filesystem stays in the mount table until umount -l."""
        self.rig.unplug(stick_id)
        self.rig.wait_for_stick(stick_id, present=False)
        if mountpoint:
            self.sh(f"umount -l {mountpoint} 2>/dev/null; true").check()

    def plug(self, stick_id: str, mountpoint: str | None = None) -> str:
        self.rig.plug(stick_id)
        dev = self.rig.wait_for_stick(stick_id)
        assert dev is not None
        if mountpoint:
            self.mount_stick(stick_id, mountpoint)
        return dev

    def is_mounted(self, mountpoint: str) -> bool:
        return self.sh(f"mountpoint -q {mountpoint}").rc == 0


@contextlib.contextmanager
def booted_guest(
    workdir: Path, sticks: Sequence[Stick], env: Mapping[str, str] | None = None
) -> Iterator[KvGuest]:
    """A guest with these sticks and the helper running in it; both stop afterwards.

    `env` goes to the helper and so to every kryptvault process (CLI and daemons).
    """
    qemu_opt_out()
    with UsbRig(workdir, sticks) as rig:
        kv = KvGuest(rig, env)
        kv.start()
        try:
            yield kv
        finally:
            kv.stop()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max by the nearest-rank method (with 20 samples, p99 is the maximum)."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
        "min": ordered[0],
    }


def host_udevd() -> str | None:
    """The host's systemd-udevd (the guest runs the host's binaries), if installed."""
    for path in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd"):
        if Path(path).exists():
            return path
    return None


def host_udevadm() -> str | None:
    return shutil.which("udevadm") or shutil.which("udevadm", path="/usr/bin:/bin:/sbin:/usr/sbin")
