"""The spinner (kryptvault/fuseadapter/spinner.py) keeps a second CPU awake at idle
priority while requests flow, rests during bulk transfers, costs no CPU when the mount is
idle, and runs in a helper process, so that the key-holding daemon has no idle-priority
thread that would hold up its exit when the CPUs are busy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
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


def run_ns(pid: int) -> int:
    """The (one-thread) process's time on a CPU in ns (schedstat: /proc's utime and stime
    count 10 ms ticks, too coarse for a spinner that got a few ms)."""
    with open(f"/proc/{pid}/schedstat") as f:
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


def spinner_helper(parent: int, timeout: float = 10.0) -> int:
    """The daemon's spinner helper process (its child named kryptvault-spin), once it has
    named itself; there must be exactly one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [c.pid for c in psutil.Process(parent).children() if c.name() == "kryptvault-spin"]
        if found or time.monotonic() > deadline:
            (helper,) = found
            return helper
        time.sleep(0.01)


def gone(pid: int, timeout: float) -> bool:
    """Whether the process ended (exited or a zombie) within `timeout`."""
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass
    return True


@pytest.fixture
def spinner() -> Iterator[CpuSpinner]:
    """A spinner whose helper runs at idle priority, closed after the test."""
    made = CpuSpinner.for_this_machine()
    assert made is not None
    try:
        assert made.wait_ready(10.0)
        yield made
    finally:
        made.close()


def spinning_soon(pid: int, timeout: float = 0.5) -> bool:
    """Whether the process got 100 µs on a CPU within `timeout` (it spins)."""
    start = run_ns(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.0002)
        if run_ns(pid) - start > 100_000:
            return True
    return False


@needs_two_cpus
def test_spinner_spins_at_idle_priority_from_burst_to_rest(spinner: CpuSpinner) -> None:
    pid = spinner.pid
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert idle_priority_threads(os.getpid()) == []  # the spinning is not this process's

    def spent(seconds: float) -> float:
        before = run_ns(pid)
        time.sleep(seconds)
        return (run_ns(pid) - before) / 1e9

    assert spent(0.2) < 0.02  # waiting for a burst, not spinning
    spinner.burst()
    assert spent(0.3) > 0.1  # a CPU is free (this thread sleeps): the spinner has it
    spinner.rest()
    time.sleep(0.05)
    assert spent(0.3) < 0.02
    spinner.burst()
    assert spent(0.2) > 0.05  # a second burst spins again
    spinner.close()
    assert gone(pid, 5.0)


@needs_two_cpus
def test_a_halted_spinner_stops_at_once_and_no_later_burst_wakes_it(spinner: CpuSpinner) -> None:
    # A lock halts it from its own thread while the request loop is in a burst: the CPUs
    # belong to the lock's work from then on.
    pid = spinner.pid

    def spent(seconds: float) -> float:
        before = run_ns(pid)
        time.sleep(seconds)
        return (run_ns(pid) - before) / 1e9

    spinner.burst()
    assert spinning_soon(pid, 5.0)
    halting = threading.Thread(target=spinner.halt)
    halting.start()
    halting.join()
    time.sleep(0.05)
    assert spent(0.3) < 0.02 and not spinner.holding
    spinner.burst()  # the loop's next requests, while the lock goes on
    spinner.on_request(bulk=False)
    assert spent(0.3) < 0.02 and not spinner.holding
    spinner.rest()


@needs_two_cpus
def test_a_burst_begun_before_the_spinner_let_go_of_the_last_one_spins_from_the_next_request(
    spinner: CpuSpinner,
) -> None:
    # The helper takes the lock as the loop rests and gives it back at once, but at idle
    # priority it can be preempted in between, and a burst that starts then cannot take the
    # lock. It must not go without a spinner until the loop next sleeps. Here this test
    # plays the preempted helper on the real shared lock (the race itself comes up by load).
    spinner.burst()
    assert spinning_soon(spinner.pid, 5.0)
    spinner.rest()
    functions = _spin_functions()
    assert functions is not None
    _, lock, _, unlock = functions
    ref = spinner._ref  # the lock the helper spins on
    lock(ref)  # taken once the helper let go of it: the helper's place after a rest
    try:
        spinner.burst()
        assert spinner.behind and not spinner.holding
        spinner.on_request(bulk=False)  # the lock is still taken: still behind
        assert spinner.behind and not spinner.holding
    finally:
        unlock(ref)
    spinner.on_request(bulk=False)  # the loop's next request catches up
    assert spinner.holding and not spinner.behind
    assert spinning_soon(spinner.pid, 5.0)
    spinner.rest()


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
    helper = spinner_helper(pid)
    assert os.sched_getscheduler(helper) == os.SCHED_IDLE
    spun_ns = 0
    # It yields to every other task: a program holding both CPUs through one burst (a CI
    # machine's leftover, say) can leave it no time at all, but not through five.
    for attempt in range(5):
        before = run_ns(helper)
        for i in range(5000):  # look-ups of absent names: one round trip each, back to back
            assert not os.path.lexists(mounted.mountpoint / f"absent-{attempt}-{i}")
        spun_ns = run_ns(helper) - before
        if spun_ns > 0:
            break
    assert spun_ns > 0  # it filled some of the caller's waits
    time.sleep(0.3)  # the burst is over (0.5 ms without a request)
    before = process_cpu_ns(pid) + run_ns(helper)
    time.sleep(0.5)
    assert process_cpu_ns(pid) + run_ns(helper) - before < 25_000_000  # < 5 % of a CPU: no spinning


@needs_two_cpus
def test_the_key_holding_daemon_has_no_idle_priority_thread_and_its_helper_holds_nothing(
    mounted: Mount,
) -> None:
    pid = mounted.pid
    assert idle_priority_threads(pid) == []
    helper = spinner_helper(pid)
    # The helper was exec'd (its own program, no copy of the daemon's memory) and sees
    # only its pipe, the shared page and the standard streams: no /dev/fuse, no container.
    assert open(f"/proc/{helper}/cmdline", "rb").read().split(b"\0")[:3] == [
        sys.executable.encode(),
        b"-I",
        b"-S",
    ]
    targets = {os.readlink(f"/proc/{helper}/fd/{fd}") for fd in os.listdir(f"/proc/{helper}/fd")}
    assert not any(t == "/dev/fuse" or t.startswith(str(mounted.container)) for t in targets), targets
    assert all(
        t.startswith(("pipe:", "/memfd:kryptvault-spin", "/dev/null")) or fd_is_std(t) for t in targets
    ), targets
    assert mounted.stop() == 0
    assert gone(helper, 10.0)  # it ends with the daemon
    mounted.start()  # for the fixture's stop


def fd_is_std(target: str) -> bool:
    """The daemon's own stderr (the test's log file), which the helper inherits."""
    return target.endswith("/log")


@needs_two_cpus
def test_the_daemon_exits_promptly_with_both_cpus_busy(tmp_path: Path) -> None:
    # An idle-priority thread in the daemon runs only when a CPU has nothing else to do,
    # and the process ends only with its last thread: with four busy loops on two CPUs a
    # daemon with such a thread took 226-4,956 ms to exit after its unmount (median ~2.3 s;
    # 33-76 ms without one).
    container = tmp_path / "v.kv"
    mkfs_container(container)
    mount = Mount(container, tmp_path / "mnt", tmp_path / "log")
    stops = []
    for cycle in range(3):
        mount.start()
        for i in range(2000):  # a burst: the spinner has spun
            os.path.lexists(mount.mountpoint / f"absent-{cycle}-{i}")
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
        try:
            time.sleep(0.2)
            start = time.monotonic()
            assert mount.stop() == 0
            stops.append(time.monotonic() - start)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    print("unmount to daemon exited, s:", [round(s, 3) for s in stops])
    assert max(stops) < 0.5, stops


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
            helper = spinner_helper(pid)
            spun_before = run_ns(helper)
            start = time.monotonic()
            while os.read(fd, MIB):
                pass
            elapsed = time.monotonic() - start
            spun = (run_ns(helper) - spun_before) / 1e9
        finally:
            os.close(fd)
        # Spinning through it would fill most of the reader's waits (~80 % of the time).
        assert spun <= 0.25 * elapsed + 0.02, (spun, elapsed)
    finally:
        assert mount.stop() == 0
