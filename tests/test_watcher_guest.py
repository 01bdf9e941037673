"""The watcher against a real USB stick pull, in the QEMU guest (the host has no USB stack).

One guest boot: a vfat stick is mounted, resolved as a UsbToken, watched with every
route; QMP `device_del` pulls it. Seen with every subsystem (usb-test-rig.md lists only
block and usb): the kernel first removes bsg, scsi_device and scsi_disk below the stick,
then `block sda` (~30-60 ms later under TCG), then the USB interface and device. The
first of them must fire (route "uevent"), and re-plugging must be reported as
token_plugged. Times are taken in the guest on one clock (CLOCK_MONOTONIC): the uevent
stamp process's arrival times vs the time on_removed ran.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import qemu_opt_out
from usbrig.rig import UEVENT_STAMP, Stick, UsbRig, make_vfat_image

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SERIAL = "TOKEN-1234"

WATCH = """
import json, os, subprocess, sys, threading, time
from kryptvault.token.resolve import resolve_token
from kryptvault.watcher.watcher import TokenWatcher

def say(**fields):
    print(json.dumps({**fields, "ns": time.monotonic_ns()}), flush=True)

os.makedirs("/mnt/tok", exist_ok=True)
subprocess.run(["mount", "-t", "vfat", sys.argv[1], "/mnt/tok"], check=True)
token = resolve_token(sys.argv[2])
removed, plugged = threading.Event(), threading.Event()

def on_removed(route):
    say(fired=route)
    removed.set()

def on_event(kind, details):
    say(event=kind, **details)
    if kind == "token_plugged":
        plugged.set()

watcher = TokenWatcher(token, on_removed, on_event=on_event)
watcher.start()
say(ready=True, block=watcher.devices.block, usb=watcher.devices.usb, routes=watcher.active_routes)
removed.wait(120)
plugged.wait(120)
watcher.stop()
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UsbRig]:
    qemu_opt_out()
    workdir = tmp_path_factory.mktemp("watcher-rig")
    make_vfat_image(workdir / "stick0.img")
    with UsbRig(workdir, [Stick("stick0", SERIAL, workdir / "stick0.img", port=1)]) as r:
        yield r


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_pulling_the_stick_fires_by_uevent_and_replugging_reports_token_plugged(rig: UsbRig) -> None:
    dev = rig.stick_device("stick0")
    assert dev is not None
    stamp = rig.spawn(f"exec {rig.python} {UEVENT_STAMP} --until remove:usb:usb_device --timeout 120")
    stamp.wait_for_output("# ready", timeout=60)
    watch = rig.spawn(f"exec {rig.python} -c {shlex.quote(WATCH)} {dev} {SERIAL}")
    watch.wait_for_output('"ready"', timeout=90)
    ready = lines(watch.stdout)[0]
    assert ready["routes"] == ["uevent", "mount", "poll"]
    assert str(ready["usb"]).endswith("/usb2/2-1") and str(ready["block"]).endswith("/block/sda")

    rig.unplug("stick0")
    watch.wait_for_output('"fired"', timeout=30)
    stamped = stamp.wait(60)
    usb = str(ready["usb"])
    removes = [ln.split() for ln in stamped.stdout.splitlines() if ln.split()[1:2] == ["remove"]]
    first_ns = next(int(e[0]) for e in removes if e[3].startswith(usb + "/"))
    block_ns = next(int(e[0]) for e in removes if e[2] == "block")
    out = lines(watch.stdout)
    fired = next(e for e in out if "fired" in e)
    removed = next(e for e in out if e.get("event") == "token_removed")
    fired_ns = int(str(fired["ns"]))
    print(
        f"\n[latency] guest: on_removed {(fired_ns - first_ns) / 1e6:.1f} ms after the stamp process saw the "
        f"first remove below the stick ({removed['device']}), {(block_ns - fired_ns) / 1e6:.1f} ms before "
        "it saw `remove block sda`",
        file=sys.stderr,
    )
    # The kernel removes bsg, scsi_device and scsi_disk below the stick before the disk
    # itself; all of them lie below the stick's USB device, so the first one fires.
    assert fired["fired"] == "uevent"
    assert str(removed["device"]).startswith(usb + "/")
    assert fired_ns < block_ns
    assert fired_ns - first_ns < 0.5e9  # TCG guest; two processes reading the same uevent

    started = time.monotonic()
    rig.plug("stick0")
    done = watch.wait(90)
    assert done.rc == 0, done
    plugged = [e for e in lines(done.stdout) if e.get("event") == "token_plugged"]
    assert [e["device"] for e in plugged] == [ready["usb"]]
    print(f"[latency] guest, re-plug -> token_plugged seen on the host: {time.monotonic() - started:.1f} s",
          file=sys.stderr)  # fmt: skip
    assert Path(rig.sticks["stick0"].image).exists()
