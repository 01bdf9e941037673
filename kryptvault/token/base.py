"""The token interface: who a token is (`TokenIdentity`) and what it can do (`Token`).

The identity is public: its `encode()` form is stored in the vault's keyslot so that the
right stick can be found again among several. Its `binding()` bytes are mixed into the
keyslot's key-encryption key, so a share file copied to a stick with another serial (or to
another filesystem) does not open the vault.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from kryptvault.errors import TokenError
from kryptvault.token.share import (
    Share,
    promote_pending_share,
    read_pending_share_file,
    read_share_file,
    share_path,
    write_share_file,
)

# "fido2" names a plugged security key while a vault is open (its keyslot records a
# token/fido2key.Fido2Identity instead, so it has no encode()).
KINDS = ("dir", "usb", "fs", "fido2")
MAX_ENCODED_IDENTITY = 200

# Characters that are kept literally in an encoded serial; everything else is %XX-escaped
# so that a serial containing ":" cannot shift the fields of the encoding.
_SAFE = re.compile(rb"[A-Za-z0-9._-]")
_FS_UUID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX4 = re.compile(r"[0-9a-f]{4}")


def _escape(text: str) -> str:
    out = []
    for byte in text.encode("utf-8"):
        ch = bytes([byte])
        out.append(ch.decode("ascii") if _SAFE.fullmatch(ch) else f"%{byte:02X}")
    return "".join(out)


def _unescape(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1 : i + 3], 16))  # ValueError on junk: caught by decode
            i += 3
        else:
            raw.extend(text[i].encode("ascii"))
            i += 1
    return raw.decode("utf-8")


def printable(text: str) -> str:
    """`text` with control and other non-printable characters escaped, for one-line messages.

    Serials and labels come from the device, which may be hostile: a newline in a serial
    must not split an error message or a log line.
    """
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


@dataclass(frozen=True)
class TokenIdentity:
    """Which token this is, in the terms the keyslot records (no secrets here)."""

    kind: str  # "dir" | "usb" | "fs" | "fido2"
    vendor_id: int | None = None
    product_id: int | None = None
    serial: str | None = None
    fs_uuid: str | None = None
    path: str | None = None  # dir kind only; local to this machine, never encoded

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TokenError(f"unknown token kind {printable(self.kind)!r}")
        if self.kind == "usb":
            if not self.serial:
                raise TokenError("a USB token needs a serial number")
            for name, value in (("vendor", self.vendor_id), ("product", self.product_id)):
                if value is None or not 0 <= value <= 0xFFFF:
                    raise TokenError(f"a USB token needs a 16-bit {name} id")
        if self.kind == "fs" and not self.fs_uuid:
            raise TokenError("a filesystem token needs a filesystem UUID")
        if self.fs_uuid is not None and not _FS_UUID.fullmatch(self.fs_uuid):
            raise TokenError(f"not a filesystem UUID: {printable(self.fs_uuid)!r}")

    def describe(self) -> str:
        """One line for humans, e.g. 'USB 46f4:0001 serial TOKEN-1234 (fs 1234-ABCD)'."""
        if self.kind == "usb":
            text = f"USB {self.vendor_id:04x}:{self.product_id:04x} serial {self.serial}"
            if self.fs_uuid:
                text += f" (fs {self.fs_uuid})"
            return printable(text)
        if self.kind == "fs":
            return printable(f"filesystem UUID {self.fs_uuid}")
        if self.kind == "fido2":
            return printable(f"FIDO2 security key at {self.path}")
        return printable(f"directory {self.path}") if self.path else "a token directory"

    def encode(self) -> bytes:
        """The canonical public form recorded in a keyslot; `decode` is its inverse."""
        if self.kind == "usb":
            text = f"usb:{self.vendor_id:04x}:{self.product_id:04x}:{_escape(self.serial or '')}"
            if self.fs_uuid:
                text += f":{self.fs_uuid}"
        elif self.kind == "fs":
            text = f"fs:{self.fs_uuid}"
        elif self.kind == "fido2":
            raise TokenError("a FIDO2 key's keyslot records its credential, not this identity")
        else:
            text = "dir"
        data = text.encode("ascii")
        if len(data) > MAX_ENCODED_IDENTITY:
            raise TokenError(
                f"the token identity is too long to record ({len(data)} bytes, "
                f"at most {MAX_ENCODED_IDENTITY})"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> TokenIdentity:
        """Parse an `encode()` form; anything not in canonical form is a TokenError."""
        bad = TokenError("the token identity recorded in the keyslot is not valid")
        if len(data) > MAX_ENCODED_IDENTITY:
            raise bad
        try:
            text = data.decode("ascii")
            fields = text.split(":")
            identity: TokenIdentity
            if fields == ["dir"]:
                identity = cls("dir")
            elif fields[0] == "fs" and len(fields) == 2:
                identity = cls("fs", fs_uuid=fields[1])
            elif fields[0] == "usb" and len(fields) in (4, 5):
                if not (_HEX4.fullmatch(fields[1]) and _HEX4.fullmatch(fields[2])):
                    raise bad
                identity = cls(
                    "usb",
                    vendor_id=int(fields[1], 16),
                    product_id=int(fields[2], 16),
                    serial=_unescape(fields[3]),
                    fs_uuid=fields[4] if len(fields) == 5 else None,
                )
            else:
                raise bad
        except (UnicodeError, ValueError, TokenError):
            raise bad
        # Only the canonical spelling is accepted, so that equal identities have equal bytes.
        if identity.encode() != data:
            raise bad
        return identity

    def binding(self) -> bytes:
        """The bytes the keyslot's key-encryption key is bound to."""
        if self.kind == "usb":
            return b"usb-serial:" + (self.serial or "").encode("utf-8")
        if self.kind == "fs":
            return b"fs-uuid:" + (self.fs_uuid or "").encode("ascii")
        return b""

    def matches(self, other: TokenIdentity) -> bool:
        """Whether `other` (found on this machine) is the token this identity records.

        The filesystem UUID of a USB token is a hint only (the stick may be reformatted);
        what counts is what `binding()` binds.
        """
        if self.kind != other.kind:
            return False
        if self.kind == "usb":
            return (self.vendor_id, self.product_id, self.serial) == (
                other.vendor_id,
                other.product_id,
                other.serial,
            )
        if self.kind == "fs":
            return (self.fs_uuid or "").casefold() == (other.fs_uuid or "").casefold()
        return True


class Token(ABC):
    """A place holding share files, and the means to tell whether it is still there."""

    identity: TokenIdentity
    share_dir: Path

    @abstractmethod
    def is_present(self) -> bool:
        """Cheap check (well under 5 ms, fine to poll): the device and its mount are still there."""

    def _prepare_share_dir(self) -> None:
        """Make sure share_dir exists before a write; kinds that may create it override this."""
        if not self.share_dir.is_dir():
            raise TokenError(f"token directory {self.share_dir} does not exist")

    def _require_present(self) -> None:
        if not self.is_present():
            raise TokenError(f"the token is not present: {self.identity.describe()}")

    def read_share(self, vault_uuid: uuid.UUID) -> Share:
        self._require_present()
        return read_share_file(self.share_dir, vault_uuid)

    def write_share(self, share: Share) -> None:
        """Write (or replace) the share file atomically."""
        self._require_present()
        self._prepare_share_dir()
        write_share_file(self.share_dir, share)

    def read_pending_share(self, vault_uuid: uuid.UUID) -> Share | None:
        """The new share an unfinished rekey left (None when there is none)."""
        self._require_present()
        return read_pending_share_file(self.share_dir, vault_uuid)

    def write_pending_share(self, share: Share) -> None:
        self._require_present()
        self._prepare_share_dir()
        write_share_file(self.share_dir, share, pending=True)

    def promote_pending_share(self, share: Share) -> None:
        """The pending share opens the container now: make it the share file."""
        self._require_present()
        promote_pending_share(self.share_dir, share)

    def has_share(self, vault_uuid: uuid.UUID) -> bool:
        try:
            return share_path(self.share_dir, vault_uuid).is_file()
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.identity.describe()} at {self.share_dir}>"
