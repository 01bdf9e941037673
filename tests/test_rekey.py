"""rekey: a new master key, every block re-encrypted, only the unlocking slot kept."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import (
    FAST_KDF,
    PASSWORD,
    VaultFixture,
    assert_clean_error,
    make_vault,
    run_cli,
    run_process,
    write_password_file,
)
from test_fsck import rand, read_file, snapshot, write_file

from kryptvault.container.commit import read_latest_commit
from kryptvault.container.layout import DATA_AREA_OFFSET
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import store_keys
from kryptvault.crypto.aead import Aead
from kryptvault.crypto.secret import Secret
from kryptvault.errors import AuthenticationError, IntegrityError, KryptvaultError
from kryptvault.fs import Filesystem
from kryptvault.session.unlock import Unlocked, unlock_container
from kryptvault.token.share import share_path

FILES = {b"small": rand(1, 3000), b"big": rand(2, 3 * (1 << 20) + 123), b"empty": b""}


NEW_PASSWORD = "a brand new rekey password"


def _unlock(
    container: Path, token: Path, recovery_file: Path | None = None, password: str = PASSWORD
) -> Unlocked:
    return unlock_container(
        container,
        token_spec=str(token),
        ask_password=lambda: Secret.from_bytes(password.encode()),
        ask_recovery_key=(lambda: Secret.from_bytes(recovery_file.read_bytes())) if recovery_file else None,
    )


@contextlib.contextmanager
def _fs(
    container: Path, token: Path, read_only: bool = False, password: str = PASSWORD
) -> Iterator[Filesystem]:
    with _unlock(container, token, password=password) as unlocked:
        keys = store_keys(unlocked.master, unlocked.vault_uuid)
        fd = os.open(container, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            store = ObjectStore.open(
                fd, unlocked.header.layout, unlocked.vault_uuid, keys.data, keys.meta, read_only=read_only
            )
            fs = Filesystem(store)
            try:
                yield fs
                if not read_only:
                    fs.commit()
            finally:
                fs.close()
                store.close()
        finally:
            os.close(fd)
            keys.wipe()


def _fill(fx: VaultFixture) -> None:
    with _fs(fx.container, fx.token) as fs:
        d = fs.mkdir(1, b"dir", 0o750, 1000, 1000).ino
        for name, data in FILES.items():
            write_file(fs, d, name, data)
        fs.symlink(1, b"link", b"dir/small", 1000, 1000)
        fs.setxattr(d, b"user.note", b"kept")


def _recovery_key(output: str) -> str:
    match = re.search(r"([A-Z2-7]{4}(?:-[A-Z2-7]{4}){7})", output)
    assert match, output
    return match.group(1)


def _key_file(path: Path, key: str) -> Path:
    path.write_text(key + "\n")
    return path


def _slots(container: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(run_cli("slot", "list", container, "--json").output)
    return out


@pytest.fixture
def vault(tmp_path: Path) -> VaultFixture:
    fx = make_vault(tmp_path)
    _fill(fx)
    return fx


def test_rekey_reencrypts_everything_and_keeps_only_the_unlocking_slot(
    vault: VaultFixture, tmp_path: Path
) -> None:
    added = run_cli("recovery-key", "add", vault.container, *vault.pw())
    assert added.exit_code == 0, added.output
    old_rk = _key_file(tmp_path / "old-rk", _recovery_key(added.output))
    backup_token = tmp_path / "backup-token"
    backup_token.mkdir()
    tok = run_cli(
        "token", "add", vault.container, "--token", backup_token, "--with-token", vault.token,
        "--password-file", vault.password_file, *FAST_KDF,
    )  # fmt: skip
    assert tok.exit_code == 0, tok.output
    assert [s["slot"] for s in _slots(vault.container)] == [0, 1, 2]
    with _fs(vault.container, vault.token, read_only=True) as fs:
        before = snapshot(fs)
    old_copy = tmp_path / "old-copy.kv"
    shutil.copy2(vault.container, old_copy)
    with _unlock(old_copy, vault.token) as old:
        old_seq = old.header.sequence
        old_master = old.master.copy()

    new_pw = write_password_file(tmp_path / "new-pw", NEW_PASSWORD)
    proc = run_process("rekey", vault.container, *vault.pw(), "--new-password-file", new_pw)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "kept slot 0" in out and "new token share" in out
    assert "dropped slot 1: recovery" in out and "dropped slot 2: token+password" in out
    assert "token add" in out and "recovery-key add" in out
    assert "old keys" in out
    seq = int(re.search(r"header sequence (\d+)", out).group(1))  # type: ignore[union-attr]
    assert seq > old_seq
    assert not list(tmp_path.glob(".vault.kv.kv-*"))

    # Only slot 0 survives; the token (new share) + the new password open it, with a new
    # master key.
    assert [s["slot"] for s in _slots(vault.container)] == [0]
    with _unlock(vault.container, vault.token, password=NEW_PASSWORD) as new:
        assert new.slot == 0 and new.header.sequence == seq
        assert new.vault_uuid == old.vault_uuid
        assert not new.master.equals(old_master)
    # Files byte-identical (stat, content, xattrs, symlinks).
    with _fs(vault.container, vault.token, read_only=True, password=NEW_PASSWORD) as fs:
        assert snapshot(fs) == before
        d = fs.lookup(1, b"dir")
        for name, data in FILES.items():
            assert read_file(fs, fs.lookup(d, name)) == data
    # The dropped slots do not open the new container.
    with pytest.raises(AuthenticationError):
        _unlock(vault.container, tmp_path / "x", recovery_file=old_rk)
    with pytest.raises(KryptvaultError):
        _unlock(vault.container, backup_token)

    # The old copy still opens with the old slot and old keys ...
    with _unlock(old_copy, backup_token) as again:
        assert again.master.equals(old_master)
    old_keys = store_keys(old_master, old.vault_uuid)
    fd = os.open(old_copy, os.O_RDONLY)
    try:
        store = ObjectStore.open(
            fd, old.header.layout, old.vault_uuid, old_keys.data, old_keys.meta, read_only=True
        )
        assert store.verify() == []
        store.close()
    finally:
        os.close(fd)
    # ... but the old meta key does not authenticate the rekeyed commit records, nor the
    # old data key its blocks; the old header (keyslots) is gone from the new file.
    fd = os.open(vault.container, os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError):
            read_latest_commit(fd, Aead(old_keys.meta), old.vault_uuid.bytes)
        with pytest.raises(IntegrityError):
            ObjectStore.open(
                fd, old.header.layout, old.vault_uuid, old_keys.data, old_keys.meta, read_only=True
            ).close()
    finally:
        os.close(fd)
    old_bytes = old_copy.read_bytes()
    new_bytes = vault.container.read_bytes()
    old_slot_area = old_bytes[64 : 64 + 3 * 512]
    assert old_slot_area[512:] not in new_bytes  # the dropped slots' bytes
    assert (
        old_bytes[DATA_AREA_OFFSET : DATA_AREA_OFFSET + 4096]
        != new_bytes[DATA_AREA_OFFSET : DATA_AREA_OFFSET + 4096]
    )
    old_keys.wipe()
    old_master.wipe()

    # The rekeyed vault keeps working: write, reopen, fsck clean.
    with _fs(vault.container, vault.token, password=NEW_PASSWORD) as fs:
        write_file(fs, 1, b"after", b"new data")
    fsck = run_cli("fsck", vault.container, "--token", vault.token, "--password-file", new_pw)
    assert fsck.exit_code == 0, fsck.output


def test_rekey_with_the_recovery_key_prints_a_new_one(vault: VaultFixture, tmp_path: Path) -> None:
    added = run_cli("recovery-key", "add", vault.container, *vault.pw())
    assert added.exit_code == 0, added.output
    old_key = _recovery_key(added.output)
    old_rk = _key_file(tmp_path / "old-rk", old_key.lower().replace("-", " "))
    with _fs(vault.container, vault.token, read_only=True) as fs:
        before = snapshot(fs)

    proc = run_process("rekey", vault.container, "--recovery-key-file", old_rk)
    assert proc.returncode == 0, proc.stderr
    new_key = _recovery_key(proc.stdout)
    assert new_key != old_key
    assert "kept slot 1" in proc.stdout and "dropped slot 0: token+password" in proc.stdout
    assert "no token+password slot is left" in proc.stdout
    new_rk = _key_file(tmp_path / "new-rk", new_key)

    assert [s["kind"] for s in _slots(vault.container)] == ["recovery"]
    with pytest.raises(AuthenticationError):
        _unlock(vault.container, vault.token, recovery_file=old_rk)
    with pytest.raises(KryptvaultError):
        _unlock(vault.container, vault.token)  # the token slot was dropped
    with _unlock(vault.container, vault.token, recovery_file=new_rk) as unlocked:
        keys = store_keys(unlocked.master, unlocked.vault_uuid)
        fd = os.open(vault.container, os.O_RDONLY)
        try:
            store = ObjectStore.open(
                fd, unlocked.header.layout, unlocked.vault_uuid, keys.data, keys.meta, read_only=True
            )
            try:
                assert store.verify() == []
                assert snapshot(Filesystem(store)) == before
            finally:
                store.close()
        finally:
            os.close(fd)
            keys.wipe()
    # The new key can enrol a fresh recovery key (re-adding access afterwards).
    again = run_cli("recovery-key", "add", vault.container, "--recovery-key-file", new_rk)
    assert again.exit_code == 0, again.output


def test_a_mounted_container_is_refused(vault: VaultFixture) -> None:
    before = vault.container.read_bytes()
    fd = os.open(vault.container, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the mount daemon does
        proc = run_process("rekey", vault.container, *vault.pw())
    finally:
        os.close(fd)
    assert proc.returncode != 0
    assert "mounted" in proc.stderr
    assert vault.container.read_bytes() == before


def test_a_wrong_password_changes_nothing(vault: VaultFixture, tmp_path: Path) -> None:
    before = vault.container.read_bytes()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    result = run_cli("rekey", vault.container, "--token", vault.token, "--password-file", wrong)
    assert result.exit_code != 0
    assert vault.container.read_bytes() == before
    assert not list(tmp_path.glob(".vault.kv.kv-*"))


def test_rekey_evicts_a_copied_share_and_the_old_password(vault: VaultFixture, tmp_path: Path) -> None:
    """The case rekey is for: someone copied the token's share file and knows the password."""
    vault_uuid = uuid.UUID(vault.uuid)
    stolen = tmp_path / "stolen"  # a directory token holding a copy of the share file
    stolen.mkdir()
    shutil.copy2(share_path(vault.token, vault_uuid), share_path(stolen, vault_uuid))
    with _unlock(vault.container, stolen):
        pass  # the copy works before the rekey, as a copy of the token would
    old_share = share_path(vault.token, vault_uuid).read_bytes()

    new_pw = write_password_file(tmp_path / "new-pw", NEW_PASSWORD)
    proc = run_process("rekey", vault.container, *vault.pw(), "--new-password-file", new_pw)
    assert proc.returncode == 0, proc.stderr

    # The token got a new share file (atomically replaced, nothing pending left).
    assert share_path(vault.token, vault_uuid).read_bytes() != old_share
    assert not share_path(vault.token, vault_uuid, pending=True).exists()
    assert not [p for p in vault.token.iterdir() if ".tmp-" in p.name]
    for token, password in ((stolen, PASSWORD), (stolen, NEW_PASSWORD), (vault.token, PASSWORD)):
        with pytest.raises(AuthenticationError):
            _unlock(vault.container, token, password=password)
    with _fs(vault.container, vault.token, read_only=True, password=NEW_PASSWORD) as fs:
        assert read_file(fs, fs.lookup(fs.lookup(1, b"dir"), b"small")) == FILES[b"small"]


def test_rekey_refuses_a_weak_or_unchanged_new_password_and_changes_nothing(
    vault: VaultFixture, tmp_path: Path
) -> None:
    before = vault.container.read_bytes()
    share = share_path(vault.token, uuid.UUID(vault.uuid))
    share_before = share.read_bytes()
    for text, message in (("short", "too short"), (PASSWORD, "the new password is the old one")):
        new_pw = write_password_file(tmp_path / "new-pw", text)
        proc = run_process("rekey", vault.container, *vault.pw(), "--new-password-file", new_pw)
        assert proc.returncode != 0
        assert_clean_error(proc.stderr)
        assert message in proc.stderr
    # Without a terminal and without --new-password-*, it cannot ask: refused, not guessed.
    proc = run_process("rekey", vault.container, *vault.pw())
    assert proc.returncode != 0 and "no terminal" in proc.stderr
    assert vault.container.read_bytes() == before
    assert share.read_bytes() == share_before


def test_a_rekey_interrupted_between_container_and_share_still_opens(
    vault: VaultFixture, tmp_path: Path
) -> None:
    """The states a crash can leave: the old container with a pending new share, and the
    new container with the old share file plus the pending new share. Both open, and the
    second one finishes the swap."""
    vault_uuid = uuid.UUID(vault.uuid)
    main, pending = share_path(vault.token, vault_uuid), share_path(vault.token, vault_uuid, pending=True)
    old_container = tmp_path / "old.kv"
    shutil.copy2(vault.container, old_container)
    old_share = main.read_bytes()
    new_pw = write_password_file(tmp_path / "new-pw", NEW_PASSWORD)
    proc = run_process("rekey", vault.container, *vault.pw(), "--new-password-file", new_pw)
    assert proc.returncode == 0, proc.stderr
    new_share = main.read_bytes()

    # Crash before the container was renamed: old container, old share, new one pending.
    main.write_bytes(old_share)
    pending.write_bytes(new_share)
    with _unlock(old_container, vault.token) as unlocked:
        assert unlocked.slot == 0
    assert main.read_bytes() == old_share and pending.exists()

    # Crash after the rename, before the share file was replaced.
    with _unlock(vault.container, vault.token, password=NEW_PASSWORD) as unlocked:
        assert unlocked.slot == 0
    assert main.read_bytes() == new_share and not pending.exists()
    with _unlock(vault.container, vault.token, password=NEW_PASSWORD):
        pass
