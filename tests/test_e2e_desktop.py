"""Issue 15 end to end: from `kryptvault setup` to "plug in, type the password, work, close
the lid, locked before sleep, a notification said so", in one QEMU guest boot.

The emulated stick is plugged and pulled with QMP. In the guest run the host's
systemd-udevd with the rules `kryptvault token udev` wrote, the host's `systemd --user`
(the units `kryptvault setup` installed; it pulls in kryptvault-guard@ through the rules'
SYSTEMD_USER_WANTS), a session dbus-daemon and a second one standing in for the system
bus. Fakes: logind and the notification server (tests/test_desktop.py), pinentry (the
same file's fake, as /usr/local/bin/pinentry), and the automounter (the guest script
mounts the stick's filesystem when the disk appears, as udisks would). The scenario is
tests/usbrig_scripts/desktop_flow.py; the tests below check what it recorded:

plug -> one prompt -> mounted, the daemon outliving its oneshot unit; write; PrepareForSleep
-> locked before the inhibitor is released; out and in + Cancel -> stays locked, one
prompt; out and in + password -> the file is there; pull -> locked; in again + SIGTERM (as
at logout) -> locked. Notifications in order throughout.

Then, in the same boot, a FIDO2 key (the software authenticator as a real /dev/hidrawN
through uhid) enrolled in a second vault, with a key of no vault plugged throughout: the
vault's key plugged -> udev starts the plug unit -> password, a wrong PIN, the PIN,
"Touch your security key", touched -> mounted; pulled -> locked. (A key of no vault
ending `plug` quietly is tested on the host, tests/test_desktop.py.)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import KDF, PASSWORD, PASSWORD_FILE, KvGuest, booted_guest, host_udevadm, host_udevd
from needs import require_tool, unavailable
from usbrig.rig import Stick, make_vfat_image

from kryptvault.cli.unit_files import default_units_dir

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SERIAL = "TOKEN-1234"
STICK_MNT = "/mnt/stick"
CONTAINER = "/tmp/kv/vault.kv"
USER_MANAGER = "/lib/systemd/systemd"
GUEST_ENV = {
    "HOME": "/root",
    "XDG_CONFIG_HOME": "/tmp/kvconf",
    "XDG_DATA_HOME": "/tmp/kvdata",
    "XDG_RUNTIME_DIR": "/run/user/0",
    # Where the user manager puts it for its services, whatever it was given.
    "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/0/bus",
    "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/run/kvbus/system",
}


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("e2e-desktop")
    if os.environ.get("KRYPTVAULT_SKIP_QEMU") != "1":
        # The guest runs the host's binaries.
        if host_udevd() is None or host_udevadm() is None:
            unavailable("needs systemd-udevd and udevadm (package udev)")
        if not Path(USER_MANAGER).exists():
            unavailable(f"needs {USER_MANAGER} (package systemd)")
        require_tool("dbus-daemon", "dbus-daemon")
    make_vfat_image(workdir / "stick0.img", volume_id="1111AAAA")
    env = dict(GUEST_ENV)
    if os.environ.get("KRYPTVAULT_E2E_UM_DEBUG") == "1":  # see desktop_flow.py
        env["KRYPTVAULT_E2E_UM_DEBUG"] = "1"
    with booted_guest(workdir, [Stick("stick0", SERIAL, workdir / "stick0.img", port=1)], env) as kv:
        yield run_flow(kv)


def run_flow(kv: KvGuest) -> dict[str, Any]:
    kv.sh("mkdir -p /run/user/0 /tmp/kv && chmod 700 /run/user/0").check()
    kv.mount_stick("stick0", STICK_MNT)
    kv.cli("init", CONTAINER, "--token", SERIAL, "--password-file", PASSWORD_FILE, *KDF).check()
    vault = kv.cli("info", CONTAINER, "--json").json()["uuid"]
    result: dict[str, Any] = kv.call(
        "desktop_flow",
        wait_s=600,
        container=CONTAINER,
        vault=vault,
        password=PASSWORD,
        serial=SERIAL,
        stick_id="stick0",
        stick_mnt=STICK_MNT,
        workdir="/tmp/kvz/desktop",
    )
    result["vault"] = vault
    result["timings"] = {**kv.rig.timings, **kv.timings}
    (kv.rig.workdir / "desktop-flow.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[desktop] {figures(result)}", file=sys.stderr)
    return result


def figures(flow: dict[str, Any]) -> str:
    keys = ("plug_to_mounted_s", "sleep_release_ms", "replug_to_mounted_s", "unplug_to_locked_s")
    return f"{ {k: flow.get(k) for k in keys} }; steps (s since the flow began): {flow['steps']}"


def no_fatal(flow: dict[str, Any]) -> None:
    assert flow.get("fatal") is None, (
        f"{flow['fatal']}\n--- user manager ---\n{flow.get('user-manager.log', '')[-4000:]}"
        f"\n--- pinentry ---\n{flow.get('pinentry.log', '')}\n--- notes ---\n{flow.get('notes')}"
    )


def test_setup_and_token_udev_install_what_the_user_manager_and_udevd_load(flow: dict[str, Any]) -> None:
    no_fatal(flow)
    hex_id = flow["vault"].replace("-", "")
    assert f'[vaults."{flow["vault"]}"]' in flow["config"] and "mount_on_plug = true" in flow["config"]
    assert f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-guard@{hex_id}.service"' in flow["rules"]
    # Where systemd --user looks ($XDG_CONFIG_HOME/systemd/user), not ~/.config.
    assert [name for name in flow["units_dir_listing"].split() if name.startswith("kryptvault")] == [
        "kryptvault-guard@.service", "kryptvault-lock@.service", "kryptvault-plug@.service"]


def test_plugging_the_stick_starts_the_guard_which_asks_the_password_once_and_mounts(
    flow: dict[str, Any],
) -> None:
    no_fatal(flow)
    guard = flow["guard_after_plug"]
    # Started by the user manager for the stick's device unit (the rules' SYSTEMD_USER_WANTS),
    # bound to the alias the rules gave that device.
    assert guard["ActiveState"] == "active", guard
    assert "-block-sd" in guard["WantedBy"] and guard["WantedBy"].endswith('.device"'), guard
    assert guard["BindsTo"] == f"sys-subsystem-kryptvault-{flow['vault'].replace('-', '')}.device", guard
    assert flow["pinentry_calls_first"] == 1
    assert "GETPIN" in flow["pinentry.log"]
    assert flow["plug_to_mounted_s"] < 90
    # The daemon runs in the plug unit's cgroup, was given the session bus, and outlives
    # the oneshot unit that started it.
    assert "/kryptvault-plug@" in flow["daemon"]["cgroup"], flow["daemon"]
    assert "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/0/bus" in flow["daemon"]["env"], flow["daemon"]
    after = flow["after_plug_unit_ended"]
    assert after["daemon_alive"] and after["mounted"] and after["locks"] == [], after


def test_closing_the_lid_locks_before_sleep_and_the_notifications_say_so(
    flow: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    no_fatal(flow)
    with capsys.disabled():  # the figures in every CI log, even under -q
        print(f"\n[desktop] {figures(flow)}")
    assert flow["inhibitor"][0] == "sleep" and flow["inhibitor"][3] == "delay"
    # The inhibitor is released only once the lock's commit and audit entry are done.
    (entry,) = flow["locks_at_release"]
    assert entry["reason"] == "suspend" and entry["route"] == "logind" and entry["error"] is None
    assert flow["sleep_release_ms"] < 500
    short = flow["vault"].replace("-", "")[:8]
    assert flow["notes"][:2] == [
        ["Vault mounted", f"Vault {short} is open."],
        ["Vault locked", f"Vault {short} locked (the computer is going to sleep)."],
    ]


def test_cancel_in_the_prompt_stays_locked_and_asks_no_more(flow: dict[str, Any]) -> None:
    no_fatal(flow)
    cancel = flow["cancel"]
    assert cancel["pinentry_calls"] == 2 and not cancel["mounted"], cancel
    assert cancel["plug_unit"]["NRestarts"] == "0" and cancel["plug_unit"]["Result"] == "success", cancel


def test_remount_after_sleep_shows_the_work_and_unplug_locks_it(flow: dict[str, Any]) -> None:
    no_fatal(flow)
    remount = flow["remount"]
    assert remount["work_ok"] and remount["late"] == "just before sleep\n", remount
    assert remount["pinentry_calls"] == 3
    locks = [e for e in flow["audit"] if e["event"] == "lock"]
    assert [e["reason"] for e in locks][:2] == ["suspend", "unplug"], locks
    assert flow["unplug_to_locked_s"] < 10
    short = flow["vault"].replace("-", "")[:8]
    assert [n[0] for n in flow["notes"][:4]] == ["Vault mounted", "Vault locked"] * 2
    assert flow["notes"][3][1].startswith(f"Vault {short} locked (the token was removed")


def test_sigterm_as_at_logout_locks_a_vault_whose_token_is_a_usb_stick(flow: dict[str, Any]) -> None:
    """The daemon of a USB-stick vault has libusb's event thread, started before the
    session's sigwait(); it must block SIGTERM too, or the kernel may hand the signal to
    it and the process dies without a lock, leaving a dead FUSE mount."""
    no_fatal(flow)
    assert flow["daemon_last"]["sigterm_unblocked_threads"] == [], flow["daemon_last"]
    sigterm = flow["sigterm"]
    assert not sigterm["mounted"], sigterm
    (entry,) = sigterm["locks"]
    assert entry["reason"] == "signal" and entry["route"] == "SIGTERM" and entry["error"] is None, entry
    locks = [e["reason"] for e in flow["audit"] if e["event"] == "lock"]
    assert locks == ["suspend", "unplug", "signal"], locks
    short = flow["vault"].replace("-", "")[:8]
    assert flow["stick_notes"][4:] == [
        ["Vault mounted", f"Vault {short} is open."],
        ["Vault locked", f"Vault {short} locked (the mount daemon was stopped)."],
    ]


def _fido2(flow: dict[str, Any]) -> dict[str, Any]:
    no_fatal(flow)
    fido2: dict[str, Any] = flow["fido2"]
    assert fido2.get("fatal") is None, (
        f"{fido2['fatal']}\n--- user manager ---\n{flow.get('user-manager.log', '')[-4000:]}"
        f"\n--- pinentry ---\n{flow.get('pinentry.log', '')}\n--- key host ---\n{flow.get('key-host.log')}"
    )
    return fido2


def test_a_fido2_vault_gets_a_rule_that_starts_its_plug_unit_for_any_security_key(
    flow: dict[str, Any],
) -> None:
    fido2 = _fido2(flow)
    hex_id = fido2["vault"].replace("-", "")
    assert (
        'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{ID_SECURITY_TOKEN}=="1", TAG+="systemd", '
        f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-plug@{hex_id}.service"'
    ) in fido2["rules"].splitlines()
    # Setting up the second vault kept the stick vault's rules.
    assert f"kryptvault-guard@{flow['vault'].replace('-', '')}.service" in fido2["rules"]


def test_plugging_the_vaults_key_asks_password_and_pin_says_touch_and_mounts_and_pulling_it_locks(
    flow: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fido2 = _fido2(flow)
    with capsys.disabled():
        keys = ("touch_note_s", "plug_to_mounted_s", "unplug_to_locked_s")
        print(f"\n[desktop fido2] { {k: fido2.get(k) for k in keys} }; steps: {flow['steps']}")
    short = fido2["vault"].replace("-", "")[:8]
    # The wrong PIN was asked again inside the one run of the unit (it has no Restart=).
    unit = fido2["plug_unit"]
    assert unit["Result"] == "success" and unit["NRestarts"] == "0", unit
    assert fido2["pinentry_calls"] == 3, fido2
    log = flow["pinentry.log"]
    first = fido2["first_call"]
    assert f"{first} SETDESC Password of vault {short}" in log and f"{first} SETPROMPT Password:" in log
    assert f"{first + 1} SETPROMPT PIN:" in log and f"{first + 2} SETPROMPT PIN:" in log
    assert f"{first + 2} SETERROR Wrong PIN for the security key" in log
    assert f"{first + 1} SETERROR" not in log
    # The notification came while the key waited for its touch, before the vault opened.
    assert not fido2["mounted_before_touch"]
    assert fido2["key"]["touches_wanted"] == 1, fido2["key"]
    assert fido2["plug_to_mounted_s"] < 90
    assert [n[0] for n in fido2["notes"]] == ["Touch your security key", "Vault mounted", "Vault locked"]
    assert fido2["notes"][2][1].startswith(f"Vault {short} locked (the token was removed"), fido2["notes"]
    (lock,) = fido2["locks"]
    assert lock["reason"] == "unplug" and lock["error"] is None, lock
    assert fido2["unplug_to_locked_s"] < 10
    # Another key was plugged all along: asked (if at all) without a touch, never for presence.
    assert fido2["foreign"]["touches_wanted"] == 0, fido2["foreign"]


def test_units_go_where_systemd_user_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    assert default_units_dir() == tmp_path / "conf" / "systemd" / "user"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_units_dir() == Path.home() / ".config" / "systemd" / "user"
