"""A throw-away QEMU guest with hot-pluggable emulated USB sticks.

The host has no USB stack, so anything that needs a real kernel USB stack (pyusb
enumeration, uevents on unplug, vfat on a block device) runs in this guest. The guest
sees the host's ``/`` read-only with a tmpfs overlay, so the repository and its venv run
inside it at the same paths. See README.md for the moving parts.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .initramfs import build_initramfs
from .kernel import GuestKernel, ensure_kernel

HERE = Path(__file__).resolve().parent
# Found from this file, not the cwd: CI runs a fresh clone somewhere else entirely.
REPO_ROOT = HERE.parent.parent
GUEST_INIT = HERE / "guest_init.sh"
UEVENT_STAMP = HERE / "uevent_stamp.py"
GUEST_CHAN = "/run/kvrig/chan"
QEMU = "qemu-system-x86_64"
# vCPUs of the guest (multi-threaded TCG, one host thread each). Two, like any machine
# with a USB port: with one, the kernel's USB teardown, the test's own listener and writer
# and the vault daemon all queue for a single emulated CPU during an unplug. Measured on
# the 2-core host (tests/test_e2e_unplug.py, 20 pulls, both with the 64 MiB translation
# cache of the time): remove uevent -> locked p50 100 / p99 208 ms with 2 vCPUs against
# p50 187-203 / p99 327-474 ms with 1. KRYPTVAULT_USBRIG_CPUS=1 measures the old way.
GUEST_CPUS = int(os.environ.get("KRYPTVAULT_USBRIG_CPUS", "2"))
# TCG's translation cache, in MiB. The guest's kernel, Python and libraries translate to
# ~140 MiB of host code; with a 64 MiB cache QEMU flushed it 36 times during the 20 pulls
# of tests/test_e2e_unplug.py, and after each flush the guest re-translates whatever it
# runs, so a pull that met a flush was slow in every step at once (p99 271-528 ms, the
# first pull worst). With 512 MiB: no flush, p50 68 / p99 157 ms, and the test ran in
# 157 s instead of 233 s. Only the code actually generated becomes resident.
TB_CACHE_MIB = int(os.environ.get("KRYPTVAULT_USBRIG_TB_MIB", "512"))
# QEMU's usb-storage always enumerates as this; only the serial can be chosen.
STICK_VENDOR_ID = 0x46F4
STICK_PRODUCT_ID = 0x0001
_SERIAL_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")


class RigError(RuntimeError):
    """The guest could not be started, died, or did not answer in time."""


class GuestCommandError(RigError):
    def __init__(self, result: CompletedRun) -> None:
        super().__init__(
            f"guest command failed with rc={result.rc}: {result.command!r}\n"
            f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
        )
        self.result = result


def venv_python() -> Path:
    """The interpreter commands in the guest should use: the repo's venv, else ours."""
    cand = REPO_ROOT / ".venv" / "bin" / "python"
    return cand if cand.exists() else Path(sys.executable)


@dataclass
class Stick:
    id: str
    serial: str
    image: Path
    port: int
    plugged: bool = True  # plugged in when the guest boots

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.id):
            raise ValueError(f"stick id {self.id!r} must be a QEMU device id")
        if not _SERIAL_RE.fullmatch(self.serial):
            raise ValueError(f"stick serial {self.serial!r} must match {_SERIAL_RE.pattern}")
        self.image = Path(self.image).resolve()

    def device_args(self) -> dict[str, Any]:
        return {
            "driver": "usb-storage",
            "bus": "xhci.0",
            "port": str(self.port),
            "drive": f"{self.id}blk",
            "id": self.id,
            "serial": self.serial,
            "removable": True,
        }


@dataclass(frozen=True)
class CompletedRun:
    command: str
    rc: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> CompletedRun:
        if self.rc != 0:
            raise GuestCommandError(self)
        return self


def _qemu_opt(value: str) -> str:
    # QEMU option values use "," as separator; a literal comma is written twice.
    return value.replace(",", ",,")


def _set_pdeathsig() -> None:
    # If the test process dies (timeout, kill -9) the guest must not outlive it. The
    # signal fires when the *thread* that forked exits, so start rigs from a thread that
    # lives as long as the rig (the main thread, in pytest).
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def connect_unix(path: Path, timeout: float = 10.0) -> socket.socket:
    """Connect to a socket QEMU creates at startup, waiting for it to appear."""
    deadline = time.monotonic() + timeout
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
        short = f"/proc/self/fd/{dirfd}/{path.name}"
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(short)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise RigError(f"socket {path} did not come up") from None
                time.sleep(0.02)
    finally:
        os.close(dirfd)


class Qmp:
    """A small QMP client: one request at a time, events collected by a reader thread."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = connect_unix(path, timeout)
        self._file = self._sock.makefile("rb")
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._closed = False
        greeting = json.loads(self._file.readline() or b"null")
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            raise RigError(f"unexpected QMP greeting {greeting!r}")
        self._reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")

    def _read_loop(self) -> None:
        try:
            for line in self._file:
                msg = json.loads(line)
                with self._cond:
                    if "event" in msg:
                        self._events.append(msg)
                    elif isinstance(msg.get("id"), int):
                        self._replies[msg["id"]] = msg
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            msg: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                msg["arguments"] = dict(arguments)
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._replies:
                if self._closed:
                    raise RigError(f"QMP connection closed during {command}")
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise RigError(f"QMP {command} timed out")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RigError(f"QMP {command} failed: {reply['error']}")
        return reply.get("return")

    def mark(self) -> int:
        """A position in the event stream, so a later wait ignores older events."""
        with self._cond:
            return len(self._events)

    def wait_event(
        self, name: str, match: Callable[[dict[str, Any]], bool], since: int, timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events[since:]:
                    if ev["event"] == name and match(ev.get("data", {})):
                        return ev
                since = len(self._events)
                if self._closed:
                    raise RigError(f"QMP connection closed while waiting for {name}")
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise RigError(f"no {name} event within {timeout} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=5)


class GuestProcess:
    """A command running in the guest; its files live in the shared channel directory."""

    def __init__(self, rig: UsbRig, seq: int, command: str) -> None:
        self._rig = rig
        self.seq = seq
        self.command = command
        self._started = time.monotonic()
        self._result: CompletedRun | None = None

    def _read(self, suffix: str) -> str:
        try:
            return (self._rig.chan_dir / f"{self.seq}.{suffix}").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def stdout(self) -> str:
        """Output so far (the guest writes straight into the shared directory)."""
        return self._read("out")

    @property
    def stderr(self) -> str:
        return self._read("err")

    def poll(self) -> CompletedRun | None:
        if self._result is None:
            rc = self._read("rc")
            # The guest writes "N\n" in one go; no newline yet means it is mid-write.
            if not rc.endswith("\n"):
                return None
            self._result = CompletedRun(
                command=self.command,
                rc=int(rc),
                stdout=self.stdout,
                stderr=self.stderr,
                duration=time.monotonic() - self._started,
            )
        return self._result

    def _wait_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.002
        while not cond():
            self._rig._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest command {self.command!r}: {what} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    def wait(self, timeout: float = 120) -> CompletedRun:
        try:
            self._wait_until(lambda: self.poll() is not None, timeout, "not finished")
        except TimeoutError:
            with contextlib.suppress(RigError, TimeoutError):
                self.send_signal(signal.SIGKILL)
            raise
        result = self.poll()
        assert result is not None
        return result

    @property
    def pid(self) -> int:
        self._wait_until(lambda: self._read("pid").endswith("\n"), 30, "no pid")
        return int(self._read("pid"))

    def wait_for_output(self, text: str, timeout: float = 60) -> str:
        """Wait until stdout contains ``text`` (e.g. a listener's ready line)."""

        def seen() -> bool:
            if text in self.stdout:
                return True
            if self.poll() is not None:
                raise RigError(f"{self.command!r} exited before printing {text!r}: {self._result}")
            return False

        self._wait_until(seen, timeout, f"no {text!r} in stdout")
        return self.stdout

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the command's whole process group (the guest starts each in its own)."""
        if self.poll() is not None:
            return
        pid = self.pid
        self._rig.run(f"kill -{int(sig)} -- -{pid} 2>/dev/null || kill -{int(sig)} {pid}", 30)

    def terminate(self, timeout: float = 30) -> CompletedRun:
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)


class UsbRig:
    """A QEMU/TCG guest with USB sticks on an xHCI controller; a context manager."""

    _pvh_broken = False  # learnt once per test process, if the ELF kernel will not boot

    def __init__(
        self,
        workdir: Path,
        sticks: Sequence[Stick],
        memory_mib: int = 512,
        *,
        kernel: GuestKernel | None = None,
        keep_paths: Sequence[Path] = (),
        poll_interval: float = 1.0,
        kernel_log: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.sticks: dict[str, Stick] = {}
        for st in sticks:
            if st.id in self.sticks:
                raise ValueError(f"duplicate stick id {st.id}")
            self.sticks[st.id] = st
        if len({s.serial for s in sticks}) != len(sticks):
            raise ValueError("stick serials must be distinct")
        if len({s.port for s in sticks}) != len(sticks):
            raise ValueError("stick ports must be distinct")
        self.memory_mib = memory_mib
        self.kernel = kernel
        self.keep_paths = [Path(p).resolve() for p in keep_paths]
        self.poll_interval = poll_interval
        self.kernel_log = kernel_log
        self.chan_dir = self.workdir / "chan"
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.python = str(venv_python())
        self.repo_root = REPO_ROOT
        self.timings: dict[str, float] = {}
        self.last_unplug_ns: int | None = None  # host monotonic time of the last device_del
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._bell: socket.socket | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._plugged = {s.id: s.plugged for s in sticks}
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> None:
        if self._proc is not None:
            raise RigError("guest already running")
        qemu = shutil.which(QEMU)
        if qemu is None:
            raise RigError(f"{QEMU} is not installed (scripts/install.sh installs qemu-system-x86)")
        t0 = time.monotonic()
        if self.kernel is None:
            self.kernel = ensure_kernel()
        self.timings["kernel_s"] = time.monotonic() - t0
        self.workdir.mkdir(parents=True, exist_ok=True)
        use_pvh = self.kernel.vmlinux is not None and not UsbRig._pvh_broken
        try:
            self._boot(qemu, self.kernel, use_pvh, timeout)
        except _NoKernelStart:
            # Keep going with the slower but universal path; remember for later rigs.
            UsbRig._pvh_broken = True
            self._boot(qemu, self.kernel, False, timeout)
        self.timings["start_s"] = time.monotonic() - t0

    def _guest_config(self, kernel: GuestKernel) -> dict[str, str]:
        keep = [self.repo_root, self.workdir, *self.keep_paths]
        for p in map(str, [*keep, kernel.modules_dir, GUEST_INIT]):
            if ":" in p or any(c.isspace() for c in p):
                raise RigError(f"path {p!r} cannot be passed to the guest (':' or whitespace)")
        return {
            "KVRIG_KVER": kernel.version,
            "KVRIG_MODDIR": str(kernel.modules_dir.resolve()),
            "KVRIG_INIT": str(GUEST_INIT),
            "KVRIG_REPO": str(self.repo_root),
            "KVRIG_KEEP": ":".join(map(str, keep)),
            "KVRIG_SERIALS": " ".join(s.serial for s in self.sticks.values() if s.plugged),
            "KVRIG_POLL": f"{self.poll_interval:g}",
        }

    def _qemu_argv(self, qemu: str, kernel: GuestKernel, use_pvh: bool, initrd: Path) -> list[str]:
        append = [
            "console=ttyS0",
            "panic=-1",  # with -no-reboot a guest panic ends QEMU instead of hanging
            "rdinit=/init",
            "usb_storage.delay_use=0",  # the default waits 1 s before scanning a stick
            "8250.nr_uarts=2",  # ttyS0 console, ttyS1 command doorbell; skip probing more
            # ACPI PCI interrupt-link setup costs ~0.5 s per device under TCG; the
            # devices use MSI(-X) anyway.
            "acpi=noirq",
            "cryptomgr.notests",
            "random.trust_cpu=on",
            "tsc=reliable",
            # TCG caches translations by virtual address: with fixed mappings each exec
            # reuses ld.so's and libc's translated code (a dynamic exec: ~60 -> ~25 ms).
            "norandmaps",
            "no_timer_check",
        ]
        if not self.kernel_log:
            append.append("quiet")  # every console byte is an emulated UART write
        ports = max([4, *(s.port for s in self.sticks.values())])
        # fmt: off
        argv = [
            qemu, "-name", "kvrig",
            "-accel", f"tcg,tb-size={TB_CACHE_MIB}", "-cpu", "max",
            "-smp", str(GUEST_CPUS), "-m", str(self.memory_mib),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{_qemu_opt(str(self.console_log))}",
            "-kernel", str(kernel.vmlinux if use_pvh else kernel.bzimage),
            "-initrd", str(initrd),
            "-append", " ".join(append),
            "-fsdev", "local,path=/,security_model=passthrough,readonly=on,multidevs=remap,id=r",
            "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
            "-fsdev", f"local,path={_qemu_opt(str(self.chan_dir))},security_model=none,id=c",
            "-device", "virtio-9p-pci,fsdev=c,mount_tag=kvchan",
            "-device", f"qemu-xhci,id=xhci,p2={ports},p3={ports}",
            "-qmp", "unix:qmp.sock,server=on,wait=off",
            "-chardev", "socket,id=bell,path=bell.sock,server=on,wait=off",
            "-serial", "chardev:bell",
        ]
        # fmt: on
        for st in self.sticks.values():
            # -blockdev nodes outlive device_del, which is what makes re-plugging work.
            argv += [
                "-blockdev",
                f"driver=file,filename={_qemu_opt(str(st.image))},node-name={st.id}f",
                "-blockdev",
                f"driver=raw,file={st.id}f,node-name={st.id}blk",
            ]
            if st.plugged:
                opts = ",".join(
                    f"{k}={'on' if v is True else v}"
                    for k, v in st.device_args().items()
                    if k != "driver"
                )
                argv += ["-device", f"usb-storage,{opts}"]
        return argv

    def _boot(self, qemu: str, kernel: GuestKernel, use_pvh: bool, timeout: float) -> None:
        t0 = time.monotonic()
        if self.chan_dir.exists():
            shutil.rmtree(self.chan_dir)
        self.chan_dir.mkdir(parents=True)
        for name in ("qmp.sock", "bell.sock", "console.log"):
            (self.workdir / name).unlink(missing_ok=True)
        self._seq = 0
        self._plugged = {s.id: s.plugged for s in self.sticks.values()}
        initrd = build_initramfs(
            kernel, GUEST_INIT, self._guest_config(kernel), self.workdir / "initramfs.cpio.gz"
        )
        argv = self._qemu_argv(qemu, kernel, use_pvh, initrd)
        (self.workdir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        with open(self.qemu_log, "wb") as log:
            self._proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
            )
        self._finalizer = weakref.finalize(self, _kill_quietly, self._proc)
        try:
            self._qmp = Qmp(self.workdir / "qmp.sock")
            self._bell = connect_unix(self.workdir / "bell.sock")
            self._bell.setblocking(False)  # a guest that stopped reading must not block us
            ready = self.chan_dir / "ready"
            deadline = time.monotonic() + timeout
            # If PVH boot is broken the kernel never reaches our init; don't wait the
            # full timeout to find out.
            early = time.monotonic() + min(timeout, 30)
            while not ready.exists():
                if self._proc.poll() is not None:
                    if use_pvh and "kvrig" not in self._console_tail():
                        raise _NoKernelStart()
                    raise RigError(f"QEMU exited with {self._proc.returncode}{self._logs()}")
                now = time.monotonic()
                if use_pvh and now > early and not self.console_log.stat().st_size:
                    raise _NoKernelStart()
                if now > deadline:
                    raise RigError(f"guest not ready after {timeout} s{self._logs()}")
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        self.timings["boot_s"] = time.monotonic() - t0

    def stop(self) -> None:
        """Power the guest off. Data the guest has not synced to a stick is lost."""
        proc, self._proc = self._proc, None
        qmp, self._qmp = self._qmp, None
        if proc is not None and proc.poll() is None and qmp is not None:
            with contextlib.suppress(RigError, OSError):
                qmp.execute("quit", timeout=5)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if qmp is not None:
            qmp.close()
        bell, self._bell = self._bell, None
        if bell is not None:
            bell.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _console_tail(self, limit: int = 4000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def _logs(self) -> str:
        qemu = self.qemu_log.read_text(errors="replace")[-2000:] if self.qemu_log.exists() else ""
        return f"\n--- qemu ---\n{qemu}\n--- console ---\n{self._console_tail()}"

    def _check_alive(self) -> None:
        if self._proc is None:
            raise RigError("guest is not running")
        if self._proc.poll() is not None:
            raise RigError(f"guest died (QEMU rc={self._proc.returncode}){self._logs()}")

    # -- commands ---------------------------------------------------------------------

    def spawn(self, command: str, input: str | bytes | None = None) -> GuestProcess:
        """Start ``/bin/sh -c command`` in the guest as root, cwd the repository root."""
        self._check_alive()
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
            data = input.encode() if isinstance(input, str) else (input or b"")
            (self.chan_dir / f"{seq}.in").write_bytes(data)
            # The guest starts a command as soon as N.sh exists; rename makes it appear whole.
            tmp = self.chan_dir / f".{seq}.tmp"
            tmp.write_text(command)
            tmp.rename(self.chan_dir / f"{seq}.sh")
            if self._bell is not None:
                # Wakes the agent at once instead of at its next fallback poll.
                with contextlib.suppress(OSError):
                    self._bell.sendall(b"\n")
        return GuestProcess(self, seq, command)

    def run(
        self,
        command: str,
        timeout: float = 120,
        *,
        check: bool = False,
        input: str | bytes | None = None,
    ) -> CompletedRun:
        result = self.spawn(command, input=input).wait(timeout)
        return result.check() if check else result

    def guest_path(self, host_path: Path) -> str:
        """Where a file in the channel directory appears inside the guest."""
        rel = Path(host_path).resolve().relative_to(self.chan_dir)
        return f"{GUEST_CHAN}/{rel}"

    # -- sticks -----------------------------------------------------------------------

    def _stick(self, stick_id: str) -> Stick:
        try:
            return self.sticks[stick_id]
        except KeyError:
            raise KeyError(f"no stick {stick_id!r}; have {sorted(self.sticks)}") from None

    def jit_stats(self) -> dict[str, int]:
        """QEMU's translation-cache counters (`info jit`): a TB flush makes the guest
        re-translate everything it runs, which shows up as a burst of slowness."""
        assert self._qmp is not None, "start() first"
        text = self._qmp.execute("human-monitor-command", {"command-line": "info jit"})
        stats: dict[str, int] = {}
        for line in str(text).splitlines():
            m = re.match(r"(\S.*?)\s{2,}(\d+)", line.strip())
            if m:
                stats[m.group(1)] = int(m.group(2))
        return stats

    def is_plugged(self, stick_id: str) -> bool:
        return self._plugged[self._stick(stick_id).id]

    def unplug(self, stick_id: str, timeout: float = 30) -> None:
        """Pull the stick; returns once QEMU reports DEVICE_DELETED."""
        self._stick(stick_id)
        self._check_alive()
        assert self._qmp is not None
        mark = self._qmp.mark()
        t0 = time.monotonic_ns()
        self.last_unplug_ns = t0
        self._qmp.execute("device_del", {"id": stick_id})
        self._qmp.wait_event("DEVICE_DELETED", lambda d: d.get("device") == stick_id, mark, timeout)
        self.timings["unplug_s"] = (time.monotonic_ns() - t0) / 1e9
        self._plugged[stick_id] = False

    def plug(self, stick_id: str) -> None:
        """Insert the stick again (or for the first time); the guest enumerates it async."""
        st = self._stick(stick_id)
        self._check_alive()
        assert self._qmp is not None
        t0 = time.monotonic()
        self._qmp.execute("device_add", st.device_args())
        self.timings["plug_s"] = time.monotonic() - t0
        self._plugged[stick_id] = True

    def wait_for_stick(
        self, stick_id: str, present: bool = True, timeout: float = 30
    ) -> str | None:
        """Wait in the guest until the stick's block device exists (or it is fully gone).

        Returns the device node (``/dev/sdX``) when waiting for presence.
        """
        st = self._stick(stick_id)
        state = "present" if present else "absent"
        res = self.run(
            f"exec bash {shlex.quote(str(GUEST_INIT))} wait-stick {st.serial} {state} {timeout:g}",
            timeout + 30,
        ).check()
        return (res.stdout.strip() or None) if present else None

    def stick_device(self, stick_id: str) -> str | None:
        """The stick's block device in the guest right now, if it has one."""
        st = self._stick(stick_id)
        res = self.run(f"exec bash {shlex.quote(str(GUEST_INIT))} stick-dev {st.serial}")
        return res.stdout.strip() if res.ok else None


class _NoKernelStart(Exception):
    """The kernel image did not get as far as our init (e.g. no PVH support)."""


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _tool(name: str) -> str:
    # mkfs.vfat lives in /usr/sbin, which a non-root PATH may lack.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise RigError(f"{name} is not installed (scripts/install.sh installs dosfstools/mtools)")
    return found


def make_vfat_image(
    path: Path,
    size_mib: int = 32,
    label: str = "KVTOKEN",
    volume_id: str | None = None,
    files: Mapping[str, bytes] | None = None,
) -> None:
    """Create a "superfloppy" vfat stick image (no partition table), like many sticks.

    ``volume_id`` is the 32-bit serial in hex ("1234ABCD" or "1234-ABCD"); ``files``
    maps paths on the stick ("dir/key.bin") to their content.
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    cmd = [_tool("mkfs.vfat"), "-C", "--mbr=n", "-n", label]
    if volume_id is not None:
        cmd += ["-i", volume_id.replace("-", "")]
    cmd += [str(path), str(size_mib * 1024)]
    subprocess.run(cmd, check=True, capture_output=True)
    if not files:
        return
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    made: set[str] = set()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for i, (name, data) in enumerate(files.items()):
            parts = name.strip("/").split("/")
            for depth in range(1, len(parts)):
                d = "/".join(parts[:depth])
                if d not in made:
                    subprocess.run(
                        [_tool("mmd"), "-i", str(path), f"::/{d}"],
                        env=env,
                        check=True,
                        capture_output=True,
                    )
                    made.add(d)
            src = Path(tmp) / str(i)
            src.write_bytes(data)
            subprocess.run(
                [_tool("mcopy"), "-o", "-i", str(path), str(src), "::/" + "/".join(parts)],
                env=env,
                check=True,
                capture_output=True,
            )
