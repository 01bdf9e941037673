"""Commands on the container and its keyslots: init, info, passwd, recovery-key, slot."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import click

from kryptvault.cli import output
from kryptvault.cli.app import cli
from kryptvault.cli.fido2_support import enrol_factor, is_fido2_spec, pick_authenticator, pin_asker
from kryptvault.cli.options import (
    UnlockArgs,
    container_argument,
    pass_unlock_args,
    password_options,
    password_source,
    pin_option,
    token_option,
    unlock_options,
)
from kryptvault.cli.output import detail, say
from kryptvault.cli.progress import Progress
from kryptvault.cli.secrets_input import SecretSource, read_new_password, show_secret
from kryptvault.container.header import KIND_TOKEN_PASSWORD, Header, Keyslot, header_unchanged
from kryptvault.container.keyslots import (
    format_recovery_key,
    new_password_slot,
    new_recovery_key,
    new_recovery_slot,
)
from kryptvault.container.vault import (
    create_container,
    free_slot_index,
    header_lock,
    open_container_fd,
    read_container_header,
    replace_slot,
    write_header_copies,
)
from kryptvault.crypto.kdf import calibrate
from kryptvault.crypto.kdf_params import MIN_MEMORY_KIB, Argon2Params
from kryptvault.crypto.secret import Secret, harden_process
from kryptvault.errors import KryptvaultError, UsageError
from kryptvault.session.mkfs import initialise_filesystem
from kryptvault.session.unlock import Unlocked, opened_factor, token_factor, unlock_container
from kryptvault.token.base import TokenIdentity
from kryptvault.token.fido2key import Fido2Identity
from kryptvault.token.resolve import resolve_token
from kryptvault.token.share import Share


def kdf_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option(
        "--kdf-memory-mib",
        type=click.IntRange(8, 4096),
        metavar="MIB",
        help="Argon2id memory (default: 256 MiB, or half the free memory if less).",
    )(f)
    f = click.option(
        "--kdf-time-ms",
        type=click.IntRange(10, 60000),
        metavar="MS",
        help="Target Argon2id time at unlock on this machine (default: 1000).",
    )(f)
    return f


def choose_kdf(kdf_time_ms: int | None, kdf_memory_mib: int | None) -> Argon2Params:
    memory = kdf_memory_mib * 1024 if kdf_memory_mib else None
    return calibrate((kdf_time_ms or 1000) / 1000, max(memory, MIN_MEMORY_KIB) if memory else None)


def unlock_for_change(
    container: Path, unlock: UnlockArgs, *, prompt: str = "Password: ", progress: Progress | None = None
) -> Unlocked:
    """Open the vault as the command line says. `progress`: name the key derivation that
    follows the password (shown once it is typed, not over the prompt)."""
    harden_process()
    ask_password = unlock.password_asker(prompt)
    ask_recovery = unlock.recovery_asker()
    if progress is not None:
        ask_password = _then_phase(ask_password, progress)
        ask_recovery = _then_phase(ask_recovery, progress) if ask_recovery is not None else None
    unlocked = unlock_container(
        container, token_spec=unlock.token_spec, ask_password=ask_password, ask_recovery_key=ask_recovery,
        ask_pin=unlock.pin_asker(),
    )
    if output.current.verbose:
        if progress is not None:
            progress.finish()
        how = (
            unlocked.token.identity.describe() if unlocked.token is not None
            else unlocked.fido2.describe() if unlocked.fido2 is not None
            else "the recovery key"
        )
        detail(f"opened keyslot {unlocked.slot} of vault {unlocked.vault_uuid} with {how}")
    return unlocked


def _then_phase(ask: Callable[[], Secret], progress: Progress) -> Callable[[], Secret]:
    def asked() -> Secret:
        secret = ask()
        progress.phase("unlocking (Argon2id key derivation)")
        return secret

    return asked


def _remove_share_quietly(token_share_dir: Path, vault_uuid: uuid.UUID) -> None:
    from kryptvault.token.share import share_path

    with contextlib.suppress(OSError):
        share_path(token_share_dir, vault_uuid).unlink()


@cli.command()
@container_argument
@token_option()
@password_options
@kdf_options
@click.option("--label", default="primary", show_default=True, help="A name for the first keyslot.")
@click.option("--force", is_flag=True, help="Overwrite an existing container file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@pin_option
def init(
    container: Path,
    token_spec: str | None,
    password_fd: int | None,
    password_file: Path | None,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    label: str,
    force: bool,
    as_json: bool,
    pin_file: Path | None,
) -> None:
    """Create a new vault in CONTAINER, opened by your password and the token.

    Asks for the password twice, calibrates Argon2id to about one second here, writes
    the token's share file, and prints the vault UUID. With --token fido2 the token is
    a FIDO2 security key: touch it twice (make the credential, derive the key).
    """
    harden_process()
    if container.exists() and not force:
        raise UsageError(f"{container} already exists (use --force to overwrite it)")
    if is_fido2_spec(token_spec):
        assert token_spec is not None
        _init_fido2(container, token_spec, password_source(password_fd, password_file),
                    kdf_time_ms, kdf_memory_mib, label, force, as_json, pin_file)
        return
    token = resolve_token(token_spec or "auto")
    vault_uuid = uuid.uuid4()
    password = read_new_password(password_source(password_fd, password_file))
    with password, Progress("init", not as_json) as bar:
        bar.phase("calibrating Argon2id on this machine")
        params = choose_kdf(kdf_time_ms, kdf_memory_mib)
        detail(f"Argon2id calibrated: t={params.time_cost} m={params.memory_kib // 1024} MiB")

        def first_slot(vid: uuid.UUID, master: Secret) -> Keyslot:
            bar.phase("deriving the key from the password (Argon2id)")
            slot = new_password_slot(vid, 0, master, password, factor, params, label)
            bar.phase("writing the container")
            return slot

        share = Share.generate(vault_uuid)
        try:
            token.write_share(share)
            try:
                factor = token_factor(token, share)
                with factor.secret:
                    create_container(
                        container, first_slot, initialise_filesystem, force=force, vault_uuid=vault_uuid
                    )
            except BaseException:
                _remove_share_quietly(token.share_dir, vault_uuid)
                raise
        finally:
            share.wipe()
    if as_json:
        record = {
            "vault": str(vault_uuid),
            "container": str(container.absolute()),
            "token": token.identity.describe(),
            "share_dir": str(token.share_dir),
            "kdf": {
                "algorithm": "argon2id",
                "time_cost": params.time_cost,
                "memory_kib": params.memory_kib,
                "parallelism": params.parallelism,
            },
        }
        click.echo(json.dumps(record))
        return
    click.echo(f"created vault {vault_uuid} in {container}")
    say(f"token: {token.identity.describe()}")
    say(f"Argon2id: t={params.time_cost} m={params.memory_kib // 1024} MiB p={params.parallelism}")


def _init_fido2(
    container: Path,
    spec: str,
    source: SecretSource,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    label: str,
    force: bool,
    as_json: bool,
    pin_file: Path | None,
) -> None:
    auth = pick_authenticator(spec)
    vault_uuid = uuid.uuid4()
    password = read_new_password(source)
    with password, Progress("init", not as_json) as bar:
        bar.phase("calibrating Argon2id on this machine")
        params = choose_kdf(kdf_time_ms, kdf_memory_mib)
        bar.phase("waiting for the security key")
        factor = enrol_factor(auth, label, pin_asker(pin_file))
        identity = Fido2Identity.decode(factor.identity)

        def first_slot(vid: uuid.UUID, master: Secret) -> Keyslot:
            bar.phase("deriving the key from the password (Argon2id)")
            slot = new_password_slot(vid, 0, master, password, factor, params, label)
            bar.phase("writing the container")
            return slot

        with factor.secret:
            create_container(container, first_slot, initialise_filesystem, force=force, vault_uuid=vault_uuid)
    if as_json:
        click.echo(json.dumps({
            "vault": str(vault_uuid),
            "container": str(container.absolute()),
            "token": identity.describe(),
            "authenticator": auth.describe(),
            "kdf": {"algorithm": "argon2id", "time_cost": params.time_cost,
                    "memory_kib": params.memory_kib, "parallelism": params.parallelism},
        }))
        return
    click.echo(f"created vault {vault_uuid} in {container}")
    say(f"token: {identity.describe()} on {auth.describe()}")
    say(f"Argon2id: t={params.time_cost} m={params.memory_kib // 1024} MiB p={params.parallelism}")


def _slot_record(index: int, slot: Keyslot) -> dict[str, object]:
    record: dict[str, object] = {
        "slot": index,
        "kind": slot.kind_name,
        "created": datetime.datetime.fromtimestamp(slot.created, datetime.UTC).isoformat(timespec="seconds"),
        "label": slot.label,
    }
    if slot.kdf is not None:
        record["kdf"] = {
            "algorithm": "argon2id",
            "time_cost": slot.kdf.time_cost,
            "memory_kib": slot.kdf.memory_kib,
            "parallelism": slot.kdf.parallelism,
        }
    if slot.kind == KIND_TOKEN_PASSWORD:
        try:
            record["token"] = (
                Fido2Identity.decode(slot.token_identity).describe()
                if Fido2Identity.recorded(slot.token_identity)
                else TokenIdentity.decode(slot.token_identity).describe()
            )
        except KryptvaultError:
            record["token"] = "(unreadable identity)"  # noqa: S105
    return record


def _header_record(header: Header) -> dict[str, object]:
    return {
        "uuid": str(header.vault_uuid),
        "format_version": header.version,
        "cipher_suite": "AES-256-GCM, HKDF-SHA256, Argon2id",
        "block_size": header.layout.block_size,
        "header_sequence": header.sequence,
        "created": datetime.datetime.fromtimestamp(header.created, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "slots": [_slot_record(i, s) for i, s in header.active_slots()],
    }


def _print_slots(slots: list[dict[str, object]]) -> None:
    for rec in slots:
        line = f"  slot {rec['slot']}: {rec['kind']:<15} created {rec['created']}"
        if rec.get("label"):
            line += f"  label {rec['label']!s}"
        click.echo(line)
        if "kdf" in rec:
            kdf = rec["kdf"]
            assert isinstance(kdf, dict)
            click.echo(
                f"           argon2id t={kdf['time_cost']} m={kdf['memory_kib'] // 1024} MiB "
                f"p={kdf['parallelism']}; token: {rec.get('token')}"
            )


@cli.command()
@container_argument
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(container: Path, as_json: bool) -> None:
    """Show the public header of CONTAINER (no secret needed, not authenticated)."""
    # Copies naming different vaults are shown with a warning saying so (the newest-looking
    # copy's fields): only an unlock can tell which one is genuine.
    read = read_container_header(container, allow_disagreement=True)
    note = read.damage_note()
    record = _header_record(read.header)
    if as_json:
        record["warning"] = note
        click.echo(json.dumps(record, indent=2))
        return
    if note:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"vault {record['uuid']}")
    click.echo(f"  format version {record['format_version']}, {record['cipher_suite']}")
    click.echo(
        f"  block size {read.header.layout.block_size // 1024} KiB, header sequence "
        f"{read.header.sequence}, created {record['created']}"
    )
    slots = record["slots"]
    assert isinstance(slots, list)
    click.echo(f"  {len(slots)} keyslot(s) in use of {len(read.header.slots)}:")
    _print_slots(slots)


def rewrite_header(unlocked: Unlocked, header: Header) -> Header:
    fd = open_container_fd(unlocked.path, writable=True)
    try:
        with header_lock(fd):
            # Both copies compared byte for byte: a forged copy may carry any sequence.
            if not header_unchanged(fd, unlocked.read):
                raise KryptvaultError("the header changed while this command ran; try again")
            return write_header_copies(fd, header, unlocked.master)
    finally:
        os.close(fd)


@cli.command()
@container_argument
@token_option()
@password_options
@pin_option
@pass_unlock_args()
@click.option("--new-password-fd", type=int, metavar="N", help="Read the new password from fd N.")
@click.option(
    "--new-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the new password from this file.",
)
@click.option("--slot", "slot_index", type=int, help="The keyslot to change (default: the one that opens).")
@kdf_options
def passwd(
    container: Path,
    unlock: UnlockArgs,
    new_password_fd: int | None,
    new_password_file: Path | None,
    slot_index: int | None,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
) -> None:
    """Change the password of one token+password keyslot (no data is re-encrypted)."""
    with unlock_for_change(container, unlock, prompt="Current password: ") as unlocked:
        index = unlocked.slot if slot_index is None else slot_index
        if index != unlocked.slot:
            raise UsageError(f"the password and token given open slot {unlocked.slot}, not slot {index}")
        old = unlocked.header.slots[index]
        assert old is not None
        params = (
            old.kdf
            if (kdf_time_ms is None and kdf_memory_mib is None)
            else choose_kdf(kdf_time_ms, kdf_memory_mib)
        )
        assert params is not None
        new_source = password_source(new_password_fd, new_password_file)
        with read_new_password(new_source, "New password: ", what="new password") as new_password:
            factor = opened_factor(unlocked)
            with factor.secret:
                slot = new_password_slot(
                    unlocked.vault_uuid, index, unlocked.master, new_password, factor, params, old.label
                )
        rewrite_header(unlocked, replace_slot(unlocked.header, index, slot))
    say(f"password of slot {index} changed")


@cli.group("recovery-key")
def recovery_key() -> None:
    """Recovery keys: open the vault without the token, e.g. when it is lost."""


@recovery_key.command("add")
@container_argument
@unlock_options
@click.option("--label", default="recovery", show_default=True)
def recovery_key_add(
    container: Path,
    unlock: UnlockArgs,
    label: str,
) -> None:
    """Add a recovery keyslot and print its key once, for writing down."""
    with unlock_for_change(container, unlock) as unlocked:
        index = free_slot_index(unlocked.header)
        with new_recovery_key() as key, format_recovery_key(key) as printable:
            slot = new_recovery_slot(unlocked.vault_uuid, index, unlocked.master, key, label)
            rewrite_header(unlocked, replace_slot(unlocked.header, index, slot))
            click.echo(f"recovery key added as slot {index}. Write it down and keep it away from the token;")
            click.echo("it opens the vault on its own and is not shown again:")
            show_secret(printable)


@cli.group()
def slot() -> None:
    """List or remove keyslots."""


@slot.command("list")
@container_argument
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def slot_list(container: Path, as_json: bool) -> None:
    """List the keyslots in use (public information; no secret needed)."""
    read = read_container_header(container)
    records = _header_record(read.header)["slots"]
    assert isinstance(records, list)
    if as_json:
        click.echo(json.dumps(records, indent=2))
    else:
        _print_slots(records)


@slot.command("remove")
@container_argument
@click.argument("slot_index", metavar="SLOT", type=int)
@unlock_options
@click.option(
    "--force", is_flag=True, help="Allow removing the last keyslot (the vault can then never be opened)."
)
def slot_remove(
    container: Path,
    slot_index: int,
    unlock: UnlockArgs,
    force: bool,
) -> None:
    """Remove keyslot SLOT (proving access with any slot first)."""
    read = read_container_header(container)
    if not 0 <= slot_index < len(read.header.slots) or read.header.slots[slot_index] is None:
        raise UsageError(f"slot {slot_index} is not in use")
    if len(read.header.active_slots()) == 1 and not force:
        raise UsageError("that is the last keyslot: removing it locks the vault forever (use --force)")
    with unlock_for_change(container, unlock) as unlocked:
        rewrite_header(unlocked, replace_slot(unlocked.header, slot_index, None))
    say(f"slot {slot_index} removed. Old copies of the header (in backups) still open with it;")
    say(f"they give the vault's master key until you run 'kryptvault rekey {container}'.")
