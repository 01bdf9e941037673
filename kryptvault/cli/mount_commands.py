"""Mounting and locking: mount, umount, lock, status."""

from __future__ import annotations

import itertools
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from kryptvault.cli.app import cli
from kryptvault.cli.options import UnlockArgs, container_argument, unlock_options
from kryptvault.container.vault import read_container_header, store_keys
from kryptvault.crypto.secret import harden_process
from kryptvault.errors import AuthenticationError, KryptvaultError, TokenError, UsageError
from kryptvault.session import fusectl
from kryptvault.session.audit import AuditLog, Backoff, read_entries
from kryptvault.session.control import ControlClient, list_sockets
from kryptvault.session.handoff import SessionSettings
from kryptvault.session.launcher import start_daemon
from kryptvault.session.mount_session import run_daemon
from kryptvault.session.unlock import find_token, unlock_container

SPINNER = "|/-\\"


def _prepare_mountpoint(mountpoint: Path) -> None:
    if fusectl.clean_stale_mount(mountpoint):
        click.echo(f"cleaned a dead mount left at {mountpoint} by a killed daemon", err=True)
    if not mountpoint.is_dir():
        raise UsageError(f"the mount point {mountpoint} is not a directory")
    if fusectl.is_mounted(mountpoint):
        raise KryptvaultError(f"{mountpoint} is already a mount point")


def _wait_for_token(container: Path, token_spec: str | None) -> None:
    header = read_container_header(container).header
    tty = sys.stderr.isatty()
    for frame in itertools.cycle(SPINNER):
        try:
            find_token(header, token_spec)
            if tty:
                click.echo("\r" + " " * 40 + "\r", nl=False, err=True)
            return
        except TokenError as exc:
            if tty:
                click.echo(f"\r{frame} waiting for the token… ({exc})"[:78], nl=False, err=True)
        time.sleep(0.25)


@cli.command()
@container_argument
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@unlock_options
@click.option("--foreground", is_flag=True, help="Stay attached (for debugging); Ctrl-C locks.")
@click.option("--allow-other", is_flag=True, help="Let other users see the files (needs user_allow_other).")
@click.option(
    "--accept-rollback",
    is_flag=True,
    help="Open a container older than its token has seen (after restoring a backup on purpose).",
)
@click.option(
    "--idle-lock",
    "idle_lock",
    type=click.FloatRange(min=0.1),
    metavar="MINUTES",
    help="Lock after this many minutes without file activity.",
)
@click.option(
    "--lock-deadline-ms",
    type=click.IntRange(10, 60000),
    default=200,
    show_default=True,
    help="How long a lock waits for the final commit before it takes the mount away.",
)
@click.option("--wait", "wait_for_token", is_flag=True, help="Wait for the token to be plugged in.")
def mount(
    container: Path,
    mountpoint: Path,
    unlock: UnlockArgs,
    foreground: bool,
    allow_other: bool,
    accept_rollback: bool,
    idle_lock: float | None,
    lock_deadline_ms: int,
    wait_for_token: bool,
) -> None:
    """Unlock CONTAINER and mount it on MOUNTPOINT; returns once the mount is ready."""
    harden_process()
    container = container.resolve()
    mountpoint = mountpoint.resolve()
    _prepare_mountpoint(mountpoint)
    ask_recovery = unlock.recovery_asker()
    if wait_for_token and ask_recovery is None:
        _wait_for_token(container, unlock.token_spec)
    header = read_container_header(container).header
    vault = str(header.vault_uuid)
    audit = AuditLog()
    backoff = Backoff()
    delay = backoff.delay_for(header.vault_uuid)
    if delay > 0:
        click.echo(f"waiting {delay:.0f} s after recent failed attempts…", err=True)
        time.sleep(delay)
    ask_password = unlock.password_asker()
    try:
        unlocked = unlock_container(
            container,
            token_spec=unlock.token_spec,
            ask_password=ask_password,
            ask_recovery_key=ask_recovery,
        )
    except AuthenticationError:
        backoff.record_failure(header.vault_uuid)
        audit.append(
            "unlock_failed",
            vault=vault,
            container=str(container),
            method="recovery" if ask_recovery else "token+password",
        )
        raise
    with unlocked:
        backoff.record_success(header.vault_uuid)
        audit.append("unlock_ok", vault=vault, slot=unlocked.slot, container=str(container))
        token: dict[str, object] = {}
        if unlocked.token is not None and unlocked.share is not None:
            identity = unlocked.token.identity
            spec = (
                str(unlocked.token.share_dir)
                if identity.kind == "dir"
                else (f"fs:{identity.fs_uuid}" if identity.kind == "fs" else str(identity.serial))
            )
            token = {
                "spec": spec,
                "generation": unlocked.share.generation,
                "accept_rollback": accept_rollback,
                "identity": identity.describe(),
            }
        settings = SessionSettings(
            container=str(container),
            mountpoint=str(mountpoint),
            vault_uuid=vault,
            block_size=header.layout.block_size,
            allow_other=allow_other,
            lock_deadline_ms=lock_deadline_ms,
            idle_lock_minutes=idle_lock,
            token=token,
            slot=unlocked.slot,
        )
        keys = store_keys(unlocked.master, header.vault_uuid)
    if foreground:

        def report(message: str) -> None:
            if message == "ok":
                click.echo(f"mounted vault {vault} on {mountpoint}; Ctrl-C locks", err=True)
            else:
                click.echo(f"kryptvault: {message.removeprefix('error: ')}", err=True)

        sys.exit(run_daemon(settings, keys.data, keys.meta, report))
    try:
        pid = start_daemon(settings, keys.data, keys.meta)
    finally:
        keys.wipe()
    click.echo(f"mounted vault {vault} on {mountpoint} (daemon pid {pid})")


def _statuses() -> list[tuple[ControlClient, dict[str, object]]]:
    found = []
    for path in list_sockets():
        client = ControlClient(path)
        try:
            found.append((client, client.request("status")))
        except KryptvaultError:
            continue
    return found


def _lock_targets(
    target: str | None, all_vaults: bool, vault: str | None
) -> list[tuple[ControlClient, dict[str, object]]]:
    statuses = _statuses()
    if all_vaults:
        return statuses
    if vault:
        try:
            wanted = str(uuid.UUID(vault))
        except ValueError:
            raise UsageError(f"not a vault UUID: {vault}")
        return [(c, s) for c, s in statuses if s.get("vault") == wanted]
    if target is None:
        raise UsageError("name a mount point, --vault UUID or --all")
    path = str(Path(target).resolve())
    return [(c, s) for c, s in statuses if s.get("mountpoint") == path or s.get("container") == path]


def _lock(target: str | None, all_vaults: bool, vault: str | None, reason: str) -> None:
    targets = _lock_targets(target, all_vaults, vault)
    if not targets:
        if target and fusectl.clean_stale_mount(Path(target)):
            click.echo(f"removed the dead mount at {target} (its daemon had been killed)")
            return
        if all_vaults:
            click.echo("no vault is mounted")
            return
        raise KryptvaultError(f"no mounted vault at {target or vault}")
    for client, status in targets:
        mountpoint = Path(str(status["mountpoint"]))
        client.request("lock", reason=reason)
        deadline = time.monotonic() + 15
        while fusectl.is_mounted(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = status.get("pid")
        while isinstance(pid, int) and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if fusectl.is_mounted(mountpoint):
            raise KryptvaultError(f"{mountpoint} did not unmount")
        click.echo(f"locked vault {status['vault']} ({mountpoint})")


def _alive(pid: int) -> bool:
    """Whether the daemon still runs. An exited process waits as a zombie until its parent
    (here usually init) reaps it; its memory, and with it the keys, is already gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2 :].split(" ", 1)[0]
    return state not in ("Z", "X")


@cli.command()
@click.argument("target", required=False, metavar="[MOUNTPOINT|CONTAINER]")
@click.option("--all", "all_vaults", is_flag=True, help="Lock every mounted vault.")
@click.option("--vault", metavar="UUID", help="Lock the vault with this UUID (dashes optional).")
@click.option("--reason", default="command", hidden=True)
def lock(target: str | None, all_vaults: bool, vault: str | None, reason: str) -> None:
    """Lock a mounted vault now: commit, unmount, wipe the keys."""
    _lock(target, all_vaults, vault, reason)


@cli.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
def umount(mountpoint: Path) -> None:
    """Commit and unmount (the same as `lock MOUNTPOINT`)."""
    _lock(str(mountpoint), False, None, "command")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """List mounted vaults (token, uptime, last commit, unsaved bytes) and the last backups."""
    statuses = [s for _, s in _statuses()]
    backups = _last_backups()
    if as_json:
        for mounted in statuses:
            mounted["last_backups"] = [b for b in backups if b.get("vault") == mounted.get("vault")]
        click.echo(json.dumps(statuses, indent=2))
        return
    if not statuses:
        click.echo("no vault is mounted")
    for s in statuses:
        click.echo(f"{s['vault']} on {s['mountpoint']} (pid {s['pid']}, up {s['uptime_seconds']} s)")
        click.echo(
            f"  token: {s['token']}; generation {s['generation']}; unsaved {s['dirty_bytes']} bytes; "
            f"last commit {s['last_commit_age_seconds']} s ago"
        )
    for entry in backups:
        where = entry.get("dest") or entry.get("backup") or ""
        detail = entry.get("error") or (f"version {entry['version']}" if "version" in entry else "")
        click.echo(
            f"last backup of {entry['vault']} to {where}: {entry['event'].removeprefix('backup_')} "
            f"at {entry['ts']} {detail}".rstrip()
        )


def _last_backups() -> list[dict[str, Any]]:
    """The newest backup outcome per vault and destination, from the audit log."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in read_entries(AuditLog().path):
        if entry.get("event") in ("backup_done", "backup_failed", "backup_skipped"):
            key = (str(entry.get("vault")), str(entry.get("dest") or entry.get("backup")))
            newest[key] = entry
    return list(newest.values())
