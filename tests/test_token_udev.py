"""udev rules for registered tokens: rendering, the shipped template, hostile serials."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from kryptvault.errors import TokenError
from kryptvault.token import TokenIdentity, render_rules

ROOT = Path(__file__).resolve().parent.parent
STICK = TokenIdentity("usb", vendor_id=0x46F4, product_id=1, serial="TOKEN-1234")
VAULT_A = uuid.UUID("11111111-2222-3333-4444-555555555555")
VAULT_B = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")


def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_stick_gets_access_rules_once_and_a_guard_per_vault() -> None:
    lines = rule_lines(render_rules([(STICK, VAULT_A), (STICK, VAULT_B)]))
    assert lines[0] == (
        'SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ATTR{idVendor}=="46f4", '
        'ATTR{idProduct}=="0001", ATTR{serial}=="TOKEN-1234", TAG+="uaccess"'
    )
    assert lines[1] == (
        'SUBSYSTEM=="block", ENV{ID_BUS}=="usb", ENV{ID_SERIAL_SHORT}=="TOKEN-1234", TAG+="uaccess"'
    )
    guards = lines[2:]
    assert len(guards) == 2
    for line, vault in zip(guards, (VAULT_A, VAULT_B), strict=True):
        assert 'ENV{ID_BUS}=="usb", ENV{ID_SERIAL_SHORT}=="TOKEN-1234"' in line
        assert f'ENV{{SYSTEMD_ALIAS}}+="/sys/subsystem/kryptvault/{vault.hex}"' in line
        assert f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-guard@{vault.hex}.service"' in line
        # Wants= are acted on only when a device appears, so the guard is pulled in on
        # add/change, never on remove; and nothing runs from udev itself.
        assert line.startswith('ACTION!="remove", ')
        assert "RUN" not in line


def test_rendered_rules_are_the_shipped_template_filled_in() -> None:
    template = (ROOT / "udev" / "70-kryptvault.rules.in").read_text()
    fs = TokenIdentity("fs", fs_uuid="1234-ABCD")
    expected = (
        template.replace("@VENDOR@", "46f4")
        .replace("@PRODUCT@", "0001")
        .replace("@SERIAL@", "TOKEN-1234")
        .replace("@FS_UUID@", "1234-ABCD")
        .replace("@VAULT@", VAULT_A.hex)
    )
    assert rule_lines(render_rules([(STICK, VAULT_A), (fs, VAULT_A)], fido2_vaults=[VAULT_A])) == rule_lines(
        expected
    )


def test_the_guard_unit_binds_to_the_alias_the_rule_creates() -> None:
    guard = (ROOT / "udev" / "kryptvault-guard@.service").read_text()
    assert "BindsTo=sys-subsystem-kryptvault-%i.device" in guard
    assert "kryptvault-lock@%i.service" in guard
    lock = (ROOT / "udev" / "kryptvault-lock@.service").read_text()
    assert "ExecStart=kryptvault lock --vault %i --reason unplug" in lock


@pytest.mark.parametrize(
    "serial",
    ['X", RUN+="/bin/sh -c evil', "A B", "A\nB", "A,B", "A\\B", "Ä", "{x}", "a" * 200],
)
def test_a_serial_that_could_inject_rule_syntax_is_refused(serial: str) -> None:
    hostile = TokenIdentity("usb", vendor_id=1, product_id=2, serial=serial)
    with pytest.raises(TokenError, match="only letters, digits") as err:
        render_rules([(hostile, VAULT_A)])
    assert "\n" not in str(err.value)


def test_directory_tokens_get_only_a_comment() -> None:
    text = render_rules([(TokenIdentity("dir", path="/x"), VAULT_A)])
    assert rule_lines(text) == []
    assert str(VAULT_A) in text


def test_every_rendered_value_is_from_the_safe_alphabet() -> None:
    text = render_rules([(STICK, VAULT_A)])
    for value in re.findall(r'=="([^"]*)"', text):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", value)


def test_block_rules_match_only_removable_buses_never_any_disk_with_that_serial_or_uuid() -> None:
    """An internal ATA/NVMe disk has an ID_SERIAL_SHORT and any disk can carry a copied
    filesystem UUID: every block rule names the bus (usb, or mmc for a built-in SD reader)."""
    fs = TokenIdentity("fs", fs_uuid="1234-ABCD")
    lines = rule_lines(render_rules([(STICK, VAULT_A), (fs, VAULT_B)]))
    block = [line for line in lines if 'SUBSYSTEM=="block"' in line]
    assert len(block) == 4  # stick uaccess, stick guard, fs guard on usb, fs guard on mmc
    for line in block:
        assert 'ENV{ID_BUS}=="usb"' in line or 'SUBSYSTEMS=="mmc"' in line, line
    fs_lines = [line for line in block if "1234-ABCD" in line]
    assert [('ENV{ID_BUS}=="usb"' in x, 'SUBSYSTEMS=="mmc"' in x) for x in fs_lines] == [
        (True, False),
        (False, True),
    ]


def test_a_fido2_vault_gets_access_for_keys_and_a_rule_that_starts_its_plug_unit() -> None:
    """A key has no per-vault identity udev could match: every security key starts the plug
    unit of every vault with a FIDO2 keyslot (`plug` then asks the keys without a touch).
    No alias and no guard: the mount daemon watches the key's removal itself."""
    lines = rule_lines(render_rules([(STICK, VAULT_A)], fido2_vaults=[VAULT_B, VAULT_B]))
    hidraw = [line for line in lines if 'SUBSYSTEM=="hidraw"' in line]
    assert hidraw == [
        'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{ID_SECURITY_TOKEN}=="1", TAG+="uaccess"',
        'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{ID_SECURITY_TOKEN}=="1", TAG+="systemd", '
        f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-plug@{VAULT_B.hex}.service"',
    ]
    assert f"kryptvault-plug@{VAULT_A.hex}" not in "".join(lines)  # the stick's guard starts A's


def test_rewriting_the_rules_for_one_vault_keeps_another_vaults_fido2_plug_rule() -> None:
    from kryptvault.cli.token_commands import with_other_vaults_kept

    installed = render_rules([], fido2_vaults=[VAULT_A])
    text, kept = with_other_vaults_kept(render_rules([(STICK, VAULT_B)]), installed, {VAULT_B})
    assert kept == [str(VAULT_A)]
    plug_a = f'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-plug@{VAULT_A.hex}.service"'
    assert [line for line in rule_lines(text) if plug_a in line] != []
    assert 'ENV{ID_SECURITY_TOKEN}=="1", TAG+="uaccess"' in text
    # Stable: rewriting B's rules again over this file gives this file.
    assert with_other_vaults_kept(render_rules([(STICK, VAULT_B)]), text, {VAULT_B})[0] == text
