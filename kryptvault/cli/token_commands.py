"""Token commands: list plugged sticks, enrol a backup token, revoke one, install udev rules."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

from kryptvault.cli.app import cli
from kryptvault.cli.fido2_support import enrol_factor, pick_authenticator, reopen
from kryptvault.cli.options import (
    UnlockArgs,
    container_argument,
    pass_unlock_args,
    password_options,
    password_source,
    pin_option,
    recovery_options,
    token_option,
)
from kryptvault.cli.output import say
from kryptvault.cli.secrets_input import read_new_password, read_secret
from kryptvault.cli.unit_files import default_units_dir, install_user_units, write_text_file
from kryptvault.cli.vault_commands import kdf_options, rewrite_header
from kryptvault.container.header import KIND_TOKEN_PASSWORD, Header, Keyslot
from kryptvault.container.keyslots import new_password_slot
from kryptvault.container.vault import free_slot_index, read_container_header, replace_slot
from kryptvault.crypto.kdf import calibrate
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import Secret, harden_process
from kryptvault.errors import AuthenticationError, KryptvaultError, TokenError, UsageError
from kryptvault.session.unlock import (
    Unlocked,
    fido2_identities,
    slot_identities,
    token_factor,
    unlock_container,
)
from kryptvault.token.base import Token, TokenIdentity, printable
from kryptvault.token.dirtoken import DirectoryToken
from kryptvault.token.discover import discover_usb_sticks
from kryptvault.token.fido2key import Fido2Identity, is_fido2_spec, list_authenticators
from kryptvault.token.resolve import mount_hint, resolve_token
from kryptvault.token.share import SHARE_DIR_NAME, SUFFIX, Share, list_share_uuids, share_path
from kryptvault.token.udev import FIDO2_RULES, render_rules, unit_instance


@cli.group()
def token() -> None:
    """USB tokens: list, add a backup token, remove (revoke) one, udev rules."""


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--vault",
    "vaults_to_check",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="CONTAINER",
    help="Also say which plugged FIDO2 keys hold a credential of this vault (no touch needed).",
)
def token_list(as_json: bool, vaults_to_check: tuple[Path, ...]) -> None:
    """List plugged USB sticks and FIDO2 security keys, and the vaults each one opens."""
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
                "kind": "usb",
                "vendor_id": f"{stick.vendor_id:04x}",
                "product_id": f"{stick.product_id:04x}",
                "serial": stick.serial,
                "manufacturer": stick.manufacturer,
                "product": stick.product,
                "block_devices": blocks,
                "vaults": sorted(vaults),
            }
        )
    _list_fido2(vaults_to_check, records, lines)
    if as_json:
        click.echo(json.dumps(records, indent=2))
    else:
        click.echo("\n".join(lines) if lines else "no USB stick or FIDO2 security key is plugged in")


def _list_fido2(containers: tuple[Path, ...], records: list[dict[str, object]], lines: list[str]) -> None:
    """The plugged FIDO2 keys; for each vault given, whether a key holds one of its
    credentials (an assertion without user presence: no touch, no PIN)."""
    known = []
    for container in containers:
        header = read_container_header(container).header
        known.append((str(header.vault_uuid), list(fido2_identities(header).values())))
    try:
        authenticators = list_authenticators()
    except TokenError as exc:
        lines.append(f"FIDO2 security keys: {exc}")
        return
    for auth in authenticators:
        problem = None
        try:
            opens = sorted(vault for vault, identities in known if any(auth.holds(i) for i in identities))
        except TokenError as exc:
            opens, problem = [], str(exc)
        lines.append(f"FIDO2 key {auth.describe()}")
        if problem is not None:
            lines.append(f"  {problem}")
        elif containers:
            lines.append(f"  holds a credential of: {', '.join(opens) or 'none of the vaults given'}")
        records.append(
            {
                "kind": "fido2",
                "path": auth.path,
                "vendor_id": f"{auth.vendor_id:04x}" if auth.vendor_id is not None else None,
                "product_id": f"{auth.product_id:04x}" if auth.product_id is not None else None,
                "product": auth.product,
                "serial": None,
                "vaults": opens,
                "error": problem,
            }
        )


def _registrations_in(share_dir: Path) -> list[object]:
    return list(list_share_uuids(share_dir)) if share_dir.is_dir() else []


@token.command("add")
@container_argument
@click.option(
    "--new-token",
    "new_token",
    metavar="PATH|auto|SERIAL|fs:UUID",
    help="The token to enrol (e.g. the backup stick's serial). Required.",
)
@token_option()
@click.option("--with-token", "old_token", metavar="PATH|SERIAL|fs:UUID", hidden=True)
@password_options
@recovery_options
@click.option(
    "--new-password",
    "ask_new_password",
    is_flag=True,
    help="Give the new token's slot its own password (default: the same password).",
)
@kdf_options
@click.option("--label", default="backup token", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@pin_option
def token_add(
    container: Path,
    new_token: str | None,
    token_spec: str | None,
    old_token: str | None,
    password_fd: int | None,
    password_file: Path | None,
    recovery: bool,
    recovery_key_file: Path | None,
    ask_new_password: bool,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    label: str,
    as_json: bool,
    pin_file: Path | None,
) -> None:
    """Enrol another token (--new-token) as its own keyslot.

    --new-token fido2 enrols a FIDO2 security key (the plugged one that is not yet
    enrolled, or fido2:/dev/hidrawN): touch it twice, and give its PIN if it has one.

    The vault is opened as every command opens it: with --token (a token already
    registered; default: the plugged one) and the password; the new slot gets the same
    password unless --new-password. With --recovery when no token is left, the password
    then given is the new slot's (asked twice on a terminal).
    """
    new_token, token_spec = _token_add_specs(
        new_token, token_spec, old_token, recovery or recovery_key_file is not None
    )
    unlock = UnlockArgs(
        token_spec=token_spec,
        password_fd=password_fd,
        password_file=password_file,
        recovery=recovery,
        recovery_key_file=recovery_key_file,
        pin_file=pin_file,
    )
    harden_process()
    header = read_container_header(container).header
    if is_fido2_spec(new_token):
        _token_add_fido2(container, header, new_token, unlock, ask_new_password,
                         kdf_time_ms, kdf_memory_mib, label, as_json)
        return
    target = _resolve_new_token(new_token, header.vault_uuid)
    if any(
        ident.matches(target.identity) and ident.kind != "dir" for ident in slot_identities(header).values()
    ):
        raise UsageError(f"{target.identity.describe()} is already registered for this vault")
    if share_path(target.share_dir, header.vault_uuid).exists():
        # Writing the new share over it would lock out the slot that this file opens.
        raise UsageError(
            f"{target.share_dir} already holds a share file of this vault (it is a token of it; "
            "if that token was revoked, delete the file first)"
        )
    with _opened_for_new_slot(container, unlock, "token") as (unlocked, password):
        if unlocked.token is not None and unlocked.token.share_dir == target.share_dir:
            raise UsageError(
                "the --new-token is the token that opened the vault; plug in the other stick "
                "(--token names the registered token, --new-token the one to enrol)"
            )
        index, params, new_password = _new_slot_inputs(
            unlocked, unlock, password, ask_new_password, kdf_time_ms, kdf_memory_mib, "token"
        )
        share = Share.generate(unlocked.vault_uuid, unlocked.share.generation if unlocked.share else 0)
        try:
            target.write_share(share)
            try:
                factor = token_factor(target, share)
                with factor.secret, new_password:
                    slot = new_password_slot(
                        unlocked.vault_uuid, index, unlocked.master, new_password, factor, params, label
                    )
                rewrite_header(unlocked, replace_slot(unlocked.header, index, slot))
            except BaseException:
                share_path(target.share_dir, unlocked.vault_uuid).unlink(missing_ok=True)
                raise
        finally:
            share.wipe()
        vault_uuid = unlocked.vault_uuid
    if as_json:
        record = {
            "vault": str(vault_uuid),
            "container": str(container),
            "slot": index,
            "token": target.identity.describe(),
            "share_dir": str(target.share_dir),
            "label": label,
        }
        click.echo(json.dumps(record))
        return
    say(f"token {target.identity.describe()} added as slot {index}")


@contextlib.contextmanager
def _opened_for_new_slot(
    container: Path, unlock: UnlockArgs, what: str
) -> Iterator[tuple[Unlocked, Secret]]:
    """The vault opened to add a slot, and the password typed for it: opening with the
    recovery key asks the new slot's password (twice) instead of the current one."""
    source = unlock.password_source()
    if unlock.recovery_asker() is not None:
        password = read_new_password(source, f"Password for the new {what}: ")
    else:
        password = read_secret(source, "Password: ")
    with (
        password,
        unlock_container(
            container, token_spec=unlock.token_spec, ask_password=password.copy,
            ask_recovery_key=unlock.recovery_asker(), ask_pin=unlock.pin_asker(),
        ) as unlocked,
    ):
        yield unlocked, password


def _new_slot_inputs(
    unlocked: Unlocked,
    unlock: UnlockArgs,
    password: Secret,
    ask_new_password: bool,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    what: str,
) -> tuple[int, Argon2Params, Secret]:
    """(free slot, KDF parameters, the new slot's password): the opening slot's KDF cost
    unless one was asked for; the password typed to open, unless a new one is wanted."""
    index = free_slot_index(unlocked.header)
    old = unlocked.header.slots[unlocked.slot]
    params = (
        old.kdf
        if old is not None and old.kdf and kdf_time_ms is None and kdf_memory_mib is None
        else calibrate((kdf_time_ms or 1000) / 1000, kdf_memory_mib * 1024 if kdf_memory_mib else None)
    )
    new_password = (
        read_new_password(password_source(None, None), f"Password for the new {what}: ")
        if ask_new_password and unlock.recovery_asker() is None
        else password.copy()
    )
    return index, params, new_password


def _token_add_fido2(
    container: Path,
    header: Header,
    spec: str,
    unlock: UnlockArgs,
    ask_new_password: bool,
    kdf_time_ms: int | None,
    kdf_memory_mib: int | None,
    label: str,
    as_json: bool,
) -> None:
    """Enrol a FIDO2 key: pick it (not one already enrolled) before any password, open
    the vault as usual, then make the credential and seal the new slot with its secret."""
    auth = pick_authenticator(spec, fido2_identities(header).values())
    # Closed while the unlock lists (and talks to) every plugged key, then found again.
    auth.close()
    with _opened_for_new_slot(container, unlock, "security key") as (unlocked, password):
        index, params, new_password = _new_slot_inputs(
            unlocked, unlock, password, ask_new_password, kdf_time_ms, kdf_memory_mib, "security key"
        )
        auth = reopen(auth)
        with new_password:
            factor = enrol_factor(auth, label, unlock.pin_asker())
            with factor.secret:
                slot = new_password_slot(
                    unlocked.vault_uuid, index, unlocked.master, new_password, factor, params, label
                )
        rewrite_header(unlocked, replace_slot(unlocked.header, index, slot))
        vault_uuid = unlocked.vault_uuid
    described = Fido2Identity.decode(slot.token_identity).describe()
    if as_json:
        click.echo(json.dumps({
            "vault": str(vault_uuid), "container": str(container), "slot": index,
            "token": described, "authenticator": auth.describe(), "label": label,
        }))
        return
    say(f"security key {auth.describe()} added as slot {index} ({described})")


def _token_add_specs(
    new_token: str | None, token_spec: str | None, with_token: str | None, recovery: bool
) -> tuple[str, str | None]:
    """(token to enrol, token that opens). `--token` opens, as in every other command.
    The old spellings still work where they cannot be misread: `--token NEW --with-token
    OLD` (--with-token only ever appeared beside the new token's --token), and `--token NEW
    --recovery` (the recovery key opens without a token)."""
    if new_token is None and token_spec is not None and recovery and with_token is None:
        return token_spec, None
    if with_token is not None:
        if new_token is None and token_spec is not None:
            return token_spec, with_token
        if token_spec is not None:
            raise UsageError(
                "give the token that opens the vault once: --token (--with-token is its old name)"
            )
        token_spec = with_token
    if new_token is None:
        raise UsageError(
            "name the token to enrol with --new-token (--token names a token that already opens the vault)"
        )
    return new_token, token_spec


def _resolve_new_token(spec: str, vault_uuid: uuid.UUID) -> Token:
    """The token to enrol; its errors name --new-token, the option it came from."""
    try:
        return resolve_token(spec, vault_uuid=vault_uuid)
    except TokenError as exc:
        raise TokenError(str(exc).replace("--token ", "--new-token ")) from None


def _slot_for(header_slots: dict[int, TokenIdentity], which: str) -> int:
    if which.isdigit():
        return int(which)
    matches = [i for i, ident in header_slots.items() if ident.serial == which or ident.fs_uuid == which]
    if not matches:
        hint = f"; to name the directory token, write ./{printable(which)}" if os.path.isdir(which) else ""
        raise UsageError(f"no keyslot records a token with serial or UUID {printable(which)}{hint}")
    if len(matches) > 1:
        raise UsageError(f"several keyslots record {printable(which)}: name the slot number")
    return matches[0]


def _directory_token(which: str) -> DirectoryToken | None:
    """WHICH as a directory token's path, when it names one (as --token PATH does)."""
    if "/" not in which and not which.startswith((".", "~")):
        return None
    return DirectoryToken(which)


@token.command("remove")
@container_argument
@click.argument("which", metavar="SLOT|SERIAL|PATH")
@token_option()
@password_options
@pin_option
@recovery_options
@pass_unlock_args()
@click.option("--force", is_flag=True, help="Allow removing the last way into the vault.")
def token_remove(
    container: Path,
    which: str,
    unlock: UnlockArgs,
    force: bool,
) -> None:
    """Revoke a token: delete its keyslot, and its share file when the token is reachable.

    WHICH is the slot number, a stick's serial or filesystem UUID, or the path of a
    directory token. --token names a token that opens the vault (default: the plugged
    one; for a directory token given by path: that directory, if no --token).
    """
    harden_process()
    header = read_container_header(container).header
    if len(header.active_slots()) == 1 and not force:
        raise UsageError(
            "that is the last way into the vault: removing it locks the vault forever (use --force)"
        )
    directory = _directory_token(which)
    index = None if directory is not None else _slot_for(slot_identities(header), which)
    if index is not None:
        _check_token_slot(header, index, which)
    ask_recovery = unlock.recovery_asker()
    if directory is not None and ask_recovery is not None:
        raise UsageError(
            "a directory token named by its path is found by opening it with the password; "
            "with --recovery, name its slot number (see 'kryptvault slot list')"
        )
    # Read once, for up to two unlocks (which slot the directory opens; proving access).
    password = read_secret(unlock.password_source(), "Password: ") if directory is not None else None
    try:
        if directory is not None and unlock.token_spec is not None:
            index = _slot_of_directory(container, directory, password, unlock)
        # With a directory and no --token, the directory itself proves access, and the
        # slot it opens is the one to remove.
        spec = str(directory.share_dir) if directory is not None and index is None else unlock.token_spec
        with unlock_container(
            container,
            token_spec=spec,
            ask_password=password.copy if password is not None else unlock.password_asker(),
            ask_recovery_key=ask_recovery,
            ask_pin=unlock.pin_asker(),
        ) as unlocked:
            if index is None:
                index = unlocked.slot
            slot = _check_token_slot(unlocked.header, index, which)
            rewrite_header(unlocked, replace_slot(unlocked.header, index, None))
            deleted, kept = None, None
            if Fido2Identity.recorded(slot.token_identity):
                # Nothing to delete: the credential lives in the key, useless without the slot.
                revoked_name = Fido2Identity.decode(slot.token_identity).describe()
            else:
                revoked = TokenIdentity.decode(slot.token_identity)
                revoked_name = revoked.describe()
                deleted, kept = _delete_revoked_share(revoked, directory, unlocked.vault_uuid)
    finally:
        if password is not None:
            password.wipe()
    say(f"slot {index} ({revoked_name}) removed: that token no longer opens this container.")
    if deleted is not None:
        say(f"deleted its share file {deleted}")
    elif kept is not None:
        say(f"its share file stays on the token ({kept})")
    say(
        "Old header copies (backups, old copies of the container) plus the revoked token and its "
        "password still open the vault (they give its master key) until you run "
        f"'kryptvault rekey {container}'."
    )


def _check_token_slot(header: Header, index: int, which: str) -> Keyslot:
    slot = header.slots[index] if 0 <= index < len(header.slots) else None
    if slot is None or slot.kind != KIND_TOKEN_PASSWORD:
        raise UsageError(f"slot {printable(which)} is not a token keyslot")
    return slot


def _slot_of_directory(
    container: Path, directory: DirectoryToken, password: Secret | None, unlock: UnlockArgs
) -> int:
    """Which keyslot the directory token opens. A directory token's slot records no
    path, so only opening it tells: with the share file there and the password given."""
    assert password is not None
    try:
        with unlock_container(
            container, token_spec=str(directory.share_dir), ask_password=password.copy
        ) as unlocked:
            return unlocked.slot
    except AuthenticationError:
        hint = " (its slot may have another password: name the slot number)" if unlock.token_spec else ""
        raise AuthenticationError(
            f"the directory token {directory.share_dir} does not open this vault with the password given"
            + hint
        ) from None


def _delete_revoked_share(
    revoked: TokenIdentity, directory: DirectoryToken | None, vault_uuid: uuid.UUID
) -> tuple[Path | None, str | None]:
    """The revoked token's share is useless now: delete it (and a rekey's pending one)
    if the token is reachable. Returns (the file deleted, why a share file was kept)."""
    name = f"{vault_uuid}{SUFFIX}"
    if directory is not None:
        token: Token = directory
    elif revoked.kind == "dir":
        return None, f"a directory token is found only by its path: delete {name} there, or name it by path"
    else:
        try:
            token = resolve_token(None, vault_uuid=vault_uuid, identity=revoked)
        except KryptvaultError as exc:
            return None, f"{exc}; delete {name} from it when it is plugged in"
    path = share_path(token.share_dir, vault_uuid)
    try:
        share_path(token.share_dir, vault_uuid, pending=True).unlink(missing_ok=True)
        path.unlink()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot delete {path}: {exc.strerror}"
    return path, None


def udev_rules_for(containers: Sequence[Path]) -> tuple[str, list[tuple[TokenIdentity, uuid.UUID]]]:
    """The rules file for the tokens of these containers, and its (token, vault) entries."""
    entries = []
    fido2_vaults = []
    for container in containers:
        header = read_container_header(container).header
        entries += [(ident, header.vault_uuid) for ident in slot_identities(header).values()]
        if fido2_identities(header):
            fido2_vaults.append(header.vault_uuid)
    return render_rules(entries, fido2_vaults=fido2_vaults), entries


_VAULT_BLOCK = re.compile(r"^# vault ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")
KEPT_HEADER = "\n# Kept from the rules installed before: vaults not named when they were rewritten\n"


def with_other_vaults_kept(rules: str, installed: str, covered: set[uuid.UUID]) -> tuple[str, list[str]]:
    """`rules` plus the installed file's rules for vaults not in `covered`, verbatim (with
    their stick's access rules): there is one rules file, and rewriting it for some vaults
    must not silently drop another vault's lock on unplug. Returns the text and the vaults
    kept. The kept part parses the same way again, so the result is stable."""
    lines = installed.splitlines(keepends=True)
    kept: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(lines):
        found = _VAULT_BLOCK.match(lines[i])
        if found is None or uuid.UUID(found[1]) in covered:
            i += 1
            continue
        block = [lines[i]]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith("#"):
            block.append(lines[i])
            i += 1
        for serial in re.findall(r'ENV\{ID_SERIAL_SHORT\}=="([^"]+)"', "".join(block)):
            marker = f'ATTR{{serial}}=="{serial}"'
            if marker in rules or marker in "".join(out):
                continue
            for j, line in enumerate(lines):
                if marker in line:
                    start = j - 1 if j > 0 and lines[j - 1].startswith("#") else j
                    end = j + 1
                    while end < len(lines) and lines[end].strip() and not lines[end].startswith("#"):
                        end += 1
                    out += lines[start:end]
                    break
        out += block
        if found[1] not in kept:
            kept.append(found[1])
    if not out:
        return rules, []
    fido2 = FIDO2_RULES if FIDO2_RULES.strip() in installed and FIDO2_RULES.strip() not in rules else ""
    return rules.rstrip("\n") + "\n" + KEPT_HEADER + fido2 + "".join(out), kept


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
@click.option(
    "--no-units",
    is_flag=True,
    help="Only the rules (`kryptvault setup` installed the user units as the user).",
)
@click.option(
    "--keep-other-vaults",
    is_flag=True,
    help="Keep the installed rules of vaults whose containers are not given (as `kryptvault setup` does).",
)
@click.option("--dry-run", is_flag=True, help="Print the rules instead of installing them.")
def token_udev(
    containers: tuple[Path, ...],
    rules_dir: Path,
    units_dir: Path | None,
    no_units: bool,
    keep_other_vaults: bool,
    dry_run: bool,
) -> None:
    """Render udev rules (uaccess + lock on removal) for the tokens of CONTAINERS and reload udev."""
    rules, entries = udev_rules_for(containers)
    rules_path = rules_dir / "70-kryptvault.rules"
    if keep_other_vaults:
        try:
            installed = rules_path.read_text()
        except FileNotFoundError:
            installed = ""
        covered = {read_container_header(c).header.vault_uuid for c in containers}
        rules, _ = with_other_vaults_kept(rules, installed, covered)
    if dry_run:
        click.echo(rules, nl=False)
        return
    write_text_file(rules_path, rules)
    units = units_dir or default_units_dir()
    if not no_units:
        install_user_units(units)
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "control", "--reload"], check=False)
    click.echo(f"wrote {rules_path}" + ("" if no_units else f" and the units in {units}"))
    click.echo(f"instances: {', '.join(unit_instance(v) for _, v in entries) or 'none'}")
