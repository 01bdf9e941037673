"""The container being backed up: offline (flock-ed shared, nobody may write) or live
(the mount daemon holds reuse of freed units for the backup's duration).

Live protocol (docs/BACKUP.md "Live backup"): backup-hold → the daemon commits, holds
reuse and answers {"generation": G} (optionally "header_area": base64 of bytes
[0, 64 KiB) read under its store lock, which makes the copy exactly generation G) →
the header area and commit slots are copied first, then the change tables are read,
then the data ranges → backup-release. The release comes after the last read and
before the commit point (`Source.end_reads`): a successful release proves the hold lasted
the whole copy. If the daemon is gone by then (the vault was locked, e.g. its token
unplugged), nothing kept the held units from being reused, so the copy is discarded.
On any failure the release is still attempted, and its own error does not hide the first.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kryptvault.backup.fsutil import os_error, read_exact
from kryptvault.container.header import Header, decode_header, read_header, vaults_disagree
from kryptvault.container.layout import DATA_AREA_OFFSET, HEADER_COPY_SIZE, HEADER_OFFSETS, Layout
from kryptvault.container.store import ObjectStore
from kryptvault.errors import FormatError, KryptvaultError, UsageError
from kryptvault.session.control import ControlClient, daemon_socket_for


@dataclass(frozen=True)
class HoldInfo:
    generation: int
    header_area: bytes | None = None  # [0, DATA_AREA_OFFSET) captured atomically with the hold


class LiveHold(Protocol):
    def hold(self) -> HoldInfo: ...

    def release(self) -> None: ...


class StoreHold:
    """A backup hold on an ObjectStore open in this process. `lock` (e.g. the store's own
    lock) makes hold + header capture atomic against commits; without it a commit that
    lands in between makes the copy a later (still consistent) generation."""

    def __init__(
        self,
        store: ObjectStore,
        fd: int,
        *,
        commit: Callable[[], int] | None = None,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self._store = store
        self._fd = fd
        self._commit = commit
        self._lock = lock
        self.held = 0

    def hold(self) -> HoldInfo:
        if self._commit is not None:
            self._commit()
        with self._lock if self._lock is not None else contextlib.nullcontext():
            generation = self._store.hold_reuse()
            area = read_exact(self._fd, DATA_AREA_OFFSET, 0)
        self.held += 1
        return HoldInfo(generation, area)

    def release(self) -> None:
        self.held -= 1
        self._store.release_reuse()


HOLD_LOST = "the vault was locked during the backup; nothing was kept"


class ControlHold:
    """A backup hold requested from the mount daemon over its control socket."""

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    def for_container(cls, vault_uuid: uuid.UUID, container: Path) -> ControlHold | None:
        """The mount daemon serving this container file, if its control socket is there;
        else None. Never another copy's daemon (same UUID): its hold and generation would
        describe another file than the one read."""
        path = daemon_socket_for(vault_uuid, container)
        if path is None or not path.exists():
            return None
        return cls(ControlClient(path))

    def _request(self, op: str) -> dict[str, Any]:
        try:
            reply = self._client.request(op)
        except KryptvaultError:
            raise
        except (OSError, ValueError) as exc:
            raise KryptvaultError(f"the mount daemon did not answer {op!r}: {exc}")
        if not isinstance(reply, dict):
            raise KryptvaultError(f"the mount daemon sent a malformed answer to {op!r}")
        return reply

    def hold(self) -> HoldInfo:
        reply = self._request("backup-hold")
        generation = reply.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise KryptvaultError("the mount daemon's backup-hold answer has no generation")
        area: bytes | None = None
        raw = reply.get("header_area")
        if isinstance(raw, str):
            try:
                area = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                area = None
            if area is not None and len(area) != DATA_AREA_OFFSET:
                area = None
        return HoldInfo(generation, area)

    def release(self) -> None:
        try:
            self._request("backup-release")
        except KryptvaultError as exc:
            # The daemon that held reuse for us is gone (locked) or is another one.
            raise KryptvaultError(f"{HOLD_LOST} ({exc})") from exc


def header_from_area(area: bytes) -> Header:
    """The newer valid header copy in a captured [0, 64 KiB) area."""
    found: list[Header] = []
    reasons: list[str] = []
    for offset in HEADER_OFFSETS:
        try:
            found.append(decode_header(area[offset : offset + HEADER_COPY_SIZE]))
        except FormatError as exc:
            reasons.append(str(exc))
    if not found:
        raise FormatError("both header copies are damaged: " + "; ".join(reasons))
    disagreement = vaults_disagree([(i, h) for i, h in enumerate(found)]) if len(found) == 2 else None
    if disagreement is not None:
        raise FormatError(disagreement)  # the set is chosen by UUID: never by a forged one
    return max(found, key=lambda h: h.sequence)


class Source:
    """Reads of the source container, counted; [0, 64 KiB) always comes from the area
    captured first (for a live backup: right after the hold)."""

    def __init__(
        self,
        path: Path,
        fd: int,
        header: Header,
        area: bytes,
        live_generation: int | None,
        hold: LiveHold | None = None,
    ) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.layout = Layout(block_size=header.layout.block_size)
        self.header_area = area
        self.live_generation = live_generation
        # The size after the header area was captured: every commit that area can name
        # fits in it (the file never shrinks).
        self.size = os.fstat(fd).st_size
        self.bytes_read = len(area)
        self._hold = hold
        self.reads_ended = False

    def end_reads(self) -> None:
        """The copy is complete: end the live hold now, before anything is committed. A
        hold that cannot be released did not last the whole copy: raises KryptvaultError."""
        self.reads_ended = True
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.release()

    @property
    def live(self) -> bool:
        return self.live_generation is not None

    @property
    def vault_uuid(self) -> uuid.UUID:
        return self.header.vault_uuid

    def read(self, length: int, offset: int) -> bytes:
        if self.reads_ended:
            raise KryptvaultError("internal error: the container was read after the backup hold ended")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        if offset < DATA_AREA_OFFSET:
            head = self.header_area[offset : min(end, DATA_AREA_OFFSET)]
            if end <= DATA_AREA_OFFSET:
                return head
            return head + self.read(end - DATA_AREA_OFFSET, DATA_AREA_OFFSET)
        data = read_exact(self.fd, end - offset, offset)
        self.bytes_read += len(data)
        if len(data) != end - offset:
            raise KryptvaultError(f"{self.path} became shorter while it was being backed up")
        return data

    def count(self, nbytes: int) -> None:
        """Account for reads done on our behalf (changed_chunks_since)."""
        self.bytes_read += nbytes


@contextlib.contextmanager
def open_source(path: Path, live_hold: LiveHold | None = None,
                find_daemon: Callable[[uuid.UUID], LiveHold | None] | None = None,
                ) -> Iterator[Source]:
    """Open CONTAINER for a backup. With `live_hold` (or when the container is mounted and
    its daemon answers on the control socket) the backup is live; otherwise the container
    is locked shared for the whole backup, which fails while a mount daemon holds it."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a container")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error("open", path, exc)
    try:
        hold = live_hold
        if hold is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                vault = read_header(fd).header.vault_uuid
                hold = (find_daemon(vault) if find_daemon is not None
                        else ControlHold.for_container(vault, path))
                if hold is None:
                    raise KryptvaultError(
                        f"{path} is mounted and its mount daemon offers no live backup; "
                        "unmount it (or lock the vault) and run the backup again")
        if hold is None:
            header = read_header(fd).header
            area = read_exact(fd, DATA_AREA_OFFSET, 0)
            if len(area) < DATA_AREA_OFFSET:
                raise FormatError(f"{path} is truncated (shorter than its header and commit area)")
            yield Source(path, fd, header, area, None)
            return
        info = hold.hold()
        try:
            area = info.header_area if info.header_area is not None else read_exact(fd, DATA_AREA_OFFSET, 0)
            if len(area) < DATA_AREA_OFFSET:
                raise FormatError(f"{path} is truncated (shorter than its header and commit area)")
            src = Source(path, fd, header_from_area(area), area, info.generation, hold)
        except BaseException:
            with contextlib.suppress(Exception):
                hold.release()
            raise
        try:
            yield src
        except BaseException:
            if not src.reads_ended:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    src.end_reads()
            raise
        src.end_reads()  # a no-op unless the caller never ended its reads
    finally:
        os.close(fd)
