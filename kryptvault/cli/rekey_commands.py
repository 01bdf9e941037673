"""`kryptvault rekey`: a new master key, every block re-encrypted under it.

Removing a stolen token's keyslot is not enough when the password went with it: an old
copy of the header still unwraps the old master key, and every data key derives from it
(docs/FORMAT.md §3.4). Rekey draws a fresh master key and copies the whole store into a
new container sealed under the new subkeys (the compaction copier of
`kryptvault.fs.compact`), with a new header that holds only the slot that opened the
vault, re-wrapped under the new key. The vault UUID stays: backups and registrations stay
associated with the vault, and since every subkey is HKDF(master, purpose || UUID), a new
master key alone already makes every key new.

A token+password slot gets a new token share and a new password: someone who copied the
share file and learnt the password must not open the rekeyed vault. Crash order, so that
the old or the new share always opens what the container file holds: the new share is
written to the token under a pending name (fsync-ed) before the new container is renamed
into place; only then does it replace the share file. After a crash in between, unlocking
tries the pending share when the share file opens nothing, and finishes the swap.

Like compact, it runs offline under the container's exclusive flock (a mounted vault is
refused) and writes a temporary file next to the container that is verified (header
authenticates, the surviving slot opens, every block authenticates) before it is renamed
over the original.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click

from kryptvault.cli.app import cli
from kryptvault.cli.maintenance_commands import open_locked
from kryptvault.cli.options import UnlockArgs, container_argument, password_source, unlock_options
from kryptvault.cli.progress import Progress
from kryptvault.cli.secrets_input import read_new_password, read_secret, show_secret
from kryptvault.cli.units import human_size
from kryptvault.cli.vault_commands import choose_kdf, kdf_options
from kryptvault.container.header import (
    KIND_RECOVERY,
    KIND_TOKEN_PASSWORD,
    SLOT_COUNT,
    Header,
    Keyslot,
    header_unchanged,
    read_header,
)
from kryptvault.container.keyslots import (
    MASTER_KEY_LEN,
    TokenFactor,
    authenticate_header,
    format_recovery_key,
    new_password_slot,
    new_recovery_key,
    new_recovery_slot,
    unlock_with_password,
    unlock_with_recovery_key,
)
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import header_lock, store_keys, write_header_copies
from kryptvault.crypto.secret import Secret, harden_process
from kryptvault.durable import fsync_dir
from kryptvault.errors import IntegrityError, KryptvaultError, TokenError, UsageError
from kryptvault.fs.compact import HEADER_BYTES, CompactStats
from kryptvault.fs.compact import compact as copy_container
from kryptvault.session.unlock import Unlocked, opened_factor, unlock_container
from kryptvault.token.share import Share


@contextlib.contextmanager
def _temp_container(container: Path, fd: int) -> Iterator[tuple[Path, int]]:
    """A new file next to `container` with its permissions; removed unless renamed away."""
    parent = container.parent if str(container.parent) else Path(".")
    st = os.fstat(fd)
    tmp = parent / f".{container.name}.kv-rekey-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of an earlier run (we hold the container's lock)
    tfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o7777)
    with contextlib.suppress(OSError):
        os.fchown(tfd, st.st_uid, st.st_gid)
    try:
        yield tmp, tfd
    finally:
        os.close(tfd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _only_slot(header: Header, index: int, slot: Keyslot) -> Header:
    slots: list[Keyslot | None] = [None] * SLOT_COUNT
    slots[index] = slot
    return header.with_slots(tuple(slots))


def _verify_new_container(
    tfd: int,
    written: Header,
    new_master: Secret,
    index: int,
    password: Secret | None,
    factor: TokenFactor | None,
    recovery_key: Secret | None,
) -> None:
    """The new file opens with the new key through its one slot, and every block
    authenticates. Raises (and nothing is replaced) otherwise."""
    read = read_header(tfd)
    header = read.header
    if read.damage_note() or header.sequence != written.sequence:
        raise IntegrityError("the new header does not read back; nothing was replaced")
    authenticate_header(header, new_master)
    if recovery_key is not None:
        master, opened = unlock_with_recovery_key(header, recovery_key)
    else:
        assert password is not None and factor is not None
        master, opened = unlock_with_password(header, password, factor, [index])
    with master:
        if opened != index or not master.equals(new_master):
            raise IntegrityError("the new keyslot does not open the new master key; nothing was replaced")
    keys = store_keys(new_master, header.vault_uuid)
    try:
        store = ObjectStore.open(tfd, header.layout, header.vault_uuid, keys.data, keys.meta, read_only=True)
        try:
            damage = store.verify()  # includes what opening found
        finally:
            store.close()
    finally:
        keys.wipe()
    if damage:
        raise IntegrityError(
            f"the rekeyed copy fails verification ({damage[0].reason}); nothing was replaced"
        )


def _print_recovery_key(index: int, printable: Secret) -> None:
    click.echo(f"new recovery key for slot {index} (the one used to unlock is no longer valid).")
    click.echo("Write it down and keep it away from the token; it is not shown again:")
    show_secret(printable)


def _rekey(
    container: Path,
    fd: int,
    unlocked: Unlocked,
    new_password: Secret | None,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    progress: Progress | None = None,
) -> tuple[Header, CompactStats, list[tuple[int, Keyslot]], str | None]:
    """Returns what it wrote, and a warning when the new share is on the token only
    under its pending name (the vault is rekeyed; the next unlock finishes the swap)."""
    header = unlocked.header
    index = unlocked.slot
    old = header.slots[index]
    assert old is not None
    vault_uuid = header.vault_uuid
    dropped = [(i, s) for i, s in header.active_slots() if i != index]
    recovery = old.kind == KIND_RECOVERY
    old_keys = store_keys(unlocked.master, vault_uuid)
    factor: TokenFactor | None = None
    recovery_key: Secret | None = None
    printable: Secret | None = None
    new_share: Share | None = None
    unfinished: str | None = None
    try:
        with Secret.random(MASTER_KEY_LEN) as new_master:
            new_keys = store_keys(new_master, vault_uuid)
            try:
                if recovery:
                    recovery_key = new_recovery_key()
                    printable = format_recovery_key(recovery_key)
                    slot = new_recovery_slot(vault_uuid, index, new_master, recovery_key, old.label)
                elif unlocked.fido2 is not None:
                    # The key's hmac-secret cannot be copied off it, so the same credential
                    # and salt stay; the new master key and the new password are what
                    # make old header copies (with the old password) useless.
                    assert new_password is not None and old.kdf is not None
                    params = (
                        old.kdf
                        if kdf_time_ms is None and kdf_memory_mib is None
                        else choose_kdf(kdf_time_ms, kdf_memory_mib)
                    )
                    factor = opened_factor(unlocked)
                    slot = new_password_slot(
                        vault_uuid, index, new_master, new_password, factor, params, old.label
                    )
                else:
                    assert unlocked.token is not None and unlocked.share is not None
                    assert new_password is not None and old.kdf is not None
                    params = (
                        old.kdf
                        if kdf_time_ms is None and kdf_memory_mib is None
                        else choose_kdf(kdf_time_ms, kdf_memory_mib)
                    )
                    # The same token (binding, and the identity the slot records) with a
                    # new share: a copy of the old share file opens nothing any more.
                    new_share = Share.generate(vault_uuid, unlocked.share.generation)
                    factor = TokenFactor(
                        Secret.from_bytes(new_share.secret),
                        unlocked.token.identity.binding(),
                        old.token_identity,
                    )
                    slot = new_password_slot(
                        vault_uuid, index, new_master, new_password, factor, params, old.label
                    )
                with _temp_container(container, fd) as (tmp, tfd):
                    stats = copy_container(
                        fd, tfd, header.layout, vault_uuid, old_keys, dest_keys=new_keys, progress=progress
                    )
                    if progress is not None:
                        progress.phase("verifying the new container")
                    # The copier copied the old header (it wraps the old master key):
                    # zero it all, then write both new copies (sequence above the old).
                    os.pwrite(tfd, bytes(HEADER_BYTES), 0)
                    written = write_header_copies(tfd, _only_slot(header, index, slot), new_master)
                    os.fsync(tfd)
                    _verify_new_container(
                        tfd, written, new_master, index, new_password, factor, recovery_key
                    )
                    if new_share is not None:
                        assert unlocked.token is not None
                        # Before the swap, and durable: from the swap on, only this
                        # share opens the container (the old one still does until then).
                        unlocked.token.write_pending_share(new_share)
                    if printable is not None:
                        # Before the swap: should printing fail, the old container (and
                        # the old recovery key) is still in place.
                        if progress is not None:
                            progress.finish()
                        _print_recovery_key(index, printable)
                    parent = container.parent if str(container.parent) else Path(".")
                    with header_lock(fd):
                        if not header_unchanged(fd, unlocked.read):
                            raise KryptvaultError(
                                "the header changed while rekey ran (a keyslot was changed); "
                                "nothing was replaced, run it again"
                            )
                        os.replace(tmp, container)
                    fsync_dir(parent)
                    if new_share is not None:
                        assert unlocked.token is not None
                        try:
                            unlocked.token.promote_pending_share(new_share)
                        except TokenError as exc:
                            unfinished = (
                                f"the vault is rekeyed, but the token's share file was not replaced ({exc}); "
                                "the new share waits on the token and the next unlock with it finishes this"
                            )
            finally:
                new_keys.wipe()
    finally:
        old_keys.wipe()
        for s in (factor.secret if factor else None, recovery_key, printable):
            if s is not None:
                s.wipe()
        if new_share is not None:
            new_share.wipe()
    return written, stats, dropped, unfinished


@cli.command()
@container_argument
@unlock_options
@click.option("--new-password-fd", type=int, metavar="N", help="Read the new password from fd N.")
@click.option(
    "--new-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the new password from this file.",
)
@kdf_options
def rekey(
    container: Path,
    unlock: UnlockArgs,
    new_password_fd: int | None,
    new_password_file: Path | None,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
) -> None:
    """Give CONTAINER (not mounted) a new master key and re-encrypt all of it.

    For a token copied or stolen together with the password: removing its slot is not
    enough, because old copies of the header still open the old master key. Only the
    keyslot that unlocks now survives, re-wrapped under the new key with a NEW token
    share (written to the same token) and a NEW password (asked twice); with --recovery
    a NEW recovery key is printed instead. Every other slot is dropped: re-add backup
    tokens and recovery keys afterwards. Needs free space for the live data. Backups
    made before still open with the old keys.
    """
    harden_process()
    new_source = password_source(new_password_fd, new_password_file)
    if new_source.scripted and unlock.recovery_asker() is not None:
        raise UsageError("--new-password-fd/--new-password-file are for token+password, not --recovery")
    fd = open_locked(container, writable=True)
    kept: list[Secret] = []
    bar = Progress("rekey", unit="objects")
    try:
        source = unlock.password_source()

        def ask_password() -> Secret:
            password = read_secret(source, "Password: ")
            kept.append(password.copy())  # to re-wrap the slot; unlock wipes its own
            bar.phase("unlocking (Argon2id key derivation)")
            return password

        ask_recovery = unlock.recovery_asker()

        def ask_recovery_key() -> Secret:
            assert ask_recovery is not None
            key = ask_recovery()
            bar.phase("unlocking")
            return key

        with unlock_container(
            container,
            token_spec=unlock.token_spec,
            ask_password=ask_password,
            ask_recovery_key=ask_recovery_key if ask_recovery is not None else None,
            ask_pin=unlock.pin_asker(),
        ) as unlocked:
            by_token = unlocked.token is not None or unlocked.fido2 is not None
            if by_token:
                bar.finish()  # the prompt comes next, on the same terminal
                kept.append(read_new_password(new_source, "New password: ", what="new password"))
                if kept[0].equals(kept[-1]):
                    raise UsageError("the new password is the old one: rekey needs a new password")
            bar.phase("re-encrypting every block")
            written, stats, dropped, unfinished = _rekey(
                container, fd, unlocked, kept[-1] if by_token else None,
                kdf_time_ms, kdf_memory_mib, bar,
            )  # fmt: skip
            index = unlocked.slot
    finally:
        bar.finish()
        for secret in kept:
            secret.wipe()
        os.close(fd)
    click.echo(
        f"rekeyed {container}: new master key, {stats.objects} objects ({human_size(stats.data_bytes)}) "
        f"re-encrypted; header sequence {written.sequence}"
    )
    if unlocked.token is not None:
        click.echo(
            f"kept slot {index} (re-wrapped under the new key with a new token share on "
            f"{unlocked.token.identity.describe()} and the new password)"
        )
    elif unlocked.fido2 is not None:
        click.echo(
            f"kept slot {index} (re-wrapped under the new key with the same {unlocked.fido2.describe()} "
            "and the new password)"
        )
    else:
        click.echo(f"kept slot {index} (re-wrapped under the new key)")
    for i, s in dropped:
        label = f" '{s.label}'" if s.label else ""
        click.echo(f"dropped slot {i}: {s.kind_name}{label}")
    if dropped:
        click.echo(
            "re-add backup tokens and recovery keys: 'kryptvault token add', 'kryptvault recovery-key add'"
        )
    if unlocked.token is None and unlocked.fido2 is None and any(
        s.kind == KIND_TOKEN_PASSWORD for _i, s in dropped
    ):
        click.echo(
            "note: no token+password slot is left; add a token with "
            "'kryptvault token add CONTAINER --new-token T --recovery'"
        )
    click.echo(
        "warning: backups and copies of the container made before this still open with the old "
        "keys and slots; destroy them if the old key is compromised"
    )
    if unfinished:
        raise KryptvaultError(unfinished)
