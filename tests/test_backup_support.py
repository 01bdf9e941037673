"""Helpers for tests/test_backup_*.py (this module holds no tests).

`OpenVault` opens a real container in-process the way the mount daemon will (unlock →
store keys → ObjectStore → Filesystem) so tests can write files, commit, and read every
file back as a {path: bytes} snapshot.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from cli_helpers import PASSWORD, VaultFixture

from kryptvault.container.layout import Layout
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import store_keys
from kryptvault.crypto.secret import Secret
from kryptvault.fs import ROOT_INO, Filesystem, FsError
from kryptvault.session.unlock import unlock_container

PIECE = 1 << 20


class OpenVault:
    """A container opened in this process with the test token and password."""

    def __init__(self, container: Path, token: Path, *, read_only: bool = False) -> None:
        unlocked = unlock_container(container, token_spec=str(token),
                                    ask_password=lambda: Secret.from_bytes(PASSWORD.encode()))
        with unlocked:
            keys = store_keys(unlocked.master, unlocked.vault_uuid)
            self.vault_uuid = unlocked.vault_uuid
            layout = Layout(block_size=unlocked.header.layout.block_size)
        self.fd = os.open(container, os.O_RDONLY if read_only else os.O_RDWR)
        self.store = ObjectStore.open(self.fd, layout, self.vault_uuid, keys.data, keys.meta,
                                      read_only=read_only)
        keys.wipe()
        self.fs = Filesystem(self.store)

    @classmethod
    def of(cls, vault: VaultFixture, container: Path | None = None, read_only: bool = False) -> OpenVault:
        return cls(container or vault.container, vault.token, read_only=read_only)

    # -------------------------------------------------------------- writing
    def mkdirs(self, path: str) -> int:
        ino = ROOT_INO
        for name in path.strip("/").split("/"):
            if not name:
                continue
            try:
                ino = self.fs.lookup(ino, name.encode())
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                ino = self.fs.mkdir(ino, name.encode(), 0o755, os.getuid(), os.getgid()).ino
        return ino

    def write(self, path: str, data: bytes, offset: int = 0, truncate: bool = True) -> None:
        head, _, name = path.strip("/").rpartition("/")
        parent = self.mkdirs(head)
        try:
            ino = self.fs.lookup(parent, name.encode())
            fh = self.fs.open(ino, os.O_WRONLY | (os.O_TRUNC if truncate else 0))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            _st, fh = self.fs.create(parent, name.encode(), 0o644, os.O_WRONLY, os.getuid(), os.getgid())
        try:
            view = memoryview(data)
            for pos in range(0, len(view), PIECE):
                self.fs.write(fh, offset + pos, bytes(view[pos : pos + PIECE]))
        finally:
            self.fs.release(fh)

    def remove(self, path: str) -> None:
        parent, name = self.fs.resolve_parent(path.encode() if path.startswith("/") else b"/" + path.encode())
        self.fs.unlink(parent, name)

    def commit(self) -> int:
        return self.fs.commit()

    # -------------------------------------------------------------- reading
    def files(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}

        def walk(ino: int, prefix: str) -> None:
            for name, child, kind in self.fs.readdir(ino):
                if name in (b".", b".."):
                    continue
                path = f"{prefix}/{name.decode()}"
                if stat.S_ISDIR(kind):
                    walk(child, path)
                else:
                    size = self.fs.getattr(child).size
                    fh = self.fs.open(child, os.O_RDONLY)
                    try:
                        out[path] = b"".join(self.fs.read(fh, pos, PIECE) for pos in range(0, size, PIECE))
                    finally:
                        self.fs.release(fh)

        walk(ROOT_INO, "")
        return out

    def close(self) -> None:
        self.store.close()
        os.close(self.fd)

    def __enter__(self) -> OpenVault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def set_dir(dest: Path, vault: VaultFixture) -> Path:
    return dest / vault.uuid


def tree(path: Path) -> list[str]:
    """Every name under path (relative), sorted: to check nothing was left behind."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
