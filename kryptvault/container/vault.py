"""Container files as a whole: create atomically, read and rewrite the header, unlock.

Creation goes to a temporary file that is renamed into place only once complete and
fsync-ed, so a failed `init` never leaves a partly written container.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from kryptvault.container.header import (
    SLOT_COUNT,
    ZERO_REGIONS,
    Header,
    HeaderRead,
    Keyslot,
    read_header,
)
from kryptvault.container.keyslots import authenticate_header, sign_header, subkey
from kryptvault.container.layout import DATA_AREA_OFFSET, HEADER_COPY_SIZE, HEADER_OFFSETS, Layout
from kryptvault.crypto.secret import Secret
from kryptvault.durable import fsync_dir
from kryptvault.errors import KryptvaultError, UsageError


@dataclass
class StoreKeys:
    data: Secret
    meta: Secret

    def wipe(self) -> None:
        self.data.wipe()
        self.meta.wipe()


def store_keys(master: Secret, vault_uuid: uuid.UUID) -> StoreKeys:
    return StoreKeys(subkey(master, b"data", vault_uuid), subkey(master, b"meta", vault_uuid))


def _describe_os_error(action: str, path: Path, exc: OSError) -> KryptvaultError:
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.ENOENT: "no such file or directory",
        errno.EISDIR: "it is a directory",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    # A path that does not exist or is a directory is the user's input being wrong.
    kind = UsageError if exc.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR) else KryptvaultError
    return kind(f"cannot {action} {path}: {reason}")


def open_container_fd(path: Path, writable: bool) -> int:
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a container")
    try:
        return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise _describe_os_error("open", path, exc)


def read_container_header(path: Path, *, allow_disagreement: bool = False) -> HeaderRead:
    fd = open_container_fd(path, writable=False)
    try:
        return read_header(fd, allow_disagreement=allow_disagreement)
    finally:
        os.close(fd)


def write_header_copies(fd: int, header: Header, master: Secret) -> Header:
    """Rewrite both copies so the old content is gone from the container itself.

    The stale copy is written first and fsync-ed; only then the other one. A crash in
    between leaves one new and one old copy, and readers take the newer.
    """
    current = header
    for _ in range(2):
        current = sign_header(replace(current, sequence=current.sequence + 1), master)
        os.pwrite(fd, current.encode(), HEADER_OFFSETS[current.sequence % 2])
        os.fsync(fd)
    return current


def zero_reserved_regions(fd: int, read: HeaderRead) -> list[str]:
    """Zero the regions `read` found not zero (nothing uses them: FORMAT.md says zero)."""
    done = []
    for start, end, what in ZERO_REGIONS:
        if what in read.nonzero:
            os.pwrite(fd, bytes(end - start), start)
            done.append(what)
    if done:
        os.fsync(fd)
    return done


@contextlib.contextmanager
def header_lock(fd: int) -> Iterator[None]:
    """Serialise header rewrites (passwd, slot changes) between processes."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 2 * HEADER_COPY_SIZE, 0)
    except OSError:
        raise KryptvaultError("another kryptvault command is changing this container's header")
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 2 * HEADER_COPY_SIZE, 0)


def create_container(
    path: Path,
    first_slot: Callable[[uuid.UUID, Secret], Keyslot],
    initialise_store: Callable[[int, Header, StoreKeys], None],
    *,
    layout: Layout | None = None,
    force: bool = False,
    vault_uuid: uuid.UUID | None = None,
) -> Header:
    """Create a container with one keyslot and an initialised store, atomically.

    `first_slot(uuid, master)` builds slot 0; `initialise_store(fd, header, keys)` writes
    the empty filesystem (the layers above own that).
    """
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to overwrite it)")
    if path.is_dir():
        raise UsageError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"the directory {parent} does not exist")
    vault_uuid = vault_uuid or uuid.uuid4()
    tmp = parent / f".{path.name}.kv-tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _describe_os_error("create", tmp, exc)
    try:
        with Secret.random(32) as master:
            slot = first_slot(vault_uuid, master)
            slots: tuple[Keyslot | None, ...] = (slot,) + (None,) * (SLOT_COUNT - 1)
            header = Header(vault_uuid, 0, int(time.time()), layout or Layout(), slots)
            os.ftruncate(fd, DATA_AREA_OFFSET)
            # Both copies start with the same content (sequences 0 and 1).
            header = sign_header(header, master)
            os.pwrite(fd, header.encode(), HEADER_OFFSETS[0])
            header = sign_header(replace(header, sequence=1), master)
            os.pwrite(fd, header.encode(), HEADER_OFFSETS[1])
            keys = store_keys(master, vault_uuid)
            try:
                initialise_store(fd, header, keys)
            finally:
                keys.wipe()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        fsync_dir(parent)
        return header
    except OSError as exc:
        raise _describe_os_error("write", path, exc)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def verify_unlocked_header(read: HeaderRead, master: Secret) -> None:
    authenticate_header(read.header, master)


def replace_slot(header: Header, index: int, slot: Keyslot | None) -> Header:
    if not 0 <= index < SLOT_COUNT:
        raise UsageError(f"slot {index} does not exist (slots are 0..{SLOT_COUNT - 1})")
    slots = list(header.slots)
    slots[index] = slot
    return header.with_slots(tuple(slots))


def free_slot_index(header: Header) -> int:
    for index, slot in enumerate(header.slots):
        if slot is None:
            return index
    raise KryptvaultError(f"all {SLOT_COUNT} keyslots are in use; remove one first")

