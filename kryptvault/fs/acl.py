"""POSIX ACLs in Linux's xattr format (`system.posix_acl_access` / `_default`).

The value is a u32 version (2) followed by 8-byte entries `u16 tag, u16 perm, u32 id`,
little-endian (include/uapi/linux/posix_acl_xattr.h). The rules mirror the kernel's
fs/posix_acl.c: which lists are valid (`posix_acl_valid`), which access ACL says no more
than the mode and is therefore not kept (`posix_acl_equiv_mode`), how chmod rewrites an
ACL (`__posix_acl_chmod`) and how a directory's default ACL shapes a new entry
(`posix_acl_create_masq`). Filesystem keeps the mode and the ACL in step with these.
"""

from __future__ import annotations

import errno
import struct

from kryptvault.fs.errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ = 0x01
USER = 0x02
GROUP_OBJ = 0x04
GROUP = 0x08
MASK = 0x10
OTHER = 0x20
UNDEFINED_ID = 0xFFFFFFFF
_RWX = 0o7

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entry = tuple[int, int, int]  # (tag, perm, id)


def parse(value: bytes) -> list[Entry]:
    """The entries of a valid ACL value ([] for a bare header, which means "no ACL");
    FsError(EINVAL) for anything malformed, EOPNOTSUPP for another version."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "malformed POSIX ACL")
    if _HEADER.unpack_from(value)[0] != VERSION:
        # As the kernel answers: a format it does not know, rather than a broken one.
        raise FsError(errno.EOPNOTSUPP, "unsupported POSIX ACL version")
    entries = [
        (tag, perm, id_ if tag in (USER, GROUP) else UNDEFINED_ID)
        for tag, perm, id_ in _ENTRY.iter_unpack(value[_HEADER.size :])
    ]
    if entries:
        _validate(entries)
    return entries


def _validate(entries: list[Entry]) -> None:
    # The kernel's order: USER_OBJ, USER*, GROUP_OBJ, GROUP*, [MASK], OTHER, with a mask
    # required once a named entry exists; named ids must be real and unique.
    bad = FsError(errno.EINVAL, "invalid POSIX ACL")
    state = USER_OBJ
    needs_mask = False
    seen: set[tuple[int, int]] = set()
    for tag, perm, id_ in entries:
        if perm & ~_RWX:
            raise bad
        if tag == USER_OBJ and state == USER_OBJ:
            state = USER
        elif tag == USER and state == USER:
            needs_mask = True
        elif tag == GROUP_OBJ and state == USER:
            state = GROUP
        elif tag == GROUP and state == GROUP:
            needs_mask = True
        elif tag == MASK and state == GROUP:
            state = OTHER
        elif tag == OTHER and (state == OTHER or (state == GROUP and not needs_mask)):
            state = 0
        else:
            raise bad
        if tag in (USER, GROUP):
            if id_ == UNDEFINED_ID or (tag, id_) in seen:
                raise bad
            seen.add((tag, id_))
    if state != 0:
        raise bad


def dump(entries: list[Entry]) -> bytes:
    """The canonical value: named entries sorted by id, ids of the others undefined."""
    order = {USER_OBJ: 0, USER: 1, GROUP_OBJ: 2, GROUP: 3, MASK: 4, OTHER: 5}
    out = bytearray(_HEADER.pack(VERSION))
    for tag, perm, id_ in sorted(entries, key=lambda e: (order[e[0]], e[2])):
        out += _ENTRY.pack(tag, perm, id_ if tag in (USER, GROUP) else UNDEFINED_ID)
    return bytes(out)


def mode_of(entries: list[Entry]) -> tuple[int, bool]:
    """(the permission bits the ACL implies, whether the ACL says nothing more)."""
    mode = 0
    mask: int | None = None
    equivalent = True
    for tag, perm, _ in entries:
        if tag == USER_OBJ:
            mode |= perm << 6
        elif tag == GROUP_OBJ:
            mode |= perm << 3
        elif tag == OTHER:
            mode |= perm
        elif tag == MASK:
            mask = perm
            equivalent = False
        else:
            equivalent = False
    if mask is not None:
        mode = (mode & ~0o070) | (mask << 3)
    return mode, equivalent


def chmod(entries: list[Entry], mode: int) -> list[Entry]:
    """The ACL after chmod(mode): owner and other from the mode; the mask (or, without
    one, the owning group) from the group bits; named entries unchanged."""
    has_mask = any(tag == MASK for tag, _, _ in entries)
    out: list[Entry] = []
    for tag, perm, id_ in entries:
        if tag == USER_OBJ:
            perm = (mode >> 6) & _RWX
        elif tag == OTHER:
            perm = mode & _RWX
        elif tag == MASK or (tag == GROUP_OBJ and not has_mask):
            perm = (mode >> 3) & _RWX
        out.append((tag, perm, id_))
    return out


def create(default: list[Entry], mode: int) -> tuple[list[Entry], int, bool]:
    """A new entry's access ACL from its directory's default ACL and the mode the
    creator asked for (no umask: the default ACL replaces it); returns
    (ACL, resulting mode incl. non-permission bits, whether the ACL is equivalent)."""
    perms = mode & 0o777
    equivalent = True
    out: list[Entry] = []
    for tag, perm, id_ in default:
        if tag == USER_OBJ:
            perm &= perms >> 6
            perms &= (perm << 6) | ~0o700
        elif tag == OTHER:
            perm &= perms & _RWX
            perms &= perm | ~0o007
        elif tag in (USER, GROUP, MASK):
            equivalent = False
        out.append((tag, perm, id_))
    has_mask = any(tag == MASK for tag, _, _ in out)
    group_tag = MASK if has_mask else GROUP_OBJ
    for i, (tag, perm, id_) in enumerate(out):
        if tag == group_tag:
            perm &= (perms >> 3) & _RWX
            perms &= (perm << 3) | ~0o070
            out[i] = (tag, perm, id_)
    return out, (mode & ~0o777) | perms, equivalent
