"""Token discovery: the USB stick (or filesystem, or directory) that holds a vault's share.

This layer imports only `kryptvault.errors`, `kryptvault.crypto`, the standard library,
psutil, pyusb and python-fido2 (FIDO2 security keys: fido2key.py, fido2token.py).
"""

from kryptvault.token.base import Token, TokenIdentity
from kryptvault.token.dirtoken import DirectoryToken
from kryptvault.token.discover import UsbStick, discover_usb_sticks
from kryptvault.token.fstoken import FsUuidToken
from kryptvault.token.registrations import list_registrations
from kryptvault.token.resolve import resolve_token
from kryptvault.token.share import (
    Share,
    create_share_dir,
    decode_share,
    encode_share,
    read_share_file,
    write_share_file,
)
from kryptvault.token.sysfs import BlockDevice
from kryptvault.token.udev import render_rules
from kryptvault.token.usbtoken import UsbToken

__all__ = [
    "BlockDevice",
    "DirectoryToken",
    "FsUuidToken",
    "Share",
    "Token",
    "TokenIdentity",
    "UsbStick",
    "UsbToken",
    "create_share_dir",
    "decode_share",
    "discover_usb_sticks",
    "encode_share",
    "list_registrations",
    "read_share_file",
    "render_rules",
    "resolve_token",
    "write_share_file",
]
