"""AES-256-GCM with random 96-bit nonces, the only cipher kryptvault uses."""

from __future__ import annotations

import os
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kryptvault.crypto.secret import Secret

NONCE_LEN = 12
TAG_LEN = 16


class AuthenticationFailed(Exception):
    """The ciphertext, nonce, tag or associated data does not match: damage or tampering."""


# Nonces come from the OS random generator in batches: one getrandom(2) per 341 nonces
# instead of one per sealed block (a syscall that costs more than sealing a small block).
# Every nonce is still 96 fresh OS-random bits, used once: a fork child starts with an
# empty batch, so parent and child never share one.
_BATCH = 4092
_pool = bytearray()
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool_lock
    _pool_lock = threading.Lock()  # the parent's may have been held at fork time
    del _pool[:]


os.register_at_fork(after_in_child=_forget_pool)


def new_nonce() -> bytes:
    # Random nonces: with at most 2**32 encryptions per key the collision chance stays
    # below 2**-32 (NIST SP 800-38D, 8.3). FORMAT.md states that budget per key.
    with _pool_lock:
        if not _pool:
            _pool[:] = os.urandom(_BATCH)
        nonce = bytes(_pool[-NONCE_LEN:])
        del _pool[-NONCE_LEN:]
    return nonce


class Aead:
    """An AES-256-GCM key, kept in a locked, non-dumpable `Secret` page of its own.

    `cryptography`'s AESGCM object copies its key into ordinary heap memory, where it
    can be swapped out and is not wiped. So no AESGCM object outlives an operation: each
    call builds one from the locked page (under a microsecond; OpenSSL cleanses its
    context when it is freed right after). At rest, the key exists only in that page.
    """

    __slots__ = ("_key",)

    def __init__(self, key: Secret) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._key = key.copy()  # the caller wipes its own when it likes

    def _cipher(self) -> AESGCM:
        with self._key.view() as view:
            return AESGCM(view)

    def wipe(self) -> None:
        self._key.wipe()

    def seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        """Return ciphertext || 16-byte tag."""
        return self._cipher().encrypt(nonce, plaintext, aad)

    def seal_into(
        self, nonce: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes, out: bytearray | memoryview
    ) -> None:
        """Write ciphertext || tag into `out`, exactly len(plaintext) + 16 bytes (no copy)."""
        self._cipher().encrypt_into(nonce, plaintext, aad, out)

    def open(self, nonce: bytes, sealed: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        try:
            return self._cipher().decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise AuthenticationFailed("authentication failed") from None

    def open_into(
        self, nonce: bytes, sealed: bytes | bytearray | memoryview, aad: bytes, out: bytearray | memoryview
    ) -> None:
        """Decrypt into `out`, exactly len(sealed) - 16 bytes. OpenSSL writes the plaintext
        before it checks the tag, so on a failure `out` is zeroed before the error: no
        unauthenticated byte stays behind for a caller to send on by mistake."""
        try:
            self._cipher().decrypt_into(nonce, sealed, aad, out)
        except InvalidTag:
            out[:] = bytes(len(out))
            raise AuthenticationFailed("authentication failed") from None

    def open_into_secret(self, nonce: bytes, sealed: bytes, aad: bytes) -> Secret:
        plain = self.open(nonce, sealed, aad)
        try:
            return Secret.from_bytes(plain)
        finally:
            from kryptvault.crypto.secret import scrub_bytes

            scrub_bytes(plain)
