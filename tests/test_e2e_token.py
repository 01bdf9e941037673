"""Issue "The USB token", end to end: real (emulated) sticks in one QEMU guest.

Two sticks, TOKEN-1234 and BACKUP-5678 (vendor 46f4, product 0001, vfat superfloppies),
both plugged at boot. The tests run in file order and share the guest; each states which
sticks it expects plugged and mounted, and puts them back as it found them.

- discovery: `token list --json` (ids, serial, mountpoint; a mount hint when not mounted);
- `init --token auto` registers the one stick (share file on it); `mount` without --token
  finds it by the keyslot's identity; data survives lock + remount;
- the share file copied to the other stick does not open the vault (serial binding);
- a backup token: `token add`, open with either alone, `token remove`, recovery key;
- udev: `token udev` installs rules and units; with the host's systemd-udevd running in
  the guest, the stick's disk gets TAGS uaccess and the lock properties.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import (
    KDF,
    PASSWORD_FILE,
    KvGuest,
    booted_guest,
    host_udevadm,
    host_udevd,
)
from usbrig.rig import STICK_PRODUCT_ID, STICK_VENDOR_ID, Stick, make_vfat_image

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

TOKEN, BACKUP = "TOKEN-1234", "BACKUP-5678"
TOKEN_FS, BACKUP_FS = "1111-AAAA", "2222-BBBB"
TOK_MNT, BAK_MNT = "/mnt/tok", "/mnt/bak"
VAULTS = "/tmp/vaults"
WRONG_TOKEN = "kryptvault: wrong password or wrong token (no keyslot opened)"
RECOVERY_KEY = re.compile(r"\b[0-9A-Za-z]{4}(?:-[0-9A-Za-z]{4}){7}\b")

# What the tests hand on to the later ones (module-scoped, like the guest).
state: dict[str, Any] = {}


@pytest.fixture(scope="module")
def kv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvGuest]:
    workdir = tmp_path_factory.mktemp("e2e-token")
    make_vfat_image(workdir / "token.img", volume_id=TOKEN_FS, label="TOKEN")
    make_vfat_image(workdir / "backup.img", volume_id=BACKUP_FS, label="BACKUP")
    sticks = [
        Stick("token", TOKEN, workdir / "token.img", port=1),
        Stick("backup", BACKUP, workdir / "backup.img", port=2),
    ]
    with booted_guest(workdir, sticks) as guest:
        guest.sh(f"mkdir -p {VAULTS} {TOK_MNT} {BAK_MNT} /mnt/a /mnt/b").check()
        yield guest


def share_file(mnt: str, vault: str) -> str:
    return f"{mnt}/.kryptvault/{vault}.kvshare"


def exists(kv: KvGuest, path: str) -> bool:
    return kv.sh(f"test -f {shlex.quote(path)}").rc == 0


def init(kv: KvGuest, container: str, token: str) -> str:
    out = kv.cli("init", container, "--token", token, "--password-file", PASSWORD_FILE, *KDF).check().out
    vault: str = kv.cli("info", container, "--json").json()["uuid"]
    assert vault in out
    return vault


def mount(kv: KvGuest, container: str, mnt: str, *extra: str) -> Any:
    return kv.cli("mount", container, mnt, *extra)


def lock(kv: KvGuest, mnt: str) -> None:
    kv.cli("lock", mnt).check()
    assert not kv.is_mounted(mnt)


def assert_one_line_failure(res: Any, text: str) -> None:
    """Exit 1 and one `kryptvault: ...` line (after a failure the next attempt first says
    "waiting N s after recent failed attempts…": progress, not part of the error)."""
    assert res.rc == 1, res
    lines = [line for line in res.error_lines if not line.startswith("waiting ")]
    assert len(lines) == 1 and lines[0].startswith("kryptvault: ") and text in lines[0], res


def test_token_list_shows_ids_serial_mountpoint_and_a_mount_hint(kv: KvGuest) -> None:
    dev = kv.mount_stick("token", TOK_MNT)  # BACKUP-5678 stays plugged but not mounted
    sticks = {s["serial"]: s for s in kv.cli("token", "list", "--json").json()}
    assert set(sticks) == {TOKEN, BACKUP}
    for stick in sticks.values():
        assert (stick["vendor_id"], stick["product_id"]) == (
            f"{STICK_VENDOR_ID:04x}",
            f"{STICK_PRODUCT_ID:04x}",
        )
        assert len(stick["block_devices"]) == 1, stick
    token = sticks[TOKEN]["block_devices"][0]
    assert token == {
        "device": dev,
        "fs_uuid": TOKEN_FS,
        "fs_type": "vfat",
        "mountpoints": [TOK_MNT],
        "mount_hint": None,
    }
    assert sticks[TOKEN]["vaults"] == []
    backup = sticks[BACKUP]["block_devices"][0]
    assert backup["mountpoints"] == [] and backup["fs_uuid"] == BACKUP_FS
    assert backup["mount_hint"] and "mount" in backup["mount_hint"], backup
    assert backup["device"] in backup["mount_hint"], backup
    # The human-readable form says the same.
    text = kv.cli("token", "list").check().out
    assert f"serial {TOKEN}" in text and f"{TOK_MNT}" in text
    assert f"not mounted; mount it with: {backup['mount_hint']}" in text


def test_init_auto_picks_the_only_mounted_stick(kv: KvGuest) -> None:
    # TOKEN-1234 mounted, BACKUP-5678 plugged but not mounted (as left by the test above).
    container = f"{VAULTS}/auto2.kv"
    res = kv.cli("init", container, "--token", "auto", "--password-file", PASSWORD_FILE, *KDF)
    assert res.rc == 0, res
    vault = kv.cli("info", container, "--json").json()["uuid"]
    assert exists(kv, share_file(TOK_MNT, vault))
    kv.sh(f"rm -f {share_file(TOK_MNT, vault)}").check()


def test_init_auto_registers_the_stick_and_data_survives_lock_and_remount(kv: KvGuest) -> None:
    kv.unplug("backup")  # `auto` is "the only plugged stick"
    try:
        container = f"{VAULTS}/a.kv"
        vault = init(kv, container, "auto")
        state["a"] = (container, vault)
        share = share_file(TOK_MNT, vault)
        assert kv.sh(f"stat -c %s {share}").check().out.strip() == "128"
        slots = kv.cli("slot", "list", container, "--json").json()
        assert [s["token"] for s in slots] == [f"USB 46f4:0001 serial {TOKEN} (fs {TOKEN_FS})"]
        listed = {s["serial"]: s for s in kv.cli("token", "list", "--json").json()}
        assert listed[TOKEN]["vaults"] == [vault]

        # No --token: the keyslot's identity finds the stick.
        mount(kv, container, "/mnt/a", "--password-file", PASSWORD_FILE).check()
        payload = "kept across a lock\n" * 200
        kv.sh(f"printf %s {shlex.quote(payload)} > /mnt/a/note.txt && mkdir /mnt/a/dir && sync").check()
        status = kv.cli("status", "--json").json()
        assert [(s["vault"], s["mountpoint"]) for s in status] == [(vault, "/mnt/a")]
        assert TOKEN in status[0]["token"]
        lock(kv, "/mnt/a")
        mount(kv, container, "/mnt/a", "--password-file", PASSWORD_FILE).check()
        assert kv.sh("cat /mnt/a/note.txt").check().out == payload
        assert kv.sh("test -d /mnt/a/dir").rc == 0
        lock(kv, "/mnt/a")
    finally:
        kv.plug("backup")


def test_share_copied_to_a_stick_with_another_serial_does_not_open(kv: KvGuest) -> None:
    container, vault = state["a"]
    kv.mount_stick("backup", BAK_MNT)
    kv.sh(
        f"mkdir -p {BAK_MNT}/.kryptvault && cp {share_file(TOK_MNT, vault)} {BAK_MNT}/.kryptvault/ && sync"
    ).check()
    kv.unplug("token", TOK_MNT)
    try:
        wrong = mount(kv, container, "/mnt/a", "--token", BACKUP, "--password-file", PASSWORD_FILE)
        assert_one_line_failure(wrong, WRONG_TOKEN)
        assert wrong.err == WRONG_TOKEN + "\n"  # the first failure: no back-off line either
        assert not kv.is_mounted("/mnt/a")
        # Without --token the keyslot asks for TOKEN-1234, which is not plugged in.
        missing = mount(kv, container, "/mnt/a", "--password-file", PASSWORD_FILE)
        assert_one_line_failure(missing, "token is not plugged in")
        log = kv.cli("log", "--json", "--vault", vault).check().out.splitlines()
        assert any(json.loads(line)["event"] == "unlock_failed" for line in log)
    finally:
        kv.sh(f"rm -f {share_file(BAK_MNT, vault)}").check()
        kv.plug("token", TOK_MNT)


def test_backup_token_opens_alone_and_either_stick_works(kv: KvGuest) -> None:
    # Both sticks plugged and mounted.
    container = f"{VAULTS}/b.kv"
    vault = init(kv, container, TOKEN)
    state["b"] = (container, vault)
    added = kv.cli(
        "token", "add", container, "--token", BACKUP, "--with-token", TOKEN, "--password-file", PASSWORD_FILE
    ).check()
    assert f"serial {BACKUP}" in added.out
    assert exists(kv, share_file(BAK_MNT, vault)) and exists(kv, share_file(TOK_MNT, vault))
    tokens = [s["token"] for s in kv.cli("slot", "list", container, "--json").json()]
    assert tokens == [
        f"USB 46f4:0001 serial {TOKEN} (fs {TOKEN_FS})",
        f"USB 46f4:0001 serial {BACKUP} (fs {BACKUP_FS})",
    ]

    kv.unplug("backup", BAK_MNT)
    mount(kv, container, "/mnt/b", "--password-file", PASSWORD_FILE).check()  # TOKEN-1234 alone
    kv.sh("echo written-with-the-primary > /mnt/b/f.txt").check()
    assert TOKEN in kv.cli("status", "--json").json()[0]["token"]
    lock(kv, "/mnt/b")
    kv.plug("backup", BAK_MNT)
    kv.unplug("token", TOK_MNT)
    try:
        mount(kv, container, "/mnt/b", "--password-file", PASSWORD_FILE).check()  # BACKUP-5678 alone
        assert BACKUP in kv.cli("status", "--json").json()[0]["token"]
        assert kv.sh("cat /mnt/b/f.txt").check().out == "written-with-the-primary\n"
        lock(kv, "/mnt/b")
    finally:
        kv.plug("token", TOK_MNT)


def test_removed_token_no_longer_opens_and_recovery_key_opens_without_sticks(kv: KvGuest) -> None:
    container, vault = state["b"]
    # Both plugged and mounted; prove access with the token that stays.
    removed = kv.cli(
        "token", "remove", container, TOKEN, "--token", BACKUP, "--password-file", PASSWORD_FILE
    ).check()
    assert "slot 0" in removed.out
    tokens = [s["token"] for s in kv.cli("slot", "list", container, "--json").json()]
    assert tokens == [f"USB 46f4:0001 serial {BACKUP} (fs {BACKUP_FS})"]
    state["share_left_on_removed_stick"] = exists(kv, share_file(TOK_MNT, vault))

    kv.unplug("backup", BAK_MNT)
    try:
        for extra in ((), ("--token", TOKEN)):
            res = mount(kv, container, "/mnt/b", *extra, "--password-file", PASSWORD_FILE)
            assert_one_line_failure(res, "")
            assert not kv.is_mounted("/mnt/b")
            state.setdefault("removed_token_errors", []).append(res.error_lines[-1])
    finally:
        kv.plug("backup", BAK_MNT)

    added = kv.cli("recovery-key", "add", container, "--password-file", PASSWORD_FILE).check()
    found = RECOVERY_KEY.search(added.out)
    assert found, added.out
    kv.sh(f"printf '%s\\n' {found.group(0)} > /tmp/recovery.txt").check()
    kv.unplug("token", TOK_MNT)
    kv.unplug("backup", BAK_MNT)
    try:
        assert kv.cli("token", "list", "--json").json() == []
        mount(kv, container, "/mnt/b", "--recovery-key-file", "/tmp/recovery.txt").check()
        assert kv.sh("cat /mnt/b/f.txt").check().out == "written-with-the-primary\n"
        assert "recovery" in kv.cli("status", "--json").json()[0]["token"]
        lock(kv, "/mnt/b")
    finally:
        kv.plug("token", TOK_MNT)
        kv.plug("backup", BAK_MNT)


def test_token_remove_deletes_the_share_file_of_a_plugged_removed_stick(kv: KvGuest) -> None:
    # `token remove --help`: "delete its keyslot (and its share file, if that stick is plugged)".
    assert "share_left_on_removed_stick" in state, "the test above did not get as far as `token remove`"
    assert state["share_left_on_removed_stick"] is False


def test_token_udev_installs_rules_and_user_units(kv: KvGuest) -> None:
    a, b = state["a"][0], state["b"][0]
    # The guest's / is a writable overlay; without udev on the host there is no /etc/udev.
    kv.sh("mkdir -p /etc/udev/rules.d").check()
    kv.cli("token", "udev", a, b, "--rules-dir", "/etc/udev/rules.d", "--units-dir", "/tmp/units").check()
    rules = kv.sh("cat /etc/udev/rules.d/70-kryptvault.rules").check().out
    vault_a, vault_b = state["a"][1].replace("-", ""), state["b"][1].replace("-", "")
    for serial, vault in ((TOKEN, vault_a), (BACKUP, vault_b)):
        assert f'ATTR{{serial}}=="{serial}", TAG+="uaccess"' in rules
        assert f'ENV{{ID_SERIAL_SHORT}}=="{serial}", TAG+="uaccess"' in rules
        assert f'ENV{{SYSTEMD_ALIAS}}+="/sys/subsystem/kryptvault/{vault}"' in rules
        assert f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-guard@{vault}.service"' in rules
    units = kv.sh("cat /tmp/units/kryptvault-guard@.service /tmp/units/kryptvault-lock@.service").check().out
    assert "BindsTo=sys-subsystem-kryptvault-%i.device" in units
    assert f"ExecStart={kv.rig.repo_root}/.venv/bin/kryptvault " in units
    state["rules"] = rules


def udev_in_guest(kv: KvGuest) -> tuple[str, str] | None:
    """(systemd-udevd, udevadm) as the guest can run them, or None.

    The guest runs the host's binaries, so this needs Debian's `udev` package on the host;
    or KRYPTVAULT_E2E_UDEV_ROOT=<a directory with `dpkg-deb -x udev_*.deb` unpacked>, whose
    files are copied into the guest's (writable, throw-away) root instead."""
    root = os.environ.get("KRYPTVAULT_E2E_UDEV_ROOT")
    if root:
        r = shlex.quote(root)
        kv.sh(
            f"mkdir -p /etc/udev && cp -a {r}/lib/udev /lib/ && cp -a {r}/bin/udevadm /bin/udevadm && "
            f"cp -a {r}/lib/systemd/systemd-udevd /lib/systemd/ && cp -an {r}/etc/udev/. /etc/udev/"
        ).check()
        return "/lib/systemd/systemd-udevd", "/bin/udevadm"
    udevd, udevadm = host_udevd(), host_udevadm()
    return None if udevd is None or udevadm is None else (udevd, udevadm)


def test_udevd_tags_the_token_uaccess_with_the_lock_properties(kv: KvGuest) -> None:
    assert "rules" in state, "test_token_udev_installs_rules_and_user_units must run first"
    tools = udev_in_guest(kv)
    if tools is None:
        pytest.skip(
            "systemd-udevd/udevadm are not installed on the host (Debian package `udev`), so the guest, "
            "which runs the host's binaries, has no udevd; the rules file itself was checked above "
            "(or set KRYPTVAULT_E2E_UDEV_ROOT to an unpacked udev .deb)"
        )
    udevd, udevadm = tools
    vault_a = state["a"][1].replace("-", "")
    dev = kv.rig.stick_device("token")
    assert dev is not None
    started = kv.sh(
        f"mkdir -p /run/udev && ({udevd} --daemon || {udevadm} --debug daemon --daemon) && "
        f"{udevadm} control --reload && "
        f"{udevadm} trigger --subsystem-match=usb --subsystem-match=block --action=add && "
        f"{udevadm} settle --timeout=60",
        timeout=180,
    )
    info = kv.sh(f"{udevadm} info --query=all --name={dev}")
    verified = "a running systemd-udevd (trigger + settle, then udevadm info)"
    if started.rc != 0 or "uaccess" not in info.out:
        # The daemon route failed: evaluate the rules for the device without it.
        info = kv.sh(f"{udevadm} test --action=add $({udevadm} info --query=path --name={dev}) 2>&1")
        verified = f"udevadm test (the daemon route failed: {started.err.strip()[-300:]})"
    print(f"\n[udev] {dev} checked with {verified}")
    tags = [line for line in info.out.splitlines() if "TAGS=" in line]
    assert any("uaccess" in line for line in tags), info.out
    assert f"SYSTEMD_ALIAS=/sys/subsystem/kryptvault/{vault_a}" in info.out, info.out
    assert f"SYSTEMD_USER_WANTS=kryptvault-guard@{vault_a}.service" in info.out, info.out
    if verified.startswith("a running"):
        # The stick itself (its /dev/bus/usb node) is matched by vendor, product and serial.
        usb = kv.sh(
            f"d=$(readlink -f /sys/block/{dev.removeprefix('/dev/')}/device); "
            'while [ ! -f "$d/idVendor" ]; do d=$(dirname "$d"); done; '
            f'{udevadm} info --query=all --path="${{d#/sys}}"'
        ).check()
        assert f"ID_SERIAL_SHORT={TOKEN}" in usb.out, usb.out
        assert any("uaccess" in line for line in usb.out.splitlines() if "TAGS=" in line), usb.out
