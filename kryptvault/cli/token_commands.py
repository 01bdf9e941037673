"""Token commands: list plugged sticks, enrol a backup token, revoke one, install udev rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import click

from kryptvault.cli.app import cli
from kryptvault.cli.options import (
    UnlockArgs,
    container_argument,
    pass_unlock_args,
    password_options,
    password_source,
    recovery_options,
)
from kryptvault.cli.secrets_input import read_new_password, read_secret
from kryptvault.cli.vault_commands import kdf_options, rewrite_header
from kryptvault.container.header import KIND_TOKEN_PASSWORD
from kryptvault.container.keyslots import new_password_slot
from kryptvault.container.vault import free_slot_index, read_container_header, replace_slot
from kryptvault.crypto.kdf import calibrate
from kryptvault.crypto.secret import harden_process
from kryptvault.errors import KryptvaultError, UsageError
from kryptvault.session.unlock import slot_identities, token_factor, unlock_container
from kryptvault.token.base import TokenIdentity
from kryptvault.token.discover import discover_usb_sticks
from kryptvault.token.resolve import mount_hint, resolve_token
from kryptvault.token.share import SHARE_DIR_NAME, Share, list_share_uuids, share_path
from kryptvault.token.udev import render_rules, unit_instance


@cli.group()
def token() -> None:
    """USB tokens: list, add a backup token, remove (revoke) one, udev rules."""


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def token_list(as_json: bool) -> None:
    """List plugged USB sticks and the vaults each one is registered for."""
    records: list[dict[str, object]] = []
    lines: list[str] = []
    for stick in discover_usb_sticks():
        vaults: set[str] = set()
        blocks: list[dict[str, object]] = []
        lines.append(stick.describe())
        for block in stick.block_devices:
            for mountpoint in block.mountpoints:
                share_dir = Path(mountpoint) / SHARE_DIR_NAME
                try:
                    vaults.update(str(u) for u in _registrations_in(share_dir))
                except OSError:
                    continue
            hint = None if block.mountpoints else mount_hint(block)
            blocks.append(
                {
                    "device": block.dev,
                    "fs_uuid": block.fs_uuid,
                    "fs_type": block.fs_type,
                    "mountpoints": block.mountpoints,
                    "mount_hint": hint,
                }
            )
            where = ", ".join(block.mountpoints) or f"not mounted; mount it with: {hint}"
            lines.append(f"  {block.dev} {block.fs_type or '?'} {block.fs_uuid or ''}: {where}")
        lines.append(f"  registered for: {', '.join(sorted(vaults)) or 'no vault'}")
        records.append(
            {
                "vendor_id": f"{stick.vendor_id:04x}",
                "product_id": f"{stick.product_id:04x}",
                "serial": stick.serial,
                "manufacturer": stick.manufacturer,
                "product": stick.product,
                "block_devices": blocks,
                "vaults": sorted(vaults),
            }
        )
    if as_json:
        click.echo(json.dumps(records, indent=2))
    else:
        click.echo("\n".join(lines) if lines else "no USB stick is plugged in")


def _registrations_in(share_dir: Path) -> list[object]:
    return list(list_share_uuids(share_dir)) if share_dir.is_dir() else []


@token.command("add")
@container_argument
@click.option(
    "--token",
    "new_token",
    required=True,
    metavar="PATH|auto|SERIAL|fs:UUID",
    help="The token to enrol (e.g. the backup stick's serial).",
)
@click.option(
    "--with-token",
    "old_token",
    metavar="PATH|SERIAL|fs:UUID",
    help="A token already registered, to open the vault (default: the plugged one).",
)
@password_options
@recovery_options
@pass_unlock_args(spec_param="old_token")
@click.option(
    "--new-password",
    "ask_new_password",
    is_flag=True,
    help="Give the new token's slot its own password (default: the same password).",
)
@kdf_options
@click.option("--label", default="backup token", show_default=True)
def token_add(
    container: Path,
    new_token: str,
    unlock: UnlockArgs,
    ask_new_password: bool,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    label: str,
) -> None:
    """Enrol another token as its own keyslot.

    The vault is opened with an existing token + password (the new slot gets the same
    password unless --new-password), or with --recovery when no token is left (the
    password then given is the new slot's, asked twice on a terminal).
    """
    harden_process()
    header = read_container_header(container).header
    target = resolve_token(new_token, vault_uuid=header.vault_uuid)
    if any(
        ident.matches(target.identity) and ident.kind != "dir" for ident in slot_identities(header).values()
    ):
        raise UsageError(f"{target.identity.describe()} is already registered for this vault")
    source = unlock.password_source()
    ask_recovery = unlock.recovery_asker()
    if ask_recovery is not None:
        password = read_new_password(source, "Password for the new token: ")
    else:
        password = read_secret(source, "Password: ")
    with (
        password,
        unlock_container(
            container, token_spec=unlock.token_spec, ask_password=password.copy, ask_recovery_key=ask_recovery
        ) as unlocked,
    ):
        if unlocked.token is not None and unlocked.token.share_dir == target.share_dir:
            raise UsageError("the new token is the one that opened the vault; plug in the other stick")
        index = free_slot_index(unlocked.header)
        old = unlocked.header.slots[unlocked.slot]
        params = (
            old.kdf
            if old is not None and old.kdf and kdf_time_ms is None and kdf_memory_mib is None
            else calibrate((kdf_time_ms or 1000) / 1000, kdf_memory_mib * 1024 if kdf_memory_mib else None)
        )
        new_password = (
            read_new_password(password_source(None, None), "Password for the new token: ")
            if ask_new_password and ask_recovery is None
            else password.copy()
        )
        share = Share.generate(unlocked.vault_uuid, unlocked.share.generation if unlocked.share else 0)
        try:
            target.write_share(share)
            try:
                factor = token_factor(target, share)
                with factor.secret, new_password:
                    assert params is not None
                    slot = new_password_slot(
                        unlocked.vault_uuid, index, unlocked.master, new_password, factor, params, label
                    )
                rewrite_header(unlocked, replace_slot(unlocked.header, index, slot))
            except BaseException:
                share_path(target.share_dir, unlocked.vault_uuid).unlink(missing_ok=True)
                raise
        finally:
            share.wipe()
    click.echo(f"token {target.identity.describe()} added as slot {index}")


def _slot_for(header_slots: dict[int, TokenIdentity], which: str) -> int:
    if which.isdigit():
        return int(which)
    matches = [i for i, ident in header_slots.items() if ident.serial == which or ident.fs_uuid == which]
    if not matches:
        raise UsageError(f"no keyslot records a token with serial or UUID {which}")
    if len(matches) > 1:
        raise UsageError(f"several keyslots record {which}: name the slot number")
    return matches[0]


@token.command("remove")
@container_argument
@click.argument("which", metavar="SLOT|SERIAL")
@click.option(
    "--token",
    "token_spec",
    metavar="PATH|SERIAL|fs:UUID",
    help="A remaining token to prove access with (default: the plugged one).",
)
@password_options
@recovery_options
@pass_unlock_args()
@click.option("--force", is_flag=True, help="Allow removing the last way into the vault.")
def token_remove(
    container: Path,
    which: str,
    unlock: UnlockArgs,
    force: bool,
) -> None:
    """Revoke a token: delete its keyslot (and its share file, if that stick is plugged)."""
    harden_process()
    header = read_container_header(container).header
    index = _slot_for(slot_identities(header), which)
    slot = header.slots[index] if 0 <= index < len(header.slots) else None
    if slot is None or slot.kind != KIND_TOKEN_PASSWORD:
        raise UsageError(f"slot {which} is not a token keyslot")
    if len(header.active_slots()) == 1 and not force:
        raise UsageError(
            "that is the last way into the vault: removing it locks the vault forever (use --force)"
        )
    with unlock_container(
        container,
        token_spec=unlock.token_spec,
        ask_password=unlock.password_asker(),
        ask_recovery_key=unlock.recovery_asker(),
    ) as unlocked:
        rewrite_header(unlocked, replace_slot(unlocked.header, index, None))
        revoked = TokenIdentity.decode(slot.token_identity)
        _delete_share_if_plugged(revoked, unlocked.vault_uuid)
    click.echo(f"slot {index} ({revoked.describe()}) removed: that token no longer opens this container.")
    click.echo("Old copies of the container or its header (backups) still open with it and its password.")
    click.echo("If the token was stolen together with the password, move the files into a new vault.")


def _delete_share_if_plugged(revoked: TokenIdentity, vault_uuid: uuid.UUID) -> None:
    """The revoked token's share is useless now; remove it if that token is reachable.
    A directory token has no identity to find it by, so its share file stays."""
    if revoked.kind == "dir":
        return
    try:
        token = resolve_token(None, vault_uuid=vault_uuid, identity=revoked)
        share_path(token.share_dir, vault_uuid).unlink(missing_ok=True)
    except (KryptvaultError, OSError):
        return


@token.command("udev")
@click.argument("containers", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--rules-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/udev/rules.d"),
    show_default=True,
)
@click.option(
    "--units-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the systemd user units go (default: ~/.config/systemd/user).",
)
@click.option("--dry-run", is_flag=True, help="Print the rules instead of installing them.")
def token_udev(containers: tuple[Path, ...], rules_dir: Path, units_dir: Path | None, dry_run: bool) -> None:
    """Render udev rules (uaccess + lock on removal) for the tokens of CONTAINERS and reload udev."""
    entries = []
    for container in containers:
        header = read_container_header(container).header
        entries += [(ident, header.vault_uuid) for ident in slot_identities(header).values()]
    rules = render_rules(entries)
    if dry_run:
        click.echo(rules, nl=False)
        return
    rules_path = rules_dir / "70-kryptvault.rules"
    _atomic_write(rules_path, rules)
    units = units_dir or Path.home() / ".config" / "systemd" / "user"
    units.mkdir(parents=True, exist_ok=True)
    executable = shutil.which("kryptvault") or str(Path(sys.executable).parent / "kryptvault")
    template_dir = Path(__file__).resolve().parents[2] / "udev"
    for name in ("kryptvault-guard@.service", "kryptvault-lock@.service"):
        text = (template_dir / name).read_text() if (template_dir / name).exists() else ""
        if not text:
            raise KryptvaultError(f"the unit template {name} is missing from this installation")
        _atomic_write(units / name, text.replace("ExecStart=kryptvault ", f"ExecStart={executable} "))
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "control", "--reload"], check=False)
    click.echo(f"wrote {rules_path} and the units in {units}")
    click.echo(f"instances: {', '.join(unit_instance(v) for _, v in entries) or 'none'}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KryptvaultError(f"cannot write {path}: {exc.strerror}")
