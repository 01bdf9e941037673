"""Turn what the user typed after --token (or what a keyslot recorded) into a Token.

A spec is a directory path (it contains "/" or starts with "." or "~"), `fs:UUID`,
`auto` (or nothing: the one plugged stick), or a USB serial number.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kryptvault.errors import TokenError
from kryptvault.token.base import Token, TokenIdentity, printable
from kryptvault.token.dirtoken import DirectoryToken
from kryptvault.token.discover import UsbStick, discover_usb_sticks
from kryptvault.token.fido2token import Fido2Token
from kryptvault.token.fstoken import FsUuidToken
from kryptvault.token.mounts import mount_table, mounts_of_device
from kryptvault.token.share import SHARE_DIR_NAME, share_path
from kryptvault.token.sysfs import BlockDevice
from kryptvault.token.usbtoken import UsbToken


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.startswith((".", "~"))


def _stick_list(sticks: list[UsbStick]) -> str:
    return "; ".join(s.describe() for s in sticks)


def mount_hint(block: BlockDevice) -> str:
    """The command that mounts a stick's filesystem for the current user."""
    dev = block.dev
    if shutil.which("udisksctl"):
        return f"udisksctl mount -b {dev}"
    sudo = "" if os.geteuid() == 0 else "sudo "
    # vfat/exfat have no owners: without uid= the files would belong to root.
    opts = " -o uid=$(id -u),gid=$(id -g)" if block.fs_type in ("vfat", "exfat", "ntfs") else ""
    return f"{sudo}mkdir -p /mnt/token && {sudo}mount{opts} {dev} /mnt/token"


def _holds_share(block: BlockDevice, vault_uuid: uuid.UUID | None) -> bool:
    if vault_uuid is None:
        return False
    for mountpoint in block.mountpoints:
        try:
            if share_path(Path(mountpoint) / SHARE_DIR_NAME, vault_uuid).is_file():
                return True
        except OSError:
            continue
    return False


def _usb_token(
    stick: UsbStick, *, fs_uuid_hint: str | None = None, vault_uuid: uuid.UUID | None = None
) -> UsbToken:
    what = stick.describe()
    if stick.sysfs_path is None:
        raise TokenError(f"{what} could not be matched to its entry in /sys")
    if not stick.block_devices:
        raise TokenError(
            f"{what} has no disk (yet): wait a moment, or check that the usb-storage driver is loaded"
        )

    def hint_match(block: BlockDevice) -> bool:
        return bool(fs_uuid_hint and (block.fs_uuid or "").casefold() == fs_uuid_hint.casefold())

    mounted = [b for b in stick.block_devices if b.mountpoints]
    if not mounted:
        target = min(stick.block_devices, key=lambda b: (not hint_match(b), b.fs_uuid is None))
        raise TokenError(f"{what} is plugged in but not mounted: mount it with `{mount_hint(target)}`")
    # The filesystem that already serves this vault, then the one the keyslot names.
    block = min(mounted, key=lambda b: (not _holds_share(b, vault_uuid), not hint_match(b)))
    mounts = mounts_of_device(block.dev, mount_table())
    if not mounts:
        raise TokenError(f"{what} was unmounted while kryptvault was looking at it")
    mount = sorted(mounts, key=lambda m: m.read_only)[0]
    return UsbToken(stick, block, mount)


def _stick_identity_matches(identity: TokenIdentity, stick: UsbStick) -> bool:
    return (identity.vendor_id, identity.product_id, identity.serial) == (
        stick.vendor_id,
        stick.product_id,
        stick.serial,
    )


def _prefer_share_holders(sticks: list[UsbStick], vault_uuid: uuid.UUID | None) -> list[UsbStick]:
    holders = [s for s in sticks if any(_holds_share(b, vault_uuid) for b in s.block_devices)]
    return holders if len(holders) == 1 else sticks


def resolve_token(
    spec: str | None,
    *,
    vault_uuid: uuid.UUID | None = None,
    identity: TokenIdentity | None = None,
    backend: Any = None,
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
) -> Token:
    """The token named by `spec`; with `identity` (from a keyslot) and no spec, that token.

    `vault_uuid`, when known, settles a choice among several candidates in favour of the
    one that holds this vault's share. `backend`, `sysfs_root` and `dev_root` exist for
    tests (a pyusb backend double and a fake /sys and /dev tree).
    """
    spec = spec.strip() if spec is not None else None

    def sticks() -> list[UsbStick]:
        return discover_usb_sticks(backend=backend, sysfs_root=sysfs_root, dev_root=dev_root)

    if not spec or spec == "auto":
        if identity is not None:
            return _from_identity(identity, vault_uuid, sticks, sysfs_root, dev_root)
        found = _prefer_share_holders(sticks(), vault_uuid)
        if not found:
            raise TokenError("no USB stick is plugged in")
        mounted = [s for s in found if any(b.mountpoints for b in s.block_devices)]
        if len(found) > 1 and len(mounted) == 1:
            found = mounted  # an unmounted stick cannot hold a share: no real choice
        if len(found) > 1:
            raise TokenError(
                f"several sticks are plugged: choose one with --token SERIAL ({_stick_list(found)})"
            )
        return _usb_token(found[0], vault_uuid=vault_uuid)
    if spec.startswith("fido2:/"):
        # Only the mount daemon resolves a key this way (the unlock found it by its credential).
        return Fido2Token(spec[len("fido2:") :], sysfs_root=sysfs_root)
    if spec.startswith("fs:"):
        return FsUuidToken(spec[3:], sysfs_root=sysfs_root, dev_root=dev_root)
    if _looks_like_path(spec):
        return DirectoryToken(spec, sysfs_root=sysfs_root)
    plugged = sticks()
    matching = [s for s in plugged if s.serial == spec]
    if not matching:
        message = f"no plugged USB stick has serial {printable(spec)}"
        message += f" (plugged: {_stick_list(plugged)})" if plugged else " (none is plugged in)"
        if os.path.isdir(spec):
            message += f"; to use the directory, write --token ./{printable(spec)}"
        raise TokenError(message)
    if len(matching) > 1:
        raise TokenError(f"several plugged sticks report serial {printable(spec)}: unplug all but one")
    hint = identity.fs_uuid if identity is not None else None
    return _usb_token(matching[0], fs_uuid_hint=hint, vault_uuid=vault_uuid)


def _from_identity(
    identity: TokenIdentity,
    vault_uuid: uuid.UUID | None,
    sticks: Callable[[], list[UsbStick]],
    sysfs_root: str,
    dev_root: str,
) -> Token:
    if identity.kind == "dir":
        raise TokenError("this vault's token is a directory: give it with --token PATH")
    if identity.kind == "fs":
        return FsUuidToken(identity.fs_uuid or "", sysfs_root=sysfs_root, dev_root=dev_root)
    plugged = sticks()
    matching = [s for s in plugged if _stick_identity_matches(identity, s)]
    if not matching:
        others = f" (plugged: {_stick_list(plugged)})" if plugged else ""
        raise TokenError(f"the vault's token is not plugged in: {identity.describe()}{others}")
    matching = _prefer_share_holders(matching, vault_uuid)
    if len(matching) > 1:
        raise TokenError(
            f"several plugged sticks look like the vault's token ({identity.describe()}): unplug all but one"
        )
    return _usb_token(matching[0], fs_uuid_hint=identity.fs_uuid, vault_uuid=vault_uuid)
