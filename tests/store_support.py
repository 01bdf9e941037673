"""Shared helpers for the object-store tests (no tests here)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kryptvault.container.layout import Layout
from kryptvault.container.store import ObjectStore
from kryptvault.crypto.secret import Secret

SMALL = Layout(block_size=4096, unit_size=4096)  # fanout 102: deep trees cheaply
DEFAULT = Layout()


@dataclass
class Vault:
    path: Path
    layout: Layout = DEFAULT
    uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    data_key: bytes = field(default_factory=lambda: os.urandom(32))
    meta_key: bytes = field(default_factory=lambda: os.urandom(32))
    fds: list[int] = field(default_factory=list)

    def _fd(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.fds.append(fd)
        return fd

    def create(self, **kw: object) -> ObjectStore:
        return ObjectStore.create(self._fd(), self.layout, self.uuid, Secret.from_bytes(self.data_key),
                                  Secret.from_bytes(self.meta_key), **kw)  # type: ignore[arg-type]

    def open(self, **kw: object) -> ObjectStore:
        return ObjectStore.open(self._fd(), self.layout, self.uuid, Secret.from_bytes(self.data_key),
                                Secret.from_bytes(self.meta_key), **kw)  # type: ignore[arg-type]

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def snapshot(store: ObjectStore) -> dict[int, tuple[bytes, bytes, bytes]]:
    """oid -> (attrs, data stream, aux stream) of everything in the store."""
    out = {}
    for oid in store.iter_oids():
        out[oid] = (
            store.get_attrs(oid),
            store.read(oid, 0, 0, store.stream_size(oid, 0)),
            store.read(oid, 1, 0, store.stream_size(oid, 1)),
        )
    return out


def pattern(seed: int, n: int) -> bytes:
    """Cheap, non-repeating-ish bytes (some zero runs so holes/stripping get exercised)."""
    if n <= 0:
        return b""
    unit = bytes(((seed * 131 + i * 7) & 0xFF) for i in range(251))
    data = (unit * (n // 251 + 1))[:n]
    if seed % 3 == 0:  # a zero stretch in the middle
        z = n // 3
        data = data[:z] + bytes(z) + data[2 * z :]
    return data


def _seal_into(self, nonce, plaintext, aad, out) -> None:  # type: ignore[no-untyped-def]
    self._cipher().encrypt_into(nonce, plaintext, aad, out)


def _open_into(self, nonce, sealed, aad, out) -> None:  # type: ignore[no-untyped-def]
    from cryptography.exceptions import InvalidTag

    from kryptvault.crypto.aead import AuthenticationFailed

    try:
        self._cipher().decrypt_into(nonce, sealed, aad, out)
    except InvalidTag:
        raise AuthenticationFailed("authentication failed") from None


def install_aead_into() -> bool:
    """Give Aead the zero-copy seal_into/open_into the store uses when present (proposed for
    kryptvault/crypto/aead.py). Returns False if Aead already has them."""
    from kryptvault.crypto.aead import Aead

    if hasattr(Aead, "seal_into"):
        return False
    Aead.seal_into = _seal_into  # type: ignore[attr-defined]
    Aead.open_into = _open_into  # type: ignore[attr-defined]
    return True


def remove_aead_into() -> None:
    from kryptvault.crypto.aead import Aead

    if getattr(Aead, "seal_into", None) is _seal_into:
        del Aead.seal_into  # type: ignore[attr-defined]
        del Aead.open_into  # type: ignore[attr-defined]
