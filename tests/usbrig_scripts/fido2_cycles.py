#!/usr/bin/env python3
"""The FIDO2 key as the token, end to end inside the usbrig guest (tests/test_e2e_fido2.py).

The software authenticator (tests/fido2_soft.py) becomes a real /dev/hidrawN through the
kernel's uhid driver (tests/fido2_uhid.py), so python-fido2's Linux hidraw backend finds
it, and "pulling" it is the kernel destroying the HID device (remove uevents for the
hidraw node and the HID device, exactly what a USB key's HID interface sends).

Each plug is a forked "key host" process owning the uhid descriptor and its threads; this
process stays single-threaded because it forks every CLI run (kvguest.Guest.cli) and the
writer/detector probes. All key hosts of one key share its device secret, so a credential
made on the first plug is valid on every later one, as with one physical key.

Steps: load uhid + hid-generic; discovery (the library's hidraw backend, `token list`);
`init --token fido2`; a wrong key and a wrong PIN are refused; an untouched key times
out; N cycles of plug, `mount`, a writer appending + fsyncing lines, destroy, wait for
the mount to leave mountinfo and the daemon to exit (lockprobe.watch), the next mount
checking every accepted line (unplug_cycles.verify); a backup key enrolled (through a
recovery key if `token add` fails with both keys plugged) and mounted alone; `fsck` at
the end. Nothing here asserts: everything goes into one JSON document for the host test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(HERE), str(TESTS)]

import lockprobe  # noqa: E402
import unplug_cycles  # noqa: E402
from kvguest import Guest  # noqa: E402

STATE = "/tmp/kvstate"
RUNTIME = "/run/kvuser"
SCRATCH = Path("/tmp/kvz")
PASSWORD_FILE = "/tmp/kvz-pw"
PASSWORD = "correct horse battery staple 42"
KDF = ["--kdf-time-ms", "50", "--kdf-memory-mib", "8"]
DAEMON_PID = re.compile(r"\(daemon pid (\d+)\)")
RECOVERY_KEY = re.compile(r"([A-Z2-7]{4}(?:-[A-Z2-7]{4}){7})")
MAIN_SECRET = bytes(range(32))
BACKUP_SECRET = bytes(range(32, 64))
WRONG_SECRET = bytes(range(64, 96))
PIN_SECRET = bytes(range(96, 128))


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"the key host said nothing within {timeout} s ({data!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"the key host exited ({data!r})")
        data += chunk
    return data.decode().strip()


class KeyHost:
    """One plug of a software key as /dev/hidrawN, in its own forked process."""

    def __init__(self, secret: bytes, *, auto_touch: bool = True, pin: str | None = None) -> None:
        from fido2_soft import SoftAuthenticator
        from fido2_uhid import UhidKey

        from_child, to_parent = os.pipe()
        from_parent, to_child = os.pipe()
        self.plugged_at = time.monotonic_ns()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(from_child)
                os.close(to_child)
                os.setpgid(0, 0)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                key = UhidKey(SoftAuthenticator(device_secret=secret, auto_touch=auto_touch, pin=pin))
                node = key.hidraw(30)
                hid = os.path.realpath(f"/sys/class/hidraw/{os.path.basename(node)}/device")
                os.write(to_parent, (json.dumps({"node": node, "hid": hid[len("/sys") :]}) + "\n").encode())
                os.read(from_parent, 16)  # the parent's "destroy" (or its exit)
                stamp = time.monotonic_ns()
                key.destroy()
                os.write(to_parent, f"{stamp}\n".encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(to_parent)
        os.close(from_parent)
        self.pid = pid
        self._in = from_child
        self._out = to_child
        self.destroyed_at: int | None = None
        hello = json.loads(_read_line(self._in, 60))
        self.node: str = hello["node"]
        self.hid_devpath: str = hello["hid"]
        self.ready_s = (time.monotonic_ns() - self.plugged_at) / 1e9

    def destroy(self) -> int:
        """UHID_DESTROY; returns CLOCK_MONOTONIC right before it was written."""
        if self.destroyed_at is None:
            os.write(self._out, b"destroy\n")
            self.destroyed_at = int(_read_line(self._in, 30))
            os.waitpid(self.pid, 0)
            os.close(self._in)
            os.close(self._out)
        return self.destroyed_at


def first_remove(uevents: Path, devpath: str, after_ns: int) -> tuple[int, str] | None:
    """(stamp, devpath) of the first kernel `remove` at or below the HID device."""
    for line in uevents.read_text().splitlines():
        fields = line.split()
        if line.startswith("#") or len(fields) < 4 or fields[1] != "remove" or int(fields[0]) < after_ns:
            continue
        if fields[3] == devpath or fields[3].startswith(devpath + "/"):
            return int(fields[0]), fields[3]
    return None


def mount(guest: Guest, container: str, mountpoint: str) -> tuple[dict[str, Any], int | None]:
    res = guest.cli(["mount", container, mountpoint, "--password-file", PASSWORD_FILE], timeout=120)
    found = DAEMON_PID.search(res["out"])
    return res, (int(found.group(1)) if res["rc"] == 0 and found else None)


def checks(guest: Guest, container: str, out: dict[str, Any]) -> None:
    """Discovery through the hidraw backend, enrolment, wrong key, no touch."""
    from fido2.hid import CtapHidDevice

    key = KeyHost(MAIN_SECRET)
    out["hidraw"] = key.node
    out["hid_devpath"] = key.hid_devpath
    out["plug_s"] = key.ready_s
    out["library_lists"] = [str(d.descriptor.path) for d in CtapHidDevice.list_devices()]
    listed = guest.cli(["token", "list", "--json"])
    out["token_list"] = {"rc": listed["rc"], "out": listed["out"], "err": listed["err"]}
    init = guest.cli(
        ["init", container, "--token", "fido2", "--password-file", PASSWORD_FILE, *KDF], timeout=180
    )
    out["init"] = init
    key.destroy()
    if init["rc"] != 0:
        raise RuntimeError(f"init failed: {init}")

    wrong = KeyHost(WRONG_SECRET)
    out["wrong_key"] = guest.cli(["fsck", container, "--password-file", PASSWORD_FILE])
    wrong.destroy()

    # A key with a PIN, on a vault of its own: the right PIN enrols, a wrong one is refused.
    with_pin = KeyHost(PIN_SECRET, pin="2468")
    pin_vault = str(Path(container).with_name("pin.kv"))
    for name, pin in (("good.pin", "2468"), ("bad.pin", "1111")):
        (SCRATCH / name).write_text(pin + "\n")
    out["pin_init"] = guest.cli(
        ["init", pin_vault, "--token", "fido2", "--password-file", PASSWORD_FILE,
         "--pin-file", str(SCRATCH / "good.pin"), *KDF],
        timeout=180,
    )
    out["wrong_pin"] = guest.cli(
        ["fsck", pin_vault, "--password-file", PASSWORD_FILE, "--pin-file", str(SCRATCH / "bad.pin")]
    )
    with_pin.destroy()

    untouched = KeyHost(MAIN_SECRET, auto_touch=False)
    os.environ["KRYPTVAULT_TOUCH_TIMEOUT"] = "1"
    try:
        started = time.monotonic()
        res = guest.cli(["fsck", container, "--password-file", PASSWORD_FILE])
        res["wall_s"] = round(time.monotonic() - started, 3)
        out["no_touch"] = res
    finally:
        del os.environ["KRYPTVAULT_TOUCH_TIMEOUT"]
        untouched.destroy()


def one_cycle(
    guest: Guest, cycle: int, p: dict[str, Any], logs: list[dict[str, Any]], rec: dict[str, Any]
) -> None:
    work: Path = p["work"]
    key = KeyHost(MAIN_SECRET)
    rec["plug_s"] = round(key.ready_s, 3)
    rec["hidraw"] = key.node
    res, pid = mount(guest, p["container"], p["mountpoint"])
    rec["mount_s"] = res["s"]
    if pid is None:
        key.destroy()
        raise RuntimeError(f"mount failed: {res}")
    if logs:  # what the previous pulls left must all be there
        rec["verify"] = unplug_cycles.verify(p["data_path"], logs)
    watch_out = work / f"watch-{cycle}.json"
    ready = work / f"watch-{cycle}.ready"
    writer_log = work / f"writer-{cycle}.log"
    watcher = unplug_cycles.fork(lockprobe.watch, pid, p["mountpoint"], str(watch_out), 60.0, str(ready), 50)
    unplug_cycles.wait_file(ready, 30)
    writer = unplug_cycles.fork(lockprobe.write_loop, str(p["data_path"]), str(writer_log), cycle)
    deadline = time.monotonic() + 30
    while unplug_cycles.count_fsynced(writer_log) < p["min_lines"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the writer fsync-ed too few lines in 30 s")
        time.sleep(0.005)
    # -- the pull
    t_destroy = key.destroy()
    rec["watch_rc"] = unplug_cycles.reap(watcher, 60)
    watch: dict[str, Any] = json.loads(watch_out.read_text()) if watch_out.exists() else {}
    rec["watch"] = watch
    rec["writer_rc"] = unplug_cycles.reap(writer, 30)
    log = lockprobe.read_write_log(str(writer_log))
    logs.append(log)
    rec["writer"] = log
    time.sleep(0.05)  # the listener's tail of the burst
    first = first_remove(p["uevents"], key.hid_devpath, t_destroy)
    end = watch.get("end")
    if first is not None:
        rec["first_remove"], rec["first_remove_dev"] = first
    if end is not None:
        rec["destroy_ms"] = (end - t_destroy) / 1e6
        if first is not None:
            rec["a_ms"] = (end - first[0]) / 1e6


def cycles(guest: Guest, container: str, mountpoint: str, n: int, out: dict[str, Any]) -> None:
    work = SCRATCH / "fido2"
    work.mkdir(parents=True, exist_ok=True)
    uevents = work / "uevents.log"
    stamp = TESTS / "usbrig" / "uevent_stamp.py"
    with open(uevents, "w") as sink:
        listener = subprocess.Popen(
            [sys.executable, str(stamp)], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    records: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []
    out["records"] = records
    try:
        deadline = time.monotonic() + 60
        while "# ready" not in uevents.read_text():
            if time.monotonic() > deadline or listener.poll() is not None:
                raise RuntimeError(f"uevent_stamp.py did not start: {uevents.read_text()!r}")
            time.sleep(0.01)
        data_path = Path(mountpoint) / "journal.txt"
        p: dict[str, Any] = {
            "container": container,
            "mountpoint": mountpoint,
            "data_path": data_path,
            "work": work,
            "uevents": uevents,
            "min_lines": 5,
        }
        for cycle in range(n):
            rec: dict[str, Any] = {"cycle": cycle}
            records.append(rec)
            one_cycle(guest, cycle, p, logs, rec)
        # The last pull's lines, with the key back; then an orderly lock.
        key = KeyHost(MAIN_SECRET)
        res, pid = mount(guest, container, mountpoint)
        out["final_mount"] = res
        if pid is not None:
            out["final_verify"] = unplug_cycles.verify(p["data_path"], logs)
            out["final_lock"] = guest.cli(["lock", mountpoint])
        out["fsynced_total"] = sum(int(log["fsynced"]) for log in logs)
        # A backup key: enrolled next to the first, then it alone opens the vault.
        backup = KeyHost(BACKUP_SECRET)
        add = ["token", "add", container, "--new-token", f"fido2:{backup.node}"]
        add += ["--password-file", PASSWORD_FILE]
        # As a user would type it, with both keys plugged: kryptvault finds the opening key.
        out["token_add_default"] = guest.cli([*add, *KDF], timeout=180)
        if out["token_add_default"]["rc"] == 0:
            out["token_add"] = out["token_add_default"]
            key.destroy()
        else:
            # The route around it: a recovery key, then the new key enrolled while it is
            # the only one plugged (so no other key is listed and probed meanwhile).
            rk = guest.cli(["recovery-key", "add", container, "--password-file", PASSWORD_FILE])
            out["recovery_key_add"] = {k: rk[k] for k in ("rc", "err", "s")}
            found = RECOVERY_KEY.search(rk["out"])
            key.destroy()
            if found is not None:
                rk_file = SCRATCH / "recovery.txt"
                rk_file.write_text(found.group(1) + "\n")
                out["token_add"] = guest.cli(
                    [*add, "--recovery", "--recovery-key-file", str(rk_file), *KDF], timeout=180
                )
        res, pid = mount(guest, container, mountpoint)
        out["backup_mount"] = res
        if pid is not None:
            out["backup_verify"] = unplug_cycles.verify(data_path, logs)
            out["backup_lock"] = guest.cli(["lock", mountpoint])
        out["fsck"] = guest.cli(["fsck", container, "--password-file", PASSWORD_FILE])
        backup.destroy()
    finally:
        listener.terminate()
        try:
            listener.wait(10)
        except subprocess.TimeoutExpired:
            listener.kill()
        out["uevents_tail"] = uevents.read_text()[-3000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = time.monotonic()
    # KRYPTVAULT_DEBUG: an internal error comes back with its traceback in the record.
    os.environ.update(XDG_STATE_HOME=STATE, XDG_RUNTIME_DIR=RUNTIME, KRYPTVAULT_DEBUG="1")
    os.makedirs(RUNTIME, mode=0o700, exist_ok=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    Path(PASSWORD_FILE).write_text(PASSWORD + "\n")
    out: dict[str, Any] = {"fatal": None}
    try:
        t0 = time.monotonic()
        modules = subprocess.run(["modprobe", "-a", "uhid", "hid_generic"], capture_output=True, text=True)
        out["modprobe"] = {"rc": modules.returncode, "err": modules.stderr}
        out["modprobe_s"] = round(time.monotonic() - t0, 3)
        out["uhid_present"] = os.path.exists("/dev/uhid")
        if not out["uhid_present"]:
            raise RuntimeError("no /dev/uhid after modprobe uhid")
        from kryptvault.cli import register_commands

        register_commands()  # the preload every forked CLI run starts from
        guest = Guest(SCRATCH, SCRATCH)
        container, mountpoint = "/tmp/kv/vault.kv", "/mnt/vault"
        os.makedirs("/tmp/kv", exist_ok=True)
        os.makedirs(mountpoint, exist_ok=True)
        t0 = time.monotonic()
        checks(guest, container, out)
        out["checks_s"] = round(time.monotonic() - t0, 3)
        t0 = time.monotonic()
        cycles(guest, container, mountpoint, args.cycles, out)
        out["cycles_s"] = round(time.monotonic() - t0, 3)
        out["audit"] = guest.cli(["log", "--json"])["out"]
    except Exception:
        out["fatal"] = traceback.format_exc()
    out["total_s"] = round(time.monotonic() - started, 3)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
