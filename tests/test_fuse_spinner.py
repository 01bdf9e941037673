"""The spinner (kryptvault/fuseadapter/spinner.py) keeps a second CPU awake at idle
priority while requests flow, rests during bulk transfers, and costs no CPU when the mount
is idle."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_fixtures import Mount, mkfs_container

from kryptvault.fuseadapter.spinner import CpuSpinner, _spin_functions

pytestmark = pytest.mark.fuse

TWO_CPUS = len(os.sched_getaffinity(0)) >= 2
needs_two_cpus = pytest.mark.skipif(not TWO_CPUS, reason="the spinner runs only with two CPUs or more")
MIB = 1 << 20


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` (its CPUCLOCK_SCHED process clock)."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)


def thread_run_ns(pid: int, tid: int) -> int:
    """The thread's time on a CPU in ns (schedstat: /proc's utime and stime count 10 ms
    ticks, too coarse for a spinner that got a few ms)."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def idle_priority_threads(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if os.sched_getscheduler(int(tid)) == os.SCHED_IDLE:
                found.append(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return found


@pytest.fixture
def spinner() -> Iterator[CpuSpinner]:
    """A spinner whose thread runs at idle priority, closed after the test."""
    made = CpuSpinner.for_this_machine()
    assert made is not None
    try:
        assert made.wait_ready(5.0)
        yield made
    finally:
        made.close()


def spin_clock(spinner: CpuSpinner) -> int:
    """The spinner thread's CPU-time clock."""
    return time.pthread_getcpuclockid(spinner.thread.ident or 0)


@needs_two_cpus
def test_spinner_spins_at_idle_priority_from_burst_to_rest(spinner: CpuSpinner) -> None:
    tid = spinner.thread.native_id
    assert tid is not None and os.sched_getscheduler(tid) == os.SCHED_IDLE
    clock = spin_clock(spinner)

    def spent(seconds: float) -> float:
        before = time.clock_gettime(clock)
        time.sleep(seconds)
        return time.clock_gettime(clock) - before

    assert spent(0.2) < 0.02  # waiting for a burst, not spinning
    spinner.burst()
    assert spent(0.3) > 0.1  # a CPU is free (this thread sleeps): the spinner has it
    spinner.rest()
    time.sleep(0.05)
    assert spent(0.3) < 0.02
    spinner.burst()
    assert spent(0.2) > 0.05  # a second burst spins again
    spinner.close()
    spinner.thread.join(5.0)
    assert not spinner.thread.is_alive()


@pytest.fixture
def gil_holding_spinner() -> Iterator[CpuSpinner]:
    """A spinner whose trylock and unlock keep the GIL (ctypes.PyDLL; its lock still spins
    without it): from the loop's rest() to its next burst() no other thread runs Python, as
    when the loop comes back from a short sleep holding the GIL. A thread that took the
    lock at that rest() then cannot give it back before the burst: the race below, forced
    instead of waited for (with the GIL released in unlock, it came up in 0-35 % of tries,
    depending on the machine's load)."""
    functions = _spin_functions()
    assert functions is not None
    init, lock, _, _ = functions
    gil_libc = ctypes.PyDLL(None)
    trylock, unlock = gil_libc.pthread_spin_trylock, gil_libc.pthread_spin_unlock
    for fn in (trylock, unlock):
        fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
        fn.restype = ctypes.c_int
    made = CpuSpinner((init, lock, trylock, unlock))
    try:
        assert made.wait_ready(5.0)
        yield made
    finally:
        made.close()


def spinning_soon(pid: int, tid: int, timeout: float = 0.5) -> bool:
    """Whether the thread got 100 µs on a CPU within `timeout` (it spins)."""
    start = thread_run_ns(pid, tid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.0002)
        if thread_run_ns(pid, tid) - start > 100_000:
            return True
    return False


@needs_two_cpus
def test_a_burst_begun_before_the_spinner_let_go_of_the_last_one_spins_from_the_next_request(
    gil_holding_spinner: CpuSpinner,
) -> None:
    # After rest() the thread takes the lock and needs the GIL to give it back; a burst
    # that starts before then (the loop still holding the GIL) cannot take the lock. It
    # must not go without a spinner until the loop next sleeps.
    spinner = gil_holding_spinner
    tid = spinner.thread.native_id
    assert tid is not None
    # Each on a CPU of its own: a CPU that runs only an idle-priority thread counts as idle,
    # so this thread, waking from its sleeps, would often land there and stop the spinner.
    loop_cpu, spin_cpu, *_ = sorted(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(tid, {spin_cpu})
    os.sched_setaffinity(0, {loop_cpu})  # this thread only
    try:
        behind, tries, spun = race_bursts(spinner, tid)
    finally:
        os.sched_setaffinity(0, allowed)
    print(f"{behind} of {tries} bursts after a spinning rest began behind")
    # Forced as above, it comes up in nearly every try on an idle machine (20 of 20 here);
    # with both CPUs taken by other programs, in 2-20 of 25-41 (the idle-priority thread
    # is then often off its CPU at the rest). Once is what this test needs.
    assert behind >= 1, f"the race never came up in {tries} tries"
    # And it spins then (once is enough: another program may hold the CPUs at times).
    assert max(spun) > 0.005, spun


def race_bursts(spinner: CpuSpinner, tid: int) -> tuple[int, int, list[float]]:
    """(bursts that began behind, tries, the thread's CPU time in 20 ms after each caught up)."""
    clock = spin_clock(spinner)
    behind = tries = 0
    spun: list[float] = []
    give_up = time.monotonic() + 30.0
    while behind < 20 and tries < 200 and time.monotonic() < give_up:
        time.sleep(0.002)  # the loop sleeps: the thread gives back the lock of the last rest
        spinner.burst()
        if not spinning_soon(os.getpid(), tid):  # another program holds the CPUs now
            spinner.rest()
            continue
        tries += 1
        spinner.rest()
        spinner.burst()  # at once: the thread, holding the lock, waits for the GIL
        if spinner.holding:  # the thread was off its CPU at the rest and never took the lock
            spinner.rest()
            continue
        behind += 1
        assert spinner.behind
        deadline = time.monotonic() + 2.0
        while not spinner.holding:  # the loop's next requests
            assert time.monotonic() < deadline, "the burst never caught up"
            time.sleep(0.0001)
            spinner.on_request(bulk=False)
        assert not spinner.behind
        before = time.clock_gettime(clock)
        time.sleep(0.02)
        spun.append(time.clock_gettime(clock) - before)
        spinner.rest()
    return behind, tries, spun


def test_no_spinner_on_one_cpu() -> None:
    code = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from kryptvault.fuseadapter.spinner import CpuSpinner\n"
        "print(CpuSpinner.for_this_machine())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mount]:
    container = tmp_path / "v.kv"
    mkfs_container(container)
    mount = Mount(container, tmp_path / "mnt", tmp_path / "log")
    mount.start()
    try:
        yield mount
    finally:
        assert mount.stop() == 0


@needs_two_cpus
def test_vault_daemon_spins_during_a_burst_of_lookups_and_not_once_idle(mounted: Mount) -> None:
    pid = mounted.pid
    (spinner,) = idle_priority_threads(pid)
    spun_ns = 0
    # It yields to every other task: a program holding both CPUs through one burst (a CI
    # machine's leftover, say) can leave it no time at all, but not through five.
    for attempt in range(5):
        before = thread_run_ns(pid, spinner)
        for i in range(5000):  # look-ups of absent names: one round trip each, back to back
            assert not os.path.lexists(mounted.mountpoint / f"absent-{attempt}-{i}")
        spun_ns = thread_run_ns(pid, spinner) - before
        if spun_ns > 0:
            break
    assert spun_ns > 0  # it filled some of the caller's waits
    time.sleep(0.3)  # the burst is over (0.5 ms without a request)
    before = process_cpu_ns(pid)
    time.sleep(0.5)
    assert process_cpu_ns(pid) - before < 25_000_000  # < 5 % of a CPU: no thread spins


@needs_two_cpus
def test_spinner_rests_while_a_file_is_read_sequentially(tmp_path: Path) -> None:
    container = tmp_path / "v.kv"
    mkfs_container(container)
    mount = Mount(container, tmp_path / "mnt", tmp_path / "log")
    mount.start()
    data = os.urandom(MIB)
    with open(mount.mountpoint / "big", "wb") as f:
        for _ in range(192):
            f.write(data)
    assert mount.stop() == 0
    mount.start()  # nothing cached: every 128 KiB is a READ
    try:
        pid = mount.pid
        fd = os.open(mount.mountpoint / "big", os.O_RDONLY)
        try:
            (spinner,) = idle_priority_threads(pid)
            spun_before = thread_run_ns(pid, spinner)
            start = time.monotonic()
            while os.read(fd, MIB):
                pass
            elapsed = time.monotonic() - start
            spun = (thread_run_ns(pid, spinner) - spun_before) / 1e9
        finally:
            os.close(fd)
        # Spinning through it would fill most of the reader's waits (~80 % of the time).
        assert spun <= 0.25 * elapsed + 0.02, (spun, elapsed)
    finally:
        assert mount.stop() == 0
