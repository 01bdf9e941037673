"""File-system helpers for backup sets: exact reads and writes, directory fsync, copies
that share or skip blocks, clean error messages, and the test-only kill hook.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from kryptvault.durable import fsync_dir as durable_fsync_dir
from kryptvault.errors import KryptvaultError, UsageError

TEST_DIE_ENV = "KRYPTVAULT_TEST_BACKUP_DIE_AFTER"
TEST_DIE_EXIT = 75
FICLONE = 0x40049409  # _IOW(0x94, 9, int): share all extents of another file (btrfs, XFS, ...)
COPY_PIECE = 8 << 20


class StepHook:
    """Counts every change made to a backup destination (write, truncate, fsync, rename,
    unlink, mkdir). Test hook: with KRYPTVAULT_TEST_BACKUP_DIE_AFTER=N set, the process
    calls os._exit(75) right after its N-th step, as if killed there."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.count = 0

    @classmethod
    def from_env(cls) -> StepHook:
        raw = os.environ.get(TEST_DIE_ENV)
        return cls(int(raw) if raw else None)

    def tick(self) -> None:
        self.count += 1
        if self.limit is not None and self.count >= self.limit:
            os._exit(TEST_DIE_EXIT)


_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "not a directory",
    errno.EIO: "input/output error",
}


def os_error(action: str, path: Path | str, exc: OSError) -> KryptvaultError:
    """One line for the user: what we tried, where, and why it failed."""
    reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    kind = UsageError if exc.errno in (errno.ENOENT, errno.ENOTDIR) else KryptvaultError
    return kind(f"cannot {action} {path}: {reason}")


def read_exact(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`, shorter only at end of file."""
    if length <= 0:
        return b""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset`; returns the bytes read (short only at end of file)."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int, hook: StepHook) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    hook.tick()


def write_sparse(fd: int, buf: bytearray, offset: int, hook: StepHook) -> int:
    """Write buf at offset, skipping all-zero 64 KiB pieces (they stay holes)."""
    step = 64 * 1024
    view = memoryview(buf)
    zero = bytes(step)
    written = 0
    start = -1
    for pos in range(0, len(buf), step):
        piece = view[pos : pos + step]
        if piece == zero[: len(piece)]:
            if start >= 0:
                write_all(fd, view[start:pos], offset + start, hook)
                written += pos - start
                start = -1
        elif start < 0:
            start = pos
    if start >= 0:
        write_all(fd, view[start:], offset + start, hook)
        written += len(buf) - start
    return written


def fsync(fd: int, hook: StepHook) -> None:
    os.fsync(fd)
    hook.tick()


def fsync_dir(path: Path, hook: StepHook | None = None) -> None:
    durable_fsync_dir(path)
    if hook is not None:
        hook.tick()


def rename(src: Path, dst: Path, hook: StepHook) -> None:
    os.replace(src, dst)
    hook.tick()


def unlink(path: Path, hook: StepHook) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        hook.tick()


def create_exclusive(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) runs in [start, end) that may hold data (holes skipped), or the
    whole range where the filesystem cannot tell."""
    out: list[tuple[int, int]] = []
    pos = start
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data))
            pos = hole
    except OSError:
        return [(start, end - start)] if end > start else []
    return out


def try_clone(src_fd: int, dst_fd: int) -> bool:
    """Make dst share every block of src (reflink). False if the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS,
                         errno.EBADF, errno.EPERM):
            return False
        raise
    return True


def copy_file(src_fd: int, dst_fd: int, size: int, hook: StepHook) -> str:
    """Copy `size` bytes: reflink if possible, else copy_file_range over the data extents
    (holes stay holes), else read/write. Returns how ("clone", "copy_file_range", "read")."""
    if try_clone(src_fd, dst_fd):
        hook.tick()
        return "clone"
    os.ftruncate(dst_fd, size)
    hook.tick()
    how = "copy_file_range"
    for offset, length in data_extents(src_fd, 0, size):
        done = 0
        while done < length:
            n = 0
            if how == "copy_file_range":
                try:
                    n = os.copy_file_range(src_fd, dst_fd, min(length - done, COPY_PIECE),
                                           offset + done, offset + done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    how = "read"
                    continue
            else:
                data = read_exact(src_fd, min(length - done, COPY_PIECE), offset + done)
                if data:
                    write_all(dst_fd, data, offset + done, hook)
                n = len(data)
            if n == 0:
                break
            done += n
            hook.tick()
    return how


@contextlib.contextmanager
def locked_dir(path: Path, exclusive: bool, what: str) -> Iterator[int]:
    """flock on a directory: one backup at a time per set; readers share."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error("open", path, exc)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KryptvaultError(what)
        yield fd
    finally:
        os.close(fd)
