"""The share file: the token's half of a vault key, 128 bytes, one file per vault.

Layout (big-endian), documented byte for byte in docs/TOKEN.md:

    0   8  magic b"KVSHARE1"          32 32  token secret
    8   2  version = 1                64  8  highest commit generation seen (u64)
    10  2  flags = 0                  72 24  reserved, zero
    12  4  reserved = 0               96 32  SHA-256 of bytes [0, 96)
    16 16  vault UUID

The secret only ever lives in bytearrays that are wiped after use; it never appears in a
repr, a log line or an exception message.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.durable import fsync_dir, replace_file
from kryptvault.errors import TokenError

MAGIC = b"KVSHARE1"
VERSION = 1
SHARE_SIZE = 128
SECRET_SIZE = 32
SUFFIX = ".kvshare"
# A rekey's new share waits under this suffix until the new container is in place (see
# kryptvault/cli/rekey_commands.py): at every moment one of the two opens the vault.
PENDING_SUFFIX = ".next"
SHARE_DIR_NAME = ".kryptvault"
_BODY = 96  # bytes covered by the checksum
_HEADER = struct.Struct(">8sHHI16s")  # magic, version, flags, reserved, uuid
_GENERATION = struct.Struct(">Q")
_MAX_GENERATION = 2**64 - 1
_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.kvshare")

_CORRUPT = "the share file on this token is corrupted or truncated"


@dataclass(eq=False)
class Share:
    """One vault's share on one token. Call `wipe()` once the secret has been used."""

    vault_uuid: uuid.UUID
    secret: bytearray = field(repr=False)
    generation: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytearray) or len(self.secret) != SECRET_SIZE:
            raise TokenError(f"a token secret is a bytearray of {SECRET_SIZE} bytes")
        if not 0 <= self.generation <= _MAX_GENERATION:
            raise TokenError("the commit generation does not fit in 64 bits")

    @classmethod
    def generate(cls, vault_uuid: uuid.UUID, generation: int = 0) -> Share:
        """A share with a fresh random secret."""
        secret = bytearray(SECRET_SIZE)
        # readinto fills our bytearray directly; os.urandom/secrets would first make an
        # immutable bytes copy of the secret that can never be wiped. Same kernel source.
        with open("/dev/urandom", "rb", buffering=0) as rng:
            if rng.readinto(secret) != SECRET_SIZE:
                raise TokenError("could not read random bytes for the token secret")
        return cls(vault_uuid, secret, generation)

    def wipe(self) -> None:
        self.secret[:] = bytes(len(self.secret))


def encode_share(share: Share) -> bytearray:
    """The 128-byte file content; a bytearray so the caller can wipe it."""
    out = bytearray(SHARE_SIZE)
    _HEADER.pack_into(out, 0, MAGIC, VERSION, 0, 0, share.vault_uuid.bytes)
    out[32:64] = share.secret
    _GENERATION.pack_into(out, 64, share.generation)
    out[_BODY:] = hashlib.sha256(memoryview(out)[:_BODY]).digest()
    return out


def decode_share(data: bytes | bytearray | memoryview, expected_uuid: uuid.UUID) -> Share:
    """Parse and check a share file; every defect is a TokenError with a one-line message."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size or bytes(view[:8]) != MAGIC:
        raise TokenError(_CORRUPT)
    _magic, version, flags, reserved, raw_uuid = _HEADER.unpack_from(view, 0)
    # Version before length and checksum: a newer format may differ in both.
    if version != VERSION:
        raise TokenError(
            f"the share file on this token has format version {version}, which this "
            f"kryptvault does not know (it reads version {VERSION}): upgrade kryptvault"
        )
    if len(view) != SHARE_SIZE:
        raise TokenError(_CORRUPT)
    digest = hashlib.sha256(view[:_BODY]).digest()
    if not hmac.compare_digest(digest, bytes(view[_BODY:])):
        raise TokenError(_CORRUPT)
    if flags != 0 or reserved != 0 or any(view[72:_BODY]):
        raise TokenError("the share file on this token uses reserved fields: it is corrupted")
    if raw_uuid != expected_uuid.bytes:
        raise TokenError("the share file on this token belongs to another vault")
    secret = bytearray(view[32:64])
    (generation,) = _GENERATION.unpack_from(view, 64)
    return Share(expected_uuid, secret, generation)


def share_path(share_dir: Path, vault_uuid: uuid.UUID, *, pending: bool = False) -> Path:
    return share_dir / f"{vault_uuid}{SUFFIX}{PENDING_SUFFIX if pending else ''}"


def list_share_uuids(share_dir: Path) -> list[uuid.UUID]:
    """The vaults that `share_dir` holds share files for, from the file names alone."""
    try:
        entries = list(os.scandir(share_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenError(f"cannot list the token directory {share_dir}: {exc.strerror}")
    found = []
    for entry in entries:
        # Temp files, stray copies ("x (1).kvshare") and upper-case names are junk.
        if _NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            found.append(uuid.UUID(entry.name[: -len(SUFFIX)]))
    return sorted(found)


def _os_error_message(exc: OSError, share_dir: Path, doing: str) -> str:
    code = exc.errno
    if code == errno.EROFS:
        return "token filesystem is read-only"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "token is full"
    if code == errno.ENOENT:
        return f"token directory {share_dir} does not exist"
    if code == errno.ENOTDIR:
        return f"token directory {share_dir} is not a directory"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to {doing} in the token directory {share_dir}"
    if code in (errno.EIO, errno.ENODEV, errno.ENXIO):
        return f"input/output error on the token while trying to {doing} (was it unplugged?)"
    return f"could not {doing} on the token: {exc.strerror or exc}"


def write_share_file(share_dir: Path, share: Share, *, pending: bool = False) -> None:
    """Atomically create or replace the share file (`durable.replace_file`): whatever
    fails, the final name holds either the old complete file or the new one, and no temp
    file is left behind. `pending`: the rekey's waiting share instead.
    """
    data = encode_share(share)
    try:
        replace_file(share_path(share_dir, share.vault_uuid, pending=pending), data)
    except OSError as exc:
        raise TokenError(_os_error_message(exc, share_dir, "write the share file"))
    finally:
        data[:] = bytes(len(data))


def read_share_file(share_dir: Path, vault_uuid: uuid.UUID, *, pending: bool = False) -> Share:
    path = share_path(share_dir, vault_uuid, pending=pending)
    # One byte more than a share file holds, so that an overlong file is seen as such.
    buf = bytearray(SHARE_SIZE + 1)
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not share_dir.is_dir():
                raise TokenError(f"token directory {share_dir} does not exist")
            raise TokenError(f"this token holds no share for vault {vault_uuid}")
        try:
            got = 0
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                while got < len(buf):
                    n = f.readinto(memoryview(buf)[got:])
                    if not n:
                        break
                    got += n
        finally:
            os.close(fd)
        return decode_share(memoryview(buf)[:got], vault_uuid)
    except OSError as exc:
        raise TokenError(_os_error_message(exc, share_dir, "read the share file"))
    finally:
        buf[:] = bytes(len(buf))


def create_share_dir(mount_root: Path) -> Path:
    """`<mount_root>/.kryptvault`, created with mode 0700 when missing."""
    share_dir = mount_root / SHARE_DIR_NAME
    try:
        os.mkdir(share_dir, 0o700)
        # The new directory's entry must reach the stick before a share file is put in it.
        fsync_dir(mount_root)
    except FileExistsError:
        if not share_dir.is_dir() or share_dir.is_symlink():
            raise TokenError(f"{share_dir} exists on the token but is not a directory")
    except OSError as exc:
        raise TokenError(_os_error_message(exc, mount_root, "create the share directory"))
    return share_dir


def read_pending_share_file(share_dir: Path, vault_uuid: uuid.UUID) -> Share | None:
    """The share a rekey left waiting, or None (none there, or not readable: then only the
    main share can open the vault, as without a rekey)."""
    try:
        return read_share_file(share_dir, vault_uuid, pending=True)
    except TokenError:
        return None


def promote_pending_share(share_dir: Path, share: Share) -> None:
    """Make `share` (the pending one, which opens the vault) the main share file, then
    drop the pending file. A crash in between leaves both names holding it."""
    write_share_file(share_dir, share)
    discard_pending_share(share_dir, share.vault_uuid)


def discard_pending_share(share_dir: Path, vault_uuid: uuid.UUID) -> None:
    try:
        share_path(share_dir, vault_uuid, pending=True).unlink(missing_ok=True)
        fsync_dir(share_dir)
    except OSError as exc:
        raise TokenError(_os_error_message(exc, share_dir, "remove the pending share file"))
