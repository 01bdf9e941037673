"""udev rules for registered tokens: user access to the stick, and a lock when it leaves.

Why a guard unit and not an ACTION=="remove" rule: systemd starts the units named in
SYSTEMD_(USER_)WANTS only when a device unit first becomes active, never on a remove
event. So the rule gives the stick's disk a stable alias
(`sys-subsystem-kryptvault-<vault>.device`) and pulls in `kryptvault-guard@<vault>`,
which `BindsTo=` that alias: when the disk goes away systemd stops the guard, and the
guard's ExecStop locks the vault. `RUN+=` is not used because udev kills what it runs
when the event is done. See udev/README.md for each line.

The instance name is the vault UUID as 32 hex digits without dashes: a "-" in a unit
instance or an alias path would be escaped to "\\x2d" by systemd, and the two spellings
would no longer match. `kryptvault lock --vault` must accept that form.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from kryptvault.errors import TokenError
from kryptvault.token.base import TokenIdentity, printable

# udev's rule syntax has no escaping we could rely on: a serial is used only if it
# cannot contain a quote, a comma, a backslash or a newline.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9._-]{1,126}")

STICK_RULES = (
    'SUBSYSTEM=="usb", ENV{{DEVTYPE}}=="usb_device", ATTR{{idVendor}}=="{vendor}", '
    'ATTR{{idProduct}}=="{product}", ATTR{{serial}}=="{serial}", TAG+="uaccess"\n'
    'SUBSYSTEM=="block", ENV{{ID_BUS}}=="usb", ENV{{ID_SERIAL_SHORT}}=="{serial}", TAG+="uaccess"\n'
)
# ENV{ID_BUS}=="usb": an ATA or NVMe disk has an ID_SERIAL_SHORT too, and a stick that
# reports the serial of an internal disk must not get the user access to that disk.
USB_VAULT_RULE = (
    'ACTION!="remove", SUBSYSTEM=="block", ENV{{DEVTYPE}}=="disk", '
    'ENV{{ID_BUS}}=="usb", ENV{{ID_SERIAL_SHORT}}=="{serial}", TAG+="systemd", '
    'ENV{{SYSTEMD_ALIAS}}+="/sys/subsystem/kryptvault/{vault}", '
    'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-guard@{vault}.service"\n'
)
# A filesystem token is removable media: on a USB bus (stick, card reader) or an SD/MMC
# card in a built-in reader (no ID_BUS there; its parent is on the mmc bus). A filesystem
# UUID is easily copied, so internal disks, loop and virtual devices are not matched.
FS_VAULT_RULE = (
    'ACTION!="remove", SUBSYSTEM=="block", ENV{{ID_BUS}}=="usb", ENV{{ID_FS_UUID}}=="{fs_uuid}", '
    'TAG+="systemd", '
    'ENV{{SYSTEMD_ALIAS}}+="/sys/subsystem/kryptvault/{vault}", '
    'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-guard@{vault}.service"\n'
    'ACTION!="remove", SUBSYSTEM=="block", SUBSYSTEMS=="mmc", ENV{{ID_FS_UUID}}=="{fs_uuid}", '
    'TAG+="systemd", '
    'ENV{{SYSTEMD_ALIAS}}+="/sys/subsystem/kryptvault/{vault}", '
    'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-guard@{vault}.service"\n'
)
# FIDO2 security keys: distros tag their hidraw nodes ID_SECURITY_TOKEN=1 (systemd's
# 60-fido-id.rules, which reads the HID report descriptor's FIDO usage page), and the
# seat user needs the node to talk CTAP. Their removal is watched by the mount daemon
# itself (hidraw remove uevent + poll), so no guard unit: only the plug unit is started.
FIDO2_RULES = (
    "\n# FIDO2 security keys (FIDO usage page, tagged by 60-fido-id.rules): access for the seat user\n"
    'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{ID_SECURITY_TOKEN}=="1", TAG+="uaccess"\n'
)
# Mount on plug for a vault with a FIDO2 keyslot. A key shows udev nothing that tells
# which vault it opens (the credential lives in the keyslot, not on the key), so any
# security key starts every such vault's plug unit, and `kryptvault plug` asks the key
# without a touch whether it holds one of the vault's credentials; if not, it ends quietly.
FIDO2_VAULT_RULE = (
    'ACTION!="remove", SUBSYSTEM=="hidraw", ENV{{ID_SECURITY_TOKEN}}=="1", TAG+="systemd", '
    'ENV{{SYSTEMD_USER_WANTS}}+="kryptvault-plug@{vault}.service"\n'
)
HEADER = (
    "# kryptvault token rules, written by `kryptvault token udev`; do not edit.\n"
    '# Numbered below 73 so that TAG+="uaccess" is seen by 73-seat-late.rules.\n'
)


def _safe(value: str | None, what: str) -> str:
    if value is None or not _SAFE_VALUE.fullmatch(value):
        shown = printable(value) if value is not None else "(none)"
        raise TokenError(
            f"cannot write a udev rule for {what} {shown!r}: only letters, digits, "
            "'.', '_' and '-' are allowed"
        )
    return value


def unit_instance(vault_uuid: uuid.UUID) -> str:
    """The systemd instance name for a vault: its UUID as 32 hex digits."""
    return vault_uuid.hex


def render_rules(
    entries: Sequence[tuple[TokenIdentity, uuid.UUID]],
    *,
    fido2: bool = False,
    fido2_vaults: Sequence[uuid.UUID] = (),
) -> str:
    """The rules file for these (token, vault) registrations; with `fido2` (or any
    `fido2_vaults`), the rule that gives the seat user FIDO2 keys; for each of
    `fido2_vaults` (vaults with a FIDO2 keyslot), the rule that starts its plug unit.

    Directory tokens have no device for udev to watch and only get a comment.
    """
    out = [HEADER, FIDO2_RULES] if fido2 or fido2_vaults else [HEADER]
    seen_sticks: set[tuple[int, int, str]] = set()
    for identity, vault_uuid in entries:
        vault = unit_instance(vault_uuid)
        if identity.kind == "usb":
            serial = _safe(identity.serial, "the USB serial")
            key = (identity.vendor_id or 0, identity.product_id or 0, serial)
            if key not in seen_sticks:
                seen_sticks.add(key)
                out.append(f"\n# {identity.describe()}\n")
                out.append(STICK_RULES.format(vendor=f"{key[0]:04x}", product=f"{key[1]:04x}", serial=serial))
            out.append(f"# vault {vault_uuid}: lock when the stick leaves\n")
            out.append(USB_VAULT_RULE.format(serial=serial, vault=vault))
        elif identity.kind == "fs":
            fs_uuid = _safe(identity.fs_uuid, "the filesystem UUID")
            out.append(f"\n# vault {vault_uuid}: lock when filesystem {fs_uuid} leaves\n")
            out.append(FS_VAULT_RULE.format(fs_uuid=fs_uuid, vault=vault))
        else:
            out.append(f"\n# vault {vault_uuid}: directory token, nothing for udev to watch\n")
    for vault_uuid in dict.fromkeys(fido2_vaults):
        out.append(f"\n# vault {vault_uuid}: mount when a FIDO2 key holding its credential is plugged\n")
        out.append(FIDO2_VAULT_RULE.format(vault=unit_instance(vault_uuid)))
    return "".join(out)
