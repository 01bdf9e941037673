"""Keeping a second CPU awake while requests flow, so that answers wake their callers fast.

A program that asks the vault something (a `stat`, an `open`, the write of a page at
close) sleeps in the kernel until the request loop answers, and its CPU goes idle. On
this VM an idle vCPU halts at once (cpuidle `haltpoll` with guest_halt_poll_ns=0; on
bare metal, deep idle states cost the same way), and the answer's wake-up then waits for
the hypervisor to bring that vCPU back: 22-27 µs of every round trip here (README,
cold stat). gocryptfs does not pay it: its Go runtime keeps threads spinning while
goroutines wait.

`CpuSpinner` runs one thread at SCHED_IDLE priority that spins, outside the GIL, while
the request loop holds a spin lock: from the first request after the loop slept until it
sleeps again (0.5 ms without a request, server.SPIN_SECONDS), or until it serves a bulk
READ or WRITE. Any other task on that CPU, the woken caller first, preempts it, so it
only fills time the CPU would have spent halted; the caller's wake-up still interrupts
that CPU (it ran 16-20 µs after its wake-up in `perf sched timehist`, less than from a
halted vCPU, more than when caller and loop happen to share a CPU). Measured here (alternating A/B
rounds, fresh mounts, medians): look-ups of absent names 35,344 -> 41,242/s (5 of 6
rounds faster), small-file creates 3,277 -> 3,978/s (10 of 10), cold stats 21,055 ->
26,265/s (8 of 10), `ls -lR` and cold sequential reads unchanged (-3 %, -1 %). Spinning
through bulk transfers too cost sequential reads 933 -> 785 MB/s (the loop is busy
~85 % of the time there, so few wake-ups are saved; why it costs is not established),
hence the rest on bulk requests. The price is CPU time: up to one more CPU while a burst
of small requests lasts, none when the mount is idle.

The thread takes the lock as the loop rests and needs the GIL to give it back, so a burst
that begins right after a rest can find the lock still taken (0-35 % of such bursts on
this VM, by load; tests/test_fuse_spinner.py forces it). The loop then asks again at its
next request; until
2026-12-06 it did not, and such a burst went without a spinner until the loop next slept
(a CI run saw 5,000 look-ups without a spin; catching up: small creates 3,890 -> 4,328
files/s, medians of 10 alternating rounds, 8 of 10 faster).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("kryptvault.fuse")

# A READ or WRITE at least this large is a bulk transfer (the kernel's read-ahead and
# write-back), during which the spinner rests.
BULK_REQUEST = 64 * 1024

_SpinCall = Callable[["ctypes._Pointer[ctypes.c_int]"], int]


def _spin_functions() -> tuple[_SpinCall, _SpinCall, _SpinCall, _SpinCall] | None:
    """libc's pthread_spin_{init,lock,trylock,unlock} (init gets the pshared flag too);
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
    return (lambda p: init(p, 0)), lock, trylock, unlock  # 0: PTHREAD_PROCESS_PRIVATE


class CpuSpinner:
    """The spinning thread and the lock that holds it. `burst` and `rest` belong to one
    request loop (the lock's owner); `close` ends the thread."""

    def __init__(self, functions: tuple[_SpinCall, _SpinCall, _SpinCall, _SpinCall]) -> None:
        init, self._lock_fn, self._trylock_fn, self._unlock_fn = functions
        self._cell = ctypes.c_int(0)  # pthread_spinlock_t is an int on Linux
        self._ref = ctypes.pointer(self._cell)
        if init(self._ref) != 0:
            raise OSError("pthread_spin_init failed")
        self._wake = threading.Event()
        self._holding = False
        # A burst began while the thread still held the lock from the last one: it takes
        # the lock as the loop rests and needs the GIL to give it back, which the loop,
        # back from a short sleep, may be holding. The loop asks again at its next request.
        self.behind = False
        self._closed = False
        self._idle_priority = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kryptvault-spin", daemon=True)
        self._thread.start()

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
        except (OSError, RuntimeError) as e:  # pragma: no cover - no lock, or no thread
            log.debug("no spinner: %s", e)  # the mount works the same, its callers wake slower
            return None

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError as e:  # pragma: no cover - a seccomp filter, say
            # Never spin at normal priority: it would take the CPU from the caller.
            log.debug("no idle-priority spinner: %s", e)
            return
        self._idle_priority.set()
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            self._lock_fn(self._ref)  # spins here, without the GIL, until the loop rests
            self._unlock_fn(self._ref)

    def wait_ready(self, timeout: float) -> bool:
        """True once the thread runs at idle priority (it spins only then)."""
        return self._idle_priority.wait(timeout)

    def burst(self) -> None:
        """Requests are flowing: spin (if not already). Sets `behind` when the thread
        has not let go of the last burst yet: call again then, at the next request."""
        if self._holding or self._closed:
            return
        if self._trylock_fn(self._ref) == 0:
            self._holding = True
            self.behind = False
            self._wake.set()
        else:
            self.behind = True

    def on_request(self, bulk: bool) -> None:
        """For each request the loop serves: catch up on a burst that began behind, and
        rest through a bulk transfer (the loop is busy then: few wake-ups to save)."""
        if bulk:
            self.rest()
        elif self.behind:
            self.burst()

    @property
    def holding(self) -> bool:
        """Whether the loop holds the lock, i.e. the thread spins or is about to."""
        return self._holding

    def rest(self) -> None:
        """Stop spinning (the loop goes to sleep, or serves a bulk transfer)."""
        self.behind = False
        if self._holding:
            self._holding = False
            self._unlock_fn(self._ref)

    def close(self) -> None:
        self._closed = True
        self.rest()
        self._wake.set()
