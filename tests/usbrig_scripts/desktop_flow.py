"""Guest side of tests/test_e2e_desktop.py: the desktop flow with udevd and a systemd user
manager, driven by the emulated stick being plugged in and pulled out.

Runs inside the kvguest helper (``kvguest.py``, request ``desktop_flow``). What is real:
the kernel's USB stack and uevents, the host's systemd-udevd with the rules `kryptvault
token udev` wrote, the host's ``systemd --user`` (device units from udev, the
SYSTEMD_USER_WANTS of the rules, the guard/plug/lock units `kryptvault setup` installed),
two dbus-daemons (a session bus and one standing in for the system bus), the kryptvault
CLI and mount daemon. What is fake: logind and the notification server (the jeepney
fakes of tests/test_desktop.py), pinentry (its fake, installed as /usr/local/bin/pinentry
so the plug unit finds it on the user manager's PATH), and the stick's automounter
(udisks on a desktop; here this script mounts the stick once its disk appears).

systemd --user refuses to start unless the machine was booted with systemd, which it
tells by /run/systemd/system existing; the guest's PID 1 is the rig's bash, so the
directory is created, and a cgroup2 hierarchy is mounted for the manager to run in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_desktop import FAKE_PINENTRY, FakeLogind, FakeNotifications  # noqa: E402

BUS_DIR = Path("/run/kvbus")  # the system bus stand-in
USER_CGROUP = Path("/sys/fs/cgroup/user.slice/user-0.slice/user@0.service")
PINENTRY = Path("/usr/local/bin/pinentry")
# KRYPTVAULT_E2E_UM_DEBUG=1: the user manager logs at debug level (every signal it sends).
UM_DEBUG = "--log-level=debug" if os.environ.get("KRYPTVAULT_E2E_UM_DEBUG") == "1" else ""


class Flow:
    def __init__(self, guest: Any, work: Path, vault: str) -> None:
        self.guest = guest
        self.work = work
        self.vault = vault  # dashed UUID
        self.hex = vault.replace("-", "")
        self.steps: dict[str, float] = {}
        self.t0 = time.monotonic()

    def mark(self, name: str) -> None:
        self.steps[name] = round(time.monotonic() - self.t0, 3)

    def sh(self, command: str, timeout: float = 120) -> str:
        done = self.guest.sh(command, timeout)
        if done["rc"] != 0:
            tail = f"{done['out'][-1500:]} {done['err'][-1500:]}"
            raise RuntimeError(f"{command!r} failed (rc={done['rc']}): {tail}")
        return str(done["out"])

    def cli(self, *args: str) -> dict[str, Any]:
        res: dict[str, Any] = self.guest.cli(list(args))
        if res["rc"] != 0:
            raise RuntimeError(f"kryptvault {' '.join(args)} failed: {res}")
        return res

    def systemctl(self, *args: str) -> str:
        done = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, timeout=60)
        return done.stdout.strip()

    def unit(self, name: str) -> dict[str, str]:
        out = self.systemctl("show", name, "-p", "ActiveState", "-p", "Result", "-p", "NRestarts",
                             "-p", "ExecMainStatus", "-p", "WantedBy", "-p", "BindsTo")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def state(self, kind: str) -> str:
        """ActiveState of this vault's guard, plug or lock unit."""
        return self.state_of(f"kryptvault-{kind}@{self.hex}.service")

    def state_of(self, unit: str) -> str:
        return self.unit(unit).get("ActiveState", "")

    def pinentry_calls(self) -> int:
        count = self.work / "pinentry.count"
        return int(count.read_text()) if count.exists() else 0

    def host(self, kind: str, stick: str) -> None:
        self.guest.wait_action(self.guest.host_action(kind, stick), 60)


def _wait(what: str, cond: Any, timeout: float, step: float = 0.02) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


def _stick_dev(serial: str) -> str | None:
    for block in Path("/sys/block").glob("sd*"):
        d = block.joinpath("device").resolve()
        while str(d).startswith("/sys/devices/"):
            if (d / "serial").exists() and (d / "idVendor").exists():
                if (d / "serial").read_text().strip() == serial and Path(f"/dev/{block.name}").exists():
                    return f"/dev/{block.name}"
                break
            d = d.parent
    return None


def _audit(vault: str) -> list[dict[str, Any]]:
    path = Path(os.environ["XDG_STATE_HOME"]) / "kryptvault" / "audit.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [e for e in map(json.loads, filter(None, lines)) if e.get("vault") == vault]


def _locks(vault: str) -> list[dict[str, Any]]:
    return [e for e in _audit(vault) if e.get("event") == "lock"]


def daemon_facts(flow: Flow) -> dict[str, Any]:
    """Where the mount daemon the plug unit started runs, and which buses it was given."""
    status = json.loads(flow.cli("status", "--json")["out"])
    pid = next(int(e["pid"]) for e in status if e["vault"] == flow.vault)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    # Threads that do not block SIGTERM: the kernel may hand the signal to one of them, and
    # its default action ends the process without the lock that sigwait() would start.
    # The thread waiting in sigwait() (rt_sigtimedwait, syscall 128) shows it unblocked
    # while it waits: that is the one meant to take it.
    unblocked = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(
            line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line
        )
        in_sigwait = (task / "syscall").read_text().startswith("128 ")
        if not int(status.get("SigBlk", "0"), 16) & (1 << (15 - 1)) and not in_sigwait:
            unblocked.append((task / "comm").read_text().strip())
    return {
        "pid": pid,
        "sigterm_unblocked_threads": unblocked,
        "cgroup": Path(f"/proc/{pid}/cgroup").read_text().strip(),
        "env": sorted(v.decode() for v in environ if v.startswith(b"DBUS_")),
    }


def start_desktop(flow: Flow, password: str) -> tuple[FakeLogind, FakeNotifications]:
    """udevd, the two buses with their fakes, the fake pinentry and the user manager."""
    BUS_DIR.mkdir(parents=True, exist_ok=True)
    runtime = os.environ["XDG_RUNTIME_DIR"]
    flow.sh(
        f"mkdir -p {runtime} /run/udev /run/systemd/system && chmod 700 {runtime} && "
        "(mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup) && "
        f"mkdir -p {USER_CGROUP} && "
        f"dbus-daemon --session --fork --address={os.environ['DBUS_SESSION_BUS_ADDRESS']} && "
        f"dbus-daemon --session --fork --address={os.environ['DBUS_SYSTEM_BUS_ADDRESS']}"
    )
    flow.mark("buses")
    logind = FakeLogind(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    notes = FakeNotifications(os.environ["DBUS_SESSION_BUS_ADDRESS"])
    flow.mark("fakes")
    # Answers in order: the first plug types the password, the second cancels, the third
    # and fourth type it again.
    answers = flow.work / "pinentry.answers"
    answers.write_text(f"pin:{password}\ncancel\npin:{password}\npin:{password}\n")
    PINENTRY.write_text(FAKE_PINENTRY.format(
        python=sys.executable, log=str(flow.work / "pinentry.log"), answers=str(answers),
        count=str(flow.work / "pinentry.count")))
    PINENTRY.chmod(0o755)
    flow.sh(
        "/lib/systemd/systemd-udevd --daemon && "
        "udevadm trigger --subsystem-match=usb --subsystem-match=block --action=add && "
        "udevadm settle --timeout=60"
    )
    flow.mark("udevd")
    # The session bus is ours, where the user manager tells its services it is
    # ($XDG_RUNTIME_DIR/bus); the distribution's socket-activated one (dbus-user-session)
    # is masked so that it does not take the address.
    units = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user"
    units.mkdir(parents=True, exist_ok=True)
    (units / "dbus.socket").symlink_to("/dev/null")
    # The manager in a cgroup of its own (as user@0.service would put it), its services'
    # output into its log: there is no journal in the guest.
    log = flow.work / "user-manager.log"
    # Every fd of the background group redirected: sh() waits for EOF on its pipes.
    flow.sh(
        f"(cd / && exec setsid bash -c 'echo $$ > {USER_CGROUP}/cgroup.procs && exec /lib/systemd/systemd "
        f"--user --log-target=console {UM_DEBUG} --default-standard-output=inherit "
        "--default-standard-error=inherit') "
        f"</dev/null >{log} 2>&1 &",
        timeout=30,
    )
    _wait("the user manager", lambda: flow.systemctl("is-system-running") in ("running", "degraded"), 60, 0.1)
    flow.mark("user_manager")
    return logind, notes


def plug_and_mount_stick(flow: Flow, serial: str, stick_id: str, stick_mnt: str) -> None:
    """QMP device_add, then what udisks would do: mount the stick once its disk appears."""
    flow.host("plug", stick_id)
    dev: list[str] = []
    _wait("the stick's disk", lambda: bool(dev.append(_stick_dev(serial) or "") or dev[-1]), 30)
    flow.sh(f"mkdir -p {stick_mnt} && mount -o uid=0 {dev[-1]} {stick_mnt}")


def unplug_stick(flow: Flow, stick_id: str, stick_mnt: str) -> None:
    flow.host("unplug", stick_id)
    flow.sh(f"umount -l {stick_mnt} 2>/dev/null; true")


# The FIDO2 part: software keys (tests/fido2_soft.py) made real /dev/hidrawN nodes through
# uhid (tests/fido2_uhid.py), hosted by one helper process (its threads stay out of this
# process, which forks every CLI run). It reads "plug NAME SECRET PIN auto|manual",
# "touch NAME", "destroy NAME" and answers each with a JSON line.
KEY_HOST = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from fido2_soft import SoftAuthenticator
from fido2_uhid import UhidKey
keys = {}
for line in sys.stdin:
    word, name, *rest = line.split()
    if word == "plug":
        secret, pin, mode = rest
        auth = SoftAuthenticator(device_secret=bytes.fromhex(secret), pin=None if pin == "-" else pin,
                                 auto_touch=mode == "auto")
        keys[name] = (auth, UhidKey(auth))
        print(json.dumps({"node": keys[name][1].hidraw(30)}), flush=True)
    elif word == "touch":
        keys[name][0].touch.set()
        print("{}", flush=True)
    elif word == "destroy":
        auth, key = keys.pop(name)
        key.destroy()
        print(json.dumps({"touches_wanted": auth.touches_wanted, "silent_probes": auth.silent_probes}),
              flush=True)
"""
FIDO2_CONTAINER = "/tmp/kv/fido2.kv"
KEY_PIN = "2468"
KEY_SECRET = bytes(range(32)).hex()
FOREIGN_SECRET = bytes(range(32, 64)).hex()
KDF = ("--kdf-time-ms", "50", "--kdf-memory-mib", "8")


class KeyHost:
    def __init__(self, log: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", KEY_HOST, str(TESTS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True)

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the key host ended on {line.split()[:2]} (see key-host.log)")
        result: dict[str, Any] = json.loads(answer)
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_key_host(flow: Flow) -> KeyHost:
    """uhid loaded and the key host started (its imports take seconds under TCG) before
    the stick's part of the flow, so that they overlap with it."""
    modules = subprocess.run(["modprobe", "-a", "uhid", "hid_generic"], capture_output=True, text=True)
    if not os.path.exists("/dev/uhid"):
        raise RuntimeError(f"no /dev/uhid after modprobe uhid: {modules.stderr.strip()}")
    return KeyHost(flow.work / "key-host.log")


def fido2_flow(flow: Flow, keys: KeyHost, notes: FakeNotifications, password: str) -> dict[str, Any]:
    """Plug to mount with a FIDO2 key: enrol a key in a second vault and set it up, with a
    key of no vault of ours plugged throughout (plugged before the rule existed, so it
    starts nothing; the plug unit then has two keys to ask); the vault's key -> password,
    a wrong PIN, the PIN again, "Touch your security key" (only then is the key touched)
    -> mounted; pull the key -> locked."""
    res: dict[str, Any] = {}
    flow.mark("fido2_start")
    pw_file, pin_file = flow.work / "fido2-pw", flow.work / "fido2-pin"
    pw_file.write_text(password + "\n")
    pin_file.write_text(KEY_PIN + "\n")
    keys.ask(f"plug foreign {FOREIGN_SECRET} - manual")
    mine = keys.ask(f"plug mine {KEY_SECRET} {KEY_PIN} auto")["node"]
    made = flow.cli("init", FIDO2_CONTAINER, "--token", f"fido2:{mine}", "--password-file", str(pw_file),
                    "--pin-file", str(pin_file), *KDF)["out"]
    vault = made.split("created vault ", 1)[1].split()[0]
    hex_id = vault.replace("-", "")
    res["vault"] = vault
    keys.ask("destroy mine")
    res["setup"] = flow.cli("setup", FIDO2_CONTAINER)["out"]
    res["rules"] = Path("/etc/udev/rules.d/70-kryptvault.rules").read_text()
    mountpoint = Path.home() / f"Vault-{hex_id[:8]}"
    plug_unit = f"kryptvault-plug@{hex_id}.service"
    flow.mark("fido2_setup")

    # -- the vault's key: password, a wrong PIN, the PIN; touched once asked to
    answers = flow.work / "pinentry.answers"
    calls, notes_before = flow.pinentry_calls(), len(notes.notes())
    lines = answers.read_text().splitlines()[:calls]
    lines += [lines[-1] if lines else "cancel"] * (calls - len(lines))
    answers.write_text("\n".join([*lines, f"pin:{password}", "pin:0000", f"pin:{KEY_PIN}"]) + "\n")
    res["first_call"] = calls  # the fake pinentry numbers its calls from 0
    t_plug = time.monotonic()
    keys.ask(f"plug mine {KEY_SECRET} {KEY_PIN} manual")
    touch = "Touch your security key"
    asked = lambda: any(n[0] == touch for n in notes.notes()[notes_before:])  # noqa: E731
    _wait("the touch notification", asked, 120, 0.05)
    res["touch_note_s"] = round(time.monotonic() - t_plug, 3)
    res["mounted_before_touch"] = os.path.ismount(mountpoint)
    keys.ask("touch mine")
    _wait("the FIDO2 vault mounted by the plug unit", lambda: os.path.ismount(mountpoint), 60, 0.05)
    res["plug_to_mounted_s"] = round(time.monotonic() - t_plug, 3)
    res["pinentry_calls"] = flow.pinentry_calls() - calls
    flow.mark("fido2_mounted")
    (mountpoint / "key.txt").write_text("opened with the key\n")

    # -- pull the key
    before = len(_locks(vault))
    t_pull = time.monotonic()
    res["key"] = keys.ask("destroy mine")
    locked = lambda: not os.path.ismount(mountpoint) and len(_locks(vault)) > before  # noqa: E731
    _wait("the lock on the key's removal", locked, 30)
    res["unplug_to_locked_s"] = round(time.monotonic() - t_pull, 3)
    res["locks"] = _locks(vault)[before:]
    with contextlib.suppress(TimeoutError):  # its absence is for the test to report
        _wait("the locked notification", lambda: len(notes.notes()) >= notes_before + 3, 10)
    res["notes"] = notes.notes()[notes_before:]
    _wait("the plug unit to end", lambda: flow.state_of(plug_unit) in ("inactive", "failed"), 30, 0.1)
    res["plug_unit"] = flow.unit(plug_unit)
    res["foreign"] = keys.ask("destroy foreign")
    flow.mark("fido2_unplugged")
    return res


def run(
    guest: Any,
    *,
    container: str,
    vault: str,
    password: str,
    serial: str,
    stick_id: str,
    stick_mnt: str,
    workdir: str,
) -> dict[str, Any]:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    flow = Flow(guest, work, vault)
    out: dict[str, Any] = {"steps": flow.steps}
    logind: FakeLogind | None = None
    notes: FakeNotifications | None = None
    keys: KeyHost | None = None
    key_host_error = "not started"
    try:
        try:
            keys = start_key_host(flow)
        except Exception as exc:  # the stick's part goes on; the FIDO2 part reports it
            key_host_error = f"{type(exc).__name__}: {exc}"
        # The stick was in for `init`; out it goes, the desktop session starts without it,
        # and the user sets the vault up in that session.
        unplug_stick(flow, stick_id, stick_mnt)
        logind, notes = start_desktop(flow, password)
        out["setup"] = flow.cli("setup", container)["out"]
        config = Path(os.environ["XDG_CONFIG_HOME"]) / "kryptvault" / "config.toml"
        out["config"] = config.read_text()
        mountpoint = Path.home() / f"Vault-{flow.hex[:8]}"
        out["mountpoint"] = str(mountpoint)
        out["token_udev"] = flow.cli("token", "udev", container)["out"]
        out["rules"] = Path("/etc/udev/rules.d/70-kryptvault.rules").read_text()
        out["units_dir_listing"] = flow.sh(f"ls {os.environ['XDG_CONFIG_HOME']}/systemd/user")
        flow.mark("setup")

        # -- plug in: udev -> user manager -> guard -> plug -> pinentry -> mount
        t_plug = time.monotonic()
        plug_and_mount_stick(flow, serial, stick_id, stick_mnt)
        flow.mark("plugged")
        _wait("the vault mounted by the plug unit", lambda: os.path.ismount(mountpoint), 120, 0.05)
        out["plug_to_mounted_s"] = round(time.monotonic() - t_plug, 3)
        flow.mark("mounted")
        out["guard_after_plug"] = flow.unit(f"kryptvault-guard@{flow.hex}.service")
        out["daemon"] = daemon_facts(flow)
        # `plug` ends once the daemon is up; the daemon must outlive its unit.
        _wait("the plug unit to end", lambda: flow.state("plug") in ("inactive", "failed"), 60, 0.1)
        time.sleep(1.0)  # a kill at the unit's end would have shown by now
        out["after_plug_unit_ended"] = {
            "daemon_alive": Path(f"/proc/{out['daemon']['pid']}").exists(),
            "mounted": os.path.ismount(mountpoint),
            "locks": _locks(vault),
        }
        out["pinentry_calls_first"] = flow.pinentry_calls()

        # -- work: a file written and fsync-ed
        data = b"written on the desktop, before the lid closed\n" * 2000
        with open(mountpoint / "work.txt", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # and one more write accepted but not yet committed: the lock before sleep saves it
        with open(mountpoint / "late.txt", "wb") as f:
            f.write(b"just before sleep\n")
        _wait("the sleep inhibitor", lambda: bool(logind and logind.inhibitors), 30)
        out["plug_unit_after_mount"] = flow.unit(f"kryptvault-plug@{flow.hex}.service")

        # -- close the lid
        inhibitor = logind.inhibitors[-1]
        out["inhibitor"] = [str(a) for a in inhibitor.args]
        emitted = logind.prepare_for_sleep(True)
        _wait("the inhibitor's release", lambda: inhibitor.closed_at is not None, 30, 0.005)
        assert inhibitor.closed_at is not None
        out["sleep_release_ms"] = round((inhibitor.closed_at - emitted) * 1000, 1)
        at_release = [json.loads(line) for line in inhibitor.audit_when_closed.splitlines() if line.strip()]
        out["audit_at_release"] = [(e["event"], e["ts"]) for e in at_release]
        out["released_at_wall"] = time.time() - (time.monotonic() - inhibitor.closed_at)
        out["locks_at_release"] = [e for e in at_release if (e["event"], e.get("vault")) == ("lock", vault)]
        gone = _wait("the mount gone", lambda: not os.path.ismount(mountpoint), 30)
        out["unmounted_after_sleep_s"] = round(gone, 3)
        flow.mark("slept")

        # -- resume; take the stick out and put it in again; Cancel in the prompt
        unplug_stick(flow, stick_id, stick_mnt)
        _wait("the guard to stop", lambda: flow.state("guard") == "inactive", 30, 0.1)
        plug_and_mount_stick(flow, serial, stick_id, stick_mnt)
        _wait("the second pinentry prompt", lambda: flow.pinentry_calls() >= 2, 120, 0.05)
        _wait("the plug unit to finish", lambda: flow.state("plug") in ("inactive", "failed"), 60, 0.1)
        time.sleep(2)  # a retry storm would show up as more prompts by now
        out["cancel"] = {
            "pinentry_calls": flow.pinentry_calls(),
            "mounted": os.path.ismount(mountpoint),
            "plug_unit": flow.unit(f"kryptvault-plug@{flow.hex}.service"),
        }
        flow.mark("cancelled")

        # -- out and in again, the password this time: the file is there
        unplug_stick(flow, stick_id, stick_mnt)
        _wait("the guard to stop", lambda: flow.state("guard") == "inactive", 30, 0.1)
        t_plug = time.monotonic()
        plug_and_mount_stick(flow, serial, stick_id, stick_mnt)
        _wait("the vault mounted again", lambda: os.path.ismount(mountpoint), 120, 0.05)
        out["replug_to_mounted_s"] = round(time.monotonic() - t_plug, 3)
        out["remount"] = {
            "work_ok": (mountpoint / "work.txt").read_bytes() == data,
            "late": (mountpoint / "late.txt").read_bytes().decode(errors="replace"),
            "pinentry_calls": flow.pinentry_calls(),
        }
        flow.mark("remounted")
        _wait("the sleep inhibitor again", lambda: len(logind.inhibitors) >= 2, 30)

        # -- pull the stick while mounted
        before = len(_locks(vault))
        t_pull = time.monotonic()
        unplug_stick(flow, stick_id, stick_mnt)
        locked = lambda: not os.path.ismount(mountpoint) and len(_locks(vault)) > before  # noqa: E731
        _wait("the lock on unplug", locked, 30)
        out["unplug_to_locked_s"] = round(time.monotonic() - t_pull, 3)
        flow.mark("unplugged")

        # -- in once more, then the SIGTERM a logout or shutdown sends every process left
        plug_and_mount_stick(flow, serial, stick_id, stick_mnt)
        _wait("the vault mounted a third time", lambda: os.path.ismount(mountpoint), 120, 0.05)
        out["daemon_last"] = facts = daemon_facts(flow)
        before = len(_locks(vault))
        os.kill(facts["pid"], signal.SIGTERM)
        gone = lambda: not Path(f"/proc/{facts['pid']}").exists()  # noqa: E731
        _wait("the daemon to end after SIGTERM", gone, 30)
        out["sigterm"] = {"mounted": os.path.ismount(mountpoint), "locks": _locks(vault)[before:]}
        flow.mark("sigterm")
        with contextlib.suppress(TimeoutError):  # its absence is for the test to report
            _wait("the last notification", lambda: len(notes.notes()) >= 6, 10)
        out["stick_notes"] = notes.notes()

        # -- a FIDO2 key in a second vault: plug in to mount works for it too
        try:
            if keys is None:
                raise RuntimeError(f"no key host: {key_host_error}")
            out["fido2"] = fido2_flow(flow, keys, notes, password)
        except Exception as exc:
            import traceback

            out["fido2"] = {"fatal": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    except Exception as exc:
        import traceback

        out["fatal"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        out["audit"] = _audit(vault)
        out["notes"] = notes.notes() if notes else []
        out["inhibitors"] = [
            {"args": [str(a) for a in i.args], "released": i.closed_at is not None}
            for i in (logind.inhibitors if logind else [])
        ]
        daemon_log = Path(os.environ["XDG_STATE_HOME"]) / "kryptvault" / f"daemon-{vault}.log"
        out["lock_unit"] = flow.unit(f"kryptvault-lock@{flow.hex}.service")
        for name, path in (("pinentry.log", work / "pinentry.log"),
                           ("user-manager.log", work / "user-manager.log"), ("daemon.log", daemon_log),
                           ("key-host.log", work / "key-host.log")):
            keep = 400_000 if UM_DEBUG else 6000
            out[name] = path.read_text(errors="replace")[-keep:] if path.exists() else ""
        for fake in (logind, notes):
            if fake is not None:
                fake.close()
        if keys is not None:
            keys.close()
    return out
