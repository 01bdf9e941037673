"""Buffers for key material that can be wiped, and the process hardening that goes with them.

Python's `bytes` are immutable and cannot be wiped, so every secret we control lives in an
anonymous mmap page that is locked in RAM (best effort), excluded from core dumps, and
zeroed when the `Secret` is closed. Libraries that hand back `bytes` (HKDF, AESGCM key
copies) are the documented limit: see docs/SECURITY.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import logging
import mmap
import os
import resource
import sys
from types import TracebackType
from typing import Self

_PR_SET_DUMPABLE = 4

_libc: ctypes.CDLL | None
try:
    # dlopen(NULL): the process's own symbols, libc's among them. ctypes.util.find_library
    # would run `ldconfig -p` in a subprocess at every start of every kryptvault process.
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - every Linux has a libc; keep hardening best effort
    _libc = None


def harden_process() -> None:
    """Make this process non-dumpable and disable core files before it holds keys.

    Non-dumpable also stops other processes of the same user from ptrace-attaching or
    reading /proc/PID/mem, which is what protects keys from a casual same-user reader.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc is not None:
        _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


_warned_unlocked = False


def _warn_unlocked(err: int) -> None:
    """Say once per process that key pages may be swapped: the keys still work, but the
    promise in docs/SECURITY.md does not hold on this machine."""
    global _warned_unlocked
    if _warned_unlocked:
        return
    _warned_unlocked = True
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    logging.getLogger("kryptvault.secret").warning(
        "cannot lock key pages in RAM (%s; RLIMIT_MEMLOCK is %s): keys may reach swap",
        os.strerror(err),
        limit,
    )


def is_dumpable() -> bool:
    if _libc is None:  # pragma: no cover
        return True
    return bool(_libc.prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


def constant_time_equal(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    # hmac.compare_digest accepts any bytes-like object without copying it.
    return hmac.compare_digest(memoryview(a), memoryview(b))


def scrub_bytes(value: bytes) -> None:
    """Best-effort zeroing of a `bytes` object a library returned to us (CPython only).

    Only for fresh, private objects (a derived key we hold the only reference to): short
    or shared bytes objects may be interned, so they are left alone.
    """
    if len(value) < 16 or sys.implementation.name != "cpython":
        return
    header = sys.getsizeof(b"") - 1  # offset of ob_sval inside PyBytesObject
    ctypes.memset(id(value) + header, 0, len(value))


class Secret:
    """A fixed-size secret in a locked, non-dumpable page, zeroed on close.

    Use as a context manager; `view()` hands out a memoryview for libraries that take
    any bytes-like object. The secret's value never appears in repr() or str().
    """

    __slots__ = ("_closed", "_locked", "_map", "_size")

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("secret size must be positive")
        self._size = size
        self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._closed = False
        self._locked = False
        if hasattr(mmap, "MADV_DONTDUMP"):
            self._map.madvise(mmap.MADV_DONTDUMP)
        self._lock_in_ram()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Secret:
        secret = cls(len(data))
        secret._map[: len(data)] = data
        return secret

    @classmethod
    def random(cls, size: int) -> Secret:
        """Fresh random bytes straight into the locked page (os.urandom would leave a
        `bytes` copy behind that cannot be wiped; same kernel source)."""
        secret = cls(size)
        with open("/dev/urandom", "rb", buffering=0) as rng, secret.view() as view:
            if rng.readinto(view) != size:
                raise OSError("short read from /dev/urandom")
        return secret

    def _lock_in_ram(self) -> None:
        if _libc is None:  # pragma: no cover
            return
        anchor = ctypes.c_char.from_buffer(self._map)
        try:
            ok = _libc.mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(self._map))) == 0
        finally:
            del anchor
        self._locked = ok
        if not ok:
            _warn_unlocked(ctypes.get_errno())

    @property
    def locked(self) -> bool:
        """Whether mlock kept this page in RAM (it can be refused: RLIMIT_MEMLOCK)."""
        return self._locked

    def __len__(self) -> int:
        return self._size

    def view(self) -> memoryview:
        if self._closed:
            raise ValueError("secret already wiped")
        return memoryview(self._map)[: self._size]

    def copy(self) -> Secret:
        with self.view() as view:
            return Secret.from_bytes(view)

    def equals(self, other: Secret | bytes | bytearray | memoryview) -> bool:
        other_view = other.view() if isinstance(other, Secret) else memoryview(other)
        with self.view() as mine, other_view:
            return constant_time_equal(mine, other_view)

    def wipe(self) -> None:
        if self._closed:
            return
        self._map[:] = bytes(len(self._map))
        self._closed = True
        # A view still alive elsewhere keeps the mapping; it now holds only zeros and is
        # unmapped when that view goes.
        with contextlib.suppress(BufferError):
            self._map.close()

    @property
    def wiped(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<Secret {self._size} bytes{' wiped' if self._closed else ''}>"

    __str__ = __repr__

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("secrets cannot be pickled")
