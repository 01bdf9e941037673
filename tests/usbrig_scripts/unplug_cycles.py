"""The lock-on-unplug cycles, run inside the guest by kvguest.py (request "unplug_cycles").

Per cycle, with the vault mounted and its daemon pid known:

1. fork the end-of-lock detector (lockprobe.watch: woken by a pidfd and mountinfo's
   POLLPRI, plus a `poll_ms` fallback poll) and the writer (lockprobe.write_loop: append +
   fsync numbered lines to a file in the vault);
2. once the writer has fsync-ed a few lines, stamp CLOCK_MONOTONIC and ask the host to pull
   the stick (QMP device_del); the host reports how long after our request it sent it;
3. wait for the detector's stamp and the writer's end; read the first kernel `remove`
   uevent below the stick from the independent uevent_stamp.py listener;
4. unmount the dead stick filesystem, ask the host to plug the stick back, wait for its
   disk, mount it, check the container (`info`, `fsck`), mount the vault again and check
   the file against the writer's logs.

While the lock runs, this process only blocks (pidfds), so that it takes no CPU from the
guest's single vCPU. With `trace`, a scheduler trace of each lock window (tracefs, on
CLOCK_MONOTONIC) says which task had the CPU. Nothing here asserts: every number and every
problem goes into the per-cycle record the host test asserts on, so one bad cycle does not
hide the others.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lockprobe

DAEMON_PID = re.compile(r"\(daemon pid (\d+)\)")


def usb_dir_of_block(block: str) -> str | None:
    """/sys/devices/.../usbN/N-P for /sys/block/sdX, if it hangs off a USB device."""
    d = os.path.realpath(os.path.join(block, "device"))
    while d.startswith("/sys/devices/"):
        if os.path.isfile(os.path.join(d, "serial")) and os.path.isfile(os.path.join(d, "idVendor")):
            return d
        d = os.path.dirname(d)
    return None


def stick_disk(serial: str) -> tuple[str, str] | None:
    """(/dev/sdX, the USB device's devpath) of the stick with this serial."""
    try:
        blocks = sorted(os.listdir("/sys/block"))
    except OSError:
        return None
    for name in blocks:
        if not name.startswith("sd"):
            continue
        usb = usb_dir_of_block(f"/sys/block/{name}")
        if usb is None:
            continue
        try:
            with open(os.path.join(usb, "serial")) as f:
                if f.read().strip() != serial:
                    continue
        except OSError:
            continue
        try:
            with open(f"/sys/block/{name}/size") as f:
                sectors = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if sectors > 0 and os.path.exists(f"/dev/{name}"):  # the medium is there, not just the device
            return f"/dev/{name}", usb[len("/sys") :]
    return None


def wait_for_disk(serial: str, timeout: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = stick_disk(serial)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"stick {serial} has no disk after {timeout} s")
        time.sleep(0.02)


def fork(fn: Callable[..., int], *args: Any) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = fn(*args)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None if it had to be killed after `timeout`.

    Blocks in poll() on a pidfd: no polling loop competing for the guest's vCPUs while
    the lock being measured runs."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)


def clock_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, to place wall-clock log stamps on our time line."""
    a = time.monotonic_ns()
    real = time.time_ns()
    b = time.monotonic_ns()
    return real - (a + b) // 2


TRACEFS = Path("/sys/kernel/tracing")
TRACE_LINE = re.compile(
    r"^\s*(?P<comm>.{1,16}?)-(?P<pid>\d+)\s+\(\s*(?P<tgid>[\d-]+)\)\s+\[(?P<cpu>\d+)\]\s+\S+\s+"
    r"(?P<ts>\d+\.\d+): (?P<event>\w+): (?P<rest>.*)$"
)
NEXT_PID = re.compile(r"==> next_comm=.* next_pid=(\d+) ")


def _tracefs(name: str, value: str) -> None:
    (TRACEFS / name).write_text(value)


def trace_setup() -> None:
    """Scheduler tracing on CLOCK_MONOTONIC, for a CPU breakdown of the lock window."""
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    _tracefs("tracing_on", "0")
    _tracefs("trace_clock", "mono")
    _tracefs("buffer_size_kb", "8192")
    _tracefs("trace_options", "record-tgid")
    for event in ("sched_switch", "sched_process_exit"):
        _tracefs(f"events/sched/{event}/enable", "1")


def trace_start() -> None:
    _tracefs("trace", "")
    _tracefs("tracing_on", "1")


def trace_stop() -> str:
    _tracefs("tracing_on", "0")
    return (TRACEFS / "trace").read_text(errors="replace")


def cpu_breakdown(trace: str, start: int, end: int, roles: dict[int, str]) -> dict[str, Any]:
    """Who had each vCPU between `start` and `end` (ns), in ms summed over the vCPUs, by
    role; and when the daemon's threads exited (ms after `start`; its main thread's exit
    marks the process teardown that os._exit starts)."""
    cpu: dict[str, float] = {}
    last_ts: dict[str, int] = {}  # per vCPU: a sched_switch ends what ran on that vCPU only
    exits: list[float] = []
    leader_exit = None
    daemon = next((tgid for tgid, role in roles.items() if role == "daemon"), None)
    for line in trace.splitlines():
        m = TRACE_LINE.match(line)
        if m is None:
            continue
        ts = int(m["ts"].replace(".", "")) * 1000  # seconds.microseconds -> ns
        tgid = int(m["tgid"]) if m["tgid"].isdigit() else int(m["pid"])
        if m["event"] == "sched_process_exit":
            if tgid == daemon:
                exits.append(round((ts - start) / 1e6, 1))
                if int(m["pid"]) == daemon:
                    leader_exit = ts
            continue
        if m["event"] != "sched_switch":
            continue
        previous = last_ts.get(m["cpu"])
        if previous is not None:
            lo, hi = max(previous, start), min(ts, end)
            if hi > lo:
                pid = int(m["pid"])
                comm = m["comm"].strip()
                if pid == 0:
                    role = "idle"
                elif tgid in roles:
                    role = roles[tgid]
                elif comm.startswith("kworker"):
                    role = "kernel: kworker"
                else:
                    role = f"other: {comm.split('/')[0]}"
                cpu[role] = cpu.get(role, 0.0) + (hi - lo) / 1e6
        last_ts[m["cpu"]] = ts
    ordered = dict(sorted(((k, round(v, 1)) for k, v in cpu.items()), key=lambda kv: -kv[1]))
    return {"cpu_ms": ordered, "leader_exit": leader_exit, "daemon_thread_exits_ms": exits}


def daemon_memory(pid: int) -> dict[str, int]:
    """RssAnon/RssFile (KiB) and thread count of the daemon: its exit has to tear them down."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "Threads"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def count_fsynced(log_path: Path) -> int:
    try:
        return sum(1 for line in log_path.read_text().splitlines() if line.startswith("f "))
    except FileNotFoundError:
        return 0


def first_remove(uevents: Path, usb_devpath: str, after_ns: int) -> tuple[int, str] | None:
    """(stamp, devpath) of the first `remove` uevent at or below the stick after `after_ns`."""
    for line in uevents.read_text().splitlines():
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 4 or fields[1] != "remove" or int(fields[0]) < after_ns:
            continue
        devpath = fields[3]
        if devpath == usb_devpath or devpath.startswith(usb_devpath + "/"):
            return int(fields[0]), devpath
    return None


def remove_stamp(uevents: Path, subsystem: str, after_ns: int) -> int | None:
    for line in uevents.read_text().splitlines():
        fields = line.split()
        if (
            len(fields) >= 4
            and fields[1] == "remove"
            and fields[2] == subsystem
            and int(fields[0]) >= after_ns
        ):
            return int(fields[0])
    return None


def verify(path: Path, logs: list[dict[str, Any]]) -> dict[str, Any]:
    """The vault file must be, cycle by cycle, every accepted line in order, then at most
    the one line whose write() failed; nothing else, no partial line."""
    problems: list[str] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"ok": False, "problems": [f"cannot read {path}: {exc}"], "lines": 0}
    if data and not data.endswith(b"\n"):
        problems.append(f"the file ends in a partial line: {data[-80:]!r}")
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]] if data else []
    pos = 0
    optional_present = 0
    for cycle, log in enumerate(logs):
        accepted = int(log["accepted"])
        for index in range(accepted):
            want = lockprobe.line_for(cycle, index)
            got = lines[pos] if pos < len(lines) else None
            if got != want:
                problems.append(f"cycle {cycle} line {index}: want {want!r}, found {got!r} (file line {pos})")
                return {"ok": False, "problems": problems, "lines": len(lines)}
            pos += 1
        attempted = log["attempted"]
        if attempted is not None and attempted == accepted and pos < len(lines):
            if lines[pos] == lockprobe.line_for(cycle, attempted):
                pos += 1
                optional_present += 1
    if pos != len(lines):
        problems.append(
            f"{len(lines) - pos} unexpected line(s) after file line {pos}: {lines[pos : pos + 3]!r}"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "lines": len(lines),
        "unconfirmed_present": optional_present,
    }


def run(
    guest: Any,
    *,
    container: str,
    mountpoint: str,
    password_file: str,
    serial: str,
    stick_id: str,
    stick_mnt: str,
    daemon_pid: int,
    cycles: int,
    uevent_stamp: str,
    workdir: str,
    fsck_every: int = 1,
    min_lines: int = 5,
    data_name: str = "journal.txt",
    trace: bool = False,
    poll_ms: int = 1,
) -> dict[str, Any]:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data_path = Path(mountpoint) / data_name
    uevents = work / "uevents.log"
    records: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []
    if trace:
        trace_setup()
    # The independent listener: its own interpreter, started once, kernel group only.
    with open(uevents, "w") as out:
        listener = subprocess.Popen(
            [sys.executable, uevent_stamp], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    fatal = None
    try:
        wait_until = time.monotonic() + 60
        while "# ready" not in uevents.read_text():
            if time.monotonic() > wait_until or listener.poll() is not None:
                raise RuntimeError(f"uevent_stamp.py did not start: {uevents.read_text()!r}")
            time.sleep(0.01)
        pid = daemon_pid
        for cycle in range(cycles):
            rec: dict[str, Any] = {"cycle": cycle, "daemon_pid": pid, "problems": []}
            records.append(rec)
            params = {
                "container": container,
                "mountpoint": mountpoint,
                "password_file": password_file,
                "serial": serial,
                "stick_id": stick_id,
                "stick_mnt": stick_mnt,
                "pid": pid,
                "uevents": uevents,
                "work": work,
                "data_path": data_path,
                "fsck": bool(fsck_every) and cycle % fsck_every == 0,
                "min_lines": min_lines,
                "trace": trace,
                "poll_ms": poll_ms,
                "listener": listener.pid,
            }
            try:
                pid = _one_cycle(guest, rec, logs, params)
            except Exception:
                fatal = f"cycle {cycle}: {traceback.format_exc()}"
                break
    finally:
        listener.terminate()
        try:
            listener.wait(10)
        except subprocess.TimeoutExpired:
            listener.kill()
    return {"records": records, "fatal": fatal, "uevents_tail": uevents.read_text()[-3000:]}


def _one_cycle(guest: Any, rec: dict[str, Any], logs: list[dict[str, Any]], p: dict[str, Any]) -> int:
    cycle = rec["cycle"]
    work: Path = p["work"]
    pid: int = p["pid"]
    disk = stick_disk(p["serial"])
    if disk is None:
        raise RuntimeError(f"stick {p['serial']} is not plugged at the start of cycle {cycle}")
    usb_devpath = disk[1]
    rec["usb_devpath"] = usb_devpath
    watch_out = work / f"watch-{cycle}.json"
    watch_ready = work / f"watch-{cycle}.ready"
    writer_log = work / f"writer-{cycle}.log"
    watcher = fork(
        lockprobe.watch, pid, p["mountpoint"], str(watch_out), 60.0, str(watch_ready), p["poll_ms"]
    )
    wait_file(watch_ready, 30)
    writer = fork(lockprobe.write_loop, str(p["data_path"]), str(writer_log), cycle)
    deadline = time.monotonic() + 30
    while count_fsynced(writer_log) < p["min_lines"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the writer fsync-ed only {count_fsynced(writer_log)} lines in 30 s")
        time.sleep(0.005)
    rec["fsynced_before_unplug"] = count_fsynced(writer_log)
    rec["clock_offset_ns"] = clock_offset_ns()
    rec["daemon_memory"] = daemon_memory(pid)

    if p["trace"]:
        trace_start()
    # -- the pull: stamp, then the host's QMP device_del
    t_req, act = guest.host_action_stamped("unplug", p["stick_id"])
    rec["t_req"] = t_req
    rc = reap(watcher, 60)
    result: dict[str, Any] = json.loads(watch_out.read_text()) if watch_out.exists() else {}
    rec["watch"] = result
    rec["watch_rc"] = rc
    writer_rc = reap(writer, 30)
    rec["writer_rc"] = writer_rc
    trace = trace_stop() if p["trace"] else None
    log = lockprobe.read_write_log(str(writer_log))
    logs.append(log)
    rec["writer"] = log
    done = guest.wait_action(act, 60)
    rec["host_delay_ns"] = done["host_delay_ns"]
    rec["qmp_unplug_s"] = done.get("unplug_s")
    time.sleep(0.05)  # let the listener write the tail of the burst
    first = first_remove(p["uevents"], usb_devpath, t_req)
    if first is not None:
        rec["first_remove"], rec["first_remove_dev"] = first
    rec["block_remove"] = remove_stamp(p["uevents"], "block", t_req)
    end: int | None = result.get("end")
    if end is not None and first is not None:
        rec["a_ms"] = (end - first[0]) / 1e6
    if end is not None:
        rec["b_ms"] = (end - (t_req + done["host_delay_ns"])) / 1e6
    if end is None:
        rec["problems"].append(f"the lock did not finish: {result}")
    if trace is not None and end is not None and first is not None:
        roles = {pid: "daemon", writer: "writer", watcher: "detector", p["listener"]: "uevent listener"}
        roles[os.getpid()] = "kvguest helper"
        rec["trace"] = cpu_breakdown(trace, first[0], end, roles)
        exit_at = rec["trace"]["leader_exit"]
        if exit_at is not None:
            rec["trace"]["exit_ms"] = round((end - exit_at) / 1e6, 1)
            rec["trace"]["exit_cpu_ms"] = cpu_breakdown(trace, exit_at, end, roles)["cpu_ms"]

    # -- plug back in, check the container, remount, check the data
    t0 = time.monotonic()
    guest.sh(f"umount -l {p['stick_mnt']}")
    plug = guest.host_action("plug", p["stick_id"])
    info = guest.cli(["info", p["container"], "--json"])  # meanwhile the stick enumerates
    rec["info_rc"] = info["rc"]
    if info["rc"] != 0:
        rec["problems"].append(f"info failed: {info['err'].strip()}")
    guest.wait_action(plug, 60)
    dev, _ = wait_for_disk(p["serial"], 30)
    mounted = guest.sh(f"mount -o uid=0 {dev} {p['stick_mnt']}")
    if mounted["rc"] != 0:
        raise RuntimeError(f"cannot mount the stick again: {mounted}")
    rec["replug_s"] = round(time.monotonic() - t0, 3)
    if p["fsck"]:
        fsck = guest.cli(["fsck", p["container"], "--password-file", p["password_file"], "--json"])
        rec["fsck_rc"] = fsck["rc"]
        rec["fsck_s"] = fsck["s"]
        try:
            rec["fsck_clean"] = bool(json.loads(fsck["out"])["clean"])
        except (ValueError, KeyError, TypeError):
            rec["fsck_clean"] = False
        if fsck["rc"] != 0 or not rec["fsck_clean"]:
            rec["problems"].append(f"fsck: rc={fsck['rc']} {fsck['out'][-400:]} {fsck['err'].strip()}")
    mount = guest.cli(["mount", p["container"], p["mountpoint"], "--password-file", p["password_file"]])
    rec["mount_s"] = mount["s"]
    found = DAEMON_PID.search(mount["out"])
    if mount["rc"] != 0 or found is None:
        raise RuntimeError(f"the vault did not mount again: {mount}")
    rec["verify"] = verify(p["data_path"], logs)
    if not rec["verify"]["ok"]:
        rec["problems"] += rec["verify"]["problems"]
    return int(found.group(1))
