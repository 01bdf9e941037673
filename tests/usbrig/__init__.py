"""QEMU end-to-end rig: a throw-away guest kernel with hot-pluggable emulated USB sticks."""

from .rig import (
    STICK_PRODUCT_ID,
    STICK_VENDOR_ID,
    UEVENT_STAMP,
    CompletedRun,
    GuestCommandError,
    GuestProcess,
    RigError,
    Stick,
    UsbRig,
    make_vfat_image,
)

__all__ = [
    "STICK_PRODUCT_ID",
    "STICK_VENDOR_ID",
    "UEVENT_STAMP",
    "CompletedRun",
    "GuestCommandError",
    "GuestProcess",
    "RigError",
    "Stick",
    "UsbRig",
    "make_vfat_image",
]
