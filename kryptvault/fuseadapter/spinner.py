"""Keeping a second CPU awake while requests flow, so that answers wake their callers fast.

A program that asks the vault something (a `stat`, an `open`, the write of a page at
close) sleeps in the kernel until the request loop answers, and its CPU goes idle. On
this VM an idle vCPU halts at once (cpuidle `haltpoll` with guest_halt_poll_ns=0; on
bare metal, deep idle states cost the same way), and the answer's wake-up then waits for
the hypervisor to bring that vCPU back: 22-27 µs of every round trip here (README,
cold stat). gocryptfs does not pay it: its Go runtime keeps threads spinning while
goroutines wait.

`CpuSpinner` runs a small helper process at SCHED_IDLE priority that spins, on a spin
lock in memory shared with the daemon, while the request loop holds that lock: from the
first request after the loop slept until it sleeps again (0.5 ms without a request,
server.SPIN_SECONDS), or until it serves a bulk READ or WRITE. Any other task on that CPU,
the woken caller first, preempts it, so it only fills time the CPU would have spent halted;
the caller's wake-up still interrupts that CPU (it ran 16-20 µs after its wake-up in `perf
sched timehist`, less than from a halted vCPU, more than when caller and loop happen to
share a CPU). Measured here (alternating A/B rounds, fresh mounts, medians): look-ups of
absent names 35,344 -> 41,242/s (5 of 6 rounds faster), small-file creates 3,277 ->
3,978/s (10 of 10), cold stats 21,055 -> 26,265/s (8 of 10), `ls -lR` and cold sequential
reads unchanged (-3 %, -1 %). Spinning through bulk transfers too cost sequential reads 933
-> 785 MB/s (the loop is busy ~85 % of the time there, so few wake-ups are saved; why it
costs is not established), hence the rest on bulk requests. The price is CPU time: up to
one more CPU while a burst of small requests lasts, none when the mount is idle.

Why a process and not a thread of the daemon (as until 2026-12-07): an idle-priority task
runs only when its CPU has nothing else to do, and a process ends only when its last thread
has; a killed idle-priority thread waits for a free CPU like any other. With both CPUs busy
(four busy loops on the two CPUs here) the session daemon, locked by SIGTERM in a burst of
look-ups, was gone (every thread) 33-427 ms after the signal with the thread (median 85,
4 of 18 over 200 ms) and 41-190 ms with this helper (median 71, none over 200); the test
harness's daemon, which ends by returning from `serve`, took 0.2-5 s to exit after its
unmount with the thread (its last thread, the spinner, runnable and waiting for a CPU) and
27-48 ms with the helper. Until then the key-holding process, with the key copies inside
`cryptography`'s objects, its container and its lock on it, outlives the lock. A thread
also takes the GIL at idle priority after each burst and can be preempted holding it (a
stall of 176 ms of the other threads in a micro-benchmark under that load). The helper is
a fresh interpreter (`-I -S`, exec'd; the mount daemon starts it before any key arrives,
session/daemon.py, and its start-up then does not run beside a lock soon after the mount), sees
only the shared lock and a pipe, dies with the daemon (PR_SET_PDEATHSIG, and the pipe's
end of file), and its own exit, however late under load, holds nothing of the vault.

The helper takes the lock as the loop rests and gives it back at once, so a burst that
begins right after a rest can find the lock still taken (the helper, at idle priority, can
be preempted between the two). The loop then asks again at its next request; until
2026-12-06 it did not, and such a burst went without a spinner until the loop next slept
(a CI run saw 5,000 look-ups without a spin; catching up: small creates 3,890 -> 4,328
files/s, medians of 10 alternating rounds, 8 of 10 faster).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import select
import subprocess
import sys
from collections.abc import Callable

log = logging.getLogger("kryptvault.fuse")

# A READ or WRITE at least this large is a bulk transfer (the kernel's read-ahead and
# write-back), during which the spinner rests.
BULK_REQUEST = 64 * 1024

_SpinCall = Callable[["ctypes._Pointer[ctypes.c_int]"], int]

PTHREAD_PROCESS_SHARED = 1

# The helper: argv = shared page's fd, wake pipe's read end, ready pipe's write end, the
# daemon's pid. Each read of the wake pipe is a burst: spin until the loop rests. At the
# pipe's end of file (the daemon's exit) it ends at once: an interpreter's finalization
# took ~40 ms of CPU in the TCG guest, beside the daemon's own exit.
_HELPER = r"""
import ctypes, mmap, os, signal, sys
page_fd, wake_fd, ready_fd, parent = (int(arg) for arg in sys.argv[1:5])
libc = ctypes.CDLL(None)
libc.prctl(15, b"kryptvault-spin", 0, 0, 0)
libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
if os.getppid() != parent:
    os._exit(0)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
ref = ctypes.pointer(ctypes.c_int.from_buffer(mmap.mmap(page_fd, mmap.PAGESIZE)))
os.close(page_fd)
lock, unlock = libc.pthread_spin_lock, libc.pthread_spin_unlock
lock.argtypes = unlock.argtypes = [ctypes.POINTER(ctypes.c_int)]
os.write(ready_fd, b"r")
os.close(ready_fd)
while os.read(wake_fd, 64):
    lock(ref)
    unlock(ref)
os._exit(0)
"""


def _spin_functions() -> tuple[_SpinCall, _SpinCall, _SpinCall, _SpinCall] | None:
    """libc's pthread_spin_{init,lock,trylock,unlock} (init with the process-shared flag);
    ctypes calls them without the GIL. None where libc lacks them."""
    try:
        libc = ctypes.CDLL(None)
        found = [getattr(libc, f"pthread_spin_{name}") for name in ("init", "lock", "trylock", "unlock")]
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl on Linux
        return None
    for fn in found:
        fn.restype = ctypes.c_int
    found[0].argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    for fn in found[1:]:
        fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
    init, lock, trylock, unlock = found
    return (lambda p: init(p, PTHREAD_PROCESS_SHARED)), lock, trylock, unlock


class CpuSpinner:
    """The spinning helper process and the lock that holds it. `burst` and `rest` belong
    to one request loop (the lock's owner); `close` ends the helper."""

    def __init__(self, functions: tuple[_SpinCall, _SpinCall, _SpinCall, _SpinCall]) -> None:
        init, self._lock_fn, self._trylock_fn, self._unlock_fn = functions
        page_fd = os.memfd_create("kryptvault-spin", os.MFD_CLOEXEC)
        try:
            os.ftruncate(page_fd, mmap.PAGESIZE)
            self._page = mmap.mmap(page_fd, mmap.PAGESIZE)
            self._cell = ctypes.c_int.from_buffer(self._page)  # pthread_spinlock_t: an int
            self._ref = ctypes.pointer(self._cell)
            if init(self._ref) != 0:
                raise OSError("pthread_spin_init failed")
            wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
            self._ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            fds = (page_fd, wake_r, ready_w)
            try:
                self._helper = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _HELPER, *map(str, fds), str(os.getpid())],
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )
            except BaseException:
                for fd in (self._wake_w, self._ready_r):
                    os.close(fd)
                raise
            finally:
                os.close(wake_r)
                os.close(ready_w)
        finally:
            os.close(page_fd)
        # Idle priority from its start, not only once its interpreter is up: starting Python
        # took ~18 ms of CPU beside the daemon's lock and exit in the TCG guest, where the
        # unplug test pulls the stick soon after the mount. (It fails only if the helper is
        # gone already or a sandbox forbids it; the helper then sets it itself.)
        with contextlib.suppress(OSError):
            os.sched_setscheduler(self._helper.pid, os.SCHED_IDLE, os.sched_param(0))
        os.set_blocking(self._wake_w, False)  # a burst never waits for the helper
        self._holding = False
        # A burst began while the helper still held the lock from the last one (it takes
        # the lock as the loop rests and, at idle priority, may be preempted before it gives
        # it back). The loop asks again at its next request.
        self.behind = False
        self._closed = False
        self._halted = False

    @classmethod
    def for_this_machine(cls) -> CpuSpinner | None:
        """A spinner, or None where it cannot help (one CPU to run on) or cannot run."""
        if len(os.sched_getaffinity(0)) < 2:
            return None
        functions = _spin_functions()
        if functions is None:  # pragma: no cover - not glibc/musl on Linux
            return None
        try:
            return cls(functions)
        except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover - no helper
            log.debug("no spinner: %s", e)  # the mount works the same, its callers wake slower
            return None

    @property
    def pid(self) -> int:
        """The helper process."""
        return self._helper.pid

    def wait_ready(self, timeout: float) -> bool:
        """True once the helper runs at idle priority (it spins only then)."""
        if self._ready_r < 0:
            return True
        if not select.select([self._ready_r], [], [], timeout)[0]:
            return False
        ok = os.read(self._ready_r, 1) == b"r"
        os.close(self._ready_r)
        self._ready_r = -1
        return ok

    def burst(self) -> None:
        """Requests are flowing: spin (if not already). Sets `behind` when the helper has
        not let go of the last burst yet: call again then, at the next request."""
        if self._holding or self._closed or self._halted:
            return
        if self._trylock_fn(self._ref) != 0:
            self.behind = True
            return
        self._holding = True
        self.behind = False
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # wake-ups are queued already: the helper is behind, not gone
        except OSError as e:  # the helper is gone (killed): spin no more
            log.debug("spinner helper gone: %s", e)
            self.close()

    def on_request(self, bulk: bool) -> None:
        """For each request the loop serves: catch up on a burst that began behind, and
        rest through a bulk transfer (the loop is busy then: few wake-ups to save)."""
        if bulk:
            self.rest()
        elif self.behind:
            self.burst()

    @property
    def holding(self) -> bool:
        """Whether the loop holds the lock, i.e. the helper spins or is about to."""
        return self._holding

    def rest(self) -> None:
        """Stop spinning (the loop goes to sleep, or serves a bulk transfer)."""
        self.behind = False
        if self._holding:
            self._holding = False
            self._unlock_fn(self._ref)

    def halt(self) -> None:
        """Spin no more, from any thread (a lock begins: its own threads and the kernel's
        work need every CPU). In the TCG guest's unplug test the helper, at idle priority
        there but a busy host thread all the same, took 10.5 ms of CPU in the average
        window from the stick's removal to the daemon's exit (100 pulls); halted when the
        lock's drain begins, 6.8-7.4 ms, of which 2.3-2.8 its own exit beside the daemon's
        (2026-12-07). If the lead loop is in `burst` right now, it can take the lock once
        more; its next `rest` (at once while a lock drains) lets go of it, and no burst
        follows."""
        self._halted = True
        self.rest()

    def close(self) -> None:
        """End the helper (end of file on its pipe); not waited for: at idle priority it
        may take long to run, and it holds nothing of the vault."""
        if self._closed:
            return
        self._closed = True
        self.rest()
        os.close(self._wake_w)
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
