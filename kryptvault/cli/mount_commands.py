"""Mounting and locking: mount, umount, lock, status."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kryptvault.cli.app import cli
from kryptvault.cli.options import UnlockArgs, container_argument, unlock_options
from kryptvault.cli.output import say
from kryptvault.container.vault import read_container_header, store_keys
from kryptvault.crypto.secret import harden_process
from kryptvault.errors import KryptvaultError, TokenError, UsageError
from kryptvault.session import fusectl
from kryptvault.session.audit import AuditLog, read_entries
from kryptvault.session.config import load_vault_prefs
from kryptvault.session.control import (
    ControlClient,
    DaemonNotRunningError,
    ForeignServerError,
    NoAnswerError,
    check_socket_path,
    daemon_socket_for,
    list_sockets,
    recorded_mountpoints,
)
from kryptvault.session.handoff import SessionSettings
from kryptvault.session.launcher import start_daemon
from kryptvault.session.mount_session import run_daemon
from kryptvault.session.rollback import mount_warnings
from kryptvault.session.unlock import fido2_identities, find_token, slot_identities, unlock_container
from kryptvault.token.fido2key import authenticators_for, find_holder, is_fido2_spec

SPINNER = "|/-\\"


def _prepare_mountpoint(mountpoint: Path, nonempty: bool = False) -> None:
    if fusectl.clean_stale_mount(mountpoint):
        click.echo(f"cleaned a dead mount left at {mountpoint} by a killed daemon", err=True)
    if not mountpoint.exists() and not mountpoint.is_symlink():
        raise UsageError(f"the mount point {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise UsageError(f"the mount point {mountpoint} is not a directory")
    if fusectl.is_mounted(mountpoint):
        raise KryptvaultError(f"{mountpoint} is already a mount point")
    if not nonempty and _has_entries(mountpoint):
        # The mount would hide these files until the lock: easy to miss, and files
        # written "into the vault" meanwhile could in fact land next to it.
        raise UsageError(
            f"the mount point {mountpoint} is not empty; choose an empty folder "
            "(or pass --nonempty to hide its files while the vault is mounted)"
        )


def _has_entries(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError as exc:
        raise UsageError(f"cannot read the mount point {directory}: {exc.strerror}")


def _refuse_second_mount(container: Path) -> None:
    """Before the password is asked: the daemon could not start anyway when this container
    file is mounted. Copies of it (same UUID) may mount beside it, each with a control
    socket of its own; a second writable mount of one lineage is refused by the daemon
    (the lineage is in the encrypted commit record, known only once unlocked)."""
    try:
        vault_uuid = read_container_header(container).header.vault_uuid
    except KryptvaultError:
        return  # unlocking says what is wrong with the container
    own = daemon_socket_for(vault_uuid, container)
    if own is not None:
        check_socket_path(own)
    same = _same_file_test(container)
    for _, status in _statuses():
        if status.get("vault") == str(vault_uuid) and same(str(status.get("container"))):
            raise KryptvaultError(
                f"{container} is already mounted on {status.get('mountpoint')} "
                "(a container file mounts once; a copy of it may mount beside it)"
            )


def _same_file_test(container: Path) -> Callable[[str], bool]:
    try:
        info = os.stat(container)
    except OSError:
        return lambda other: other == str(container)

    def same(other: str) -> bool:
        try:
            found = os.stat(other)
        except OSError:
            return other == str(container)
        return (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino)

    return same


def _wait_for_token(container: Path, token_spec: str | None) -> None:
    header = read_container_header(container, allow_disagreement=True).header
    tty = sys.stderr.isatty()
    keys = list(fido2_identities(header).values())
    by_key = bool(keys) and (is_fido2_spec(token_spec) or not token_spec)
    for frame in itertools.cycle(SPINNER):
        try:
            # A plugged key that holds a credential (asked without a touch) will do; else,
            # for a vault with stick slots too, its stick.
            if by_key and find_holder(authenticators_for(token_spec), keys) is not None:
                pass
            elif by_key and (token_spec or not slot_identities(header)):
                raise TokenError("no plugged security key holds a credential of this vault")
            else:
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
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path), required=False)
@unlock_options
@click.option("--foreground", is_flag=True, help="Stay attached (for debugging); Ctrl-C locks.")
@click.option("--allow-other", is_flag=True, help="Let other users see the files (needs user_allow_other).")
@click.option(
    "--accept-rollback",
    is_flag=True,
    help="Open a container older than its token has seen; a writable mount forks it into a new lineage.",
)
@click.option(
    "--read-only",
    "read_only",
    is_flag=True,
    help="Mount read-only: no writes, the container file is never modified, no rollback record is written.",
)
@click.option(
    "--accept-lost-commit",
    is_flag=True,
    help="Mount writable although the newest commit record is damaged (its changes are lost).",
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
@click.option("--nonempty", is_flag=True, help="Mount on a folder that has files (hidden while mounted).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the result as one JSON object (not with --foreground)."
)
def mount(
    container: Path,
    mountpoint: Path | None,
    unlock: UnlockArgs,
    foreground: bool,
    allow_other: bool,
    accept_rollback: bool,
    read_only: bool,
    accept_lost_commit: bool,
    idle_lock: float | None,
    lock_deadline_ms: int,
    wait_for_token: bool,
    nonempty: bool,
    as_json: bool,
) -> None:
    """Unlock CONTAINER and mount it on MOUNTPOINT (default: the one `kryptvault setup`
    wrote); returns once the mount is ready."""
    if as_json and foreground:
        raise UsageError("--json reports a mount that returns: it does not go with --foreground")
    harden_process()
    container = container.resolve()
    try:
        prefs = load_vault_prefs(container=container)
    except UsageError as exc:
        if mountpoint is None:
            raise
        # As for automatic backups: a broken config file does not stop a mount.
        click.echo(f"warning: {exc}; the vault's desktop settings are ignored", err=True)
        prefs = None
    if mountpoint is None:
        if prefs is None or prefs.mountpoint is None:
            raise UsageError("missing MOUNTPOINT (or set one with `kryptvault setup CONTAINER`)")
        mountpoint = prefs.mountpoint
    if idle_lock is None and prefs is not None and prefs.idle_minutes:
        idle_lock = prefs.idle_minutes
    mountpoint = mountpoint.resolve()
    _prepare_mountpoint(mountpoint, nonempty)
    _refuse_second_mount(container)
    ask_recovery = unlock.recovery_asker()
    if wait_for_token and ask_recovery is None:
        _wait_for_token(container, unlock.token_spec)
    # Back-off, audit entries and the fallback to the other header copy happen in
    # unlock_container, for every command that unlocks.
    unlocked = unlock_container(
        container,
        token_spec=unlock.token_spec,
        ask_password=unlock.password_asker(),
        ask_recovery_key=ask_recovery,
        ask_pin=unlock.pin_asker(),
    )
    with unlocked:
        header = unlocked.header  # the copy that authenticated, not merely the newest-looking
        vault = str(header.vault_uuid)
        note = unlocked.read.damage_note()
        if note:
            click.echo(f"warning: {note}; 'kryptvault fsck --repair' rewrites it", err=True)
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
        elif unlocked.fido2 is not None and unlocked.authenticator is not None:
            # The daemon watches the key's hidraw node; the rollback record stays on this
            # machine (the key has no room for one): token/fido2token.py.
            token = {
                "spec": f"fido2:{unlocked.authenticator.path}",
                "generation": 0,
                "accept_rollback": accept_rollback,
                "identity": unlocked.fido2.describe(),
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
            read_only=read_only,
            accept_lost_commit=accept_lost_commit,
        )
        keys = store_keys(unlocked.master, header.vault_uuid)
        try:
            warnings = mount_warnings(
                container, header.layout, header.vault_uuid, keys.meta,
                with_token=bool(token), read_only=read_only,
            )
        except BaseException:
            keys.wipe()
            raise
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
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
    if as_json:
        record = {
            "vault": vault,
            "container": str(container),
            "mountpoint": str(mountpoint),
            "pid": pid,
            "read_only": read_only,
            "warnings": warnings,
        }
        click.echo(json.dumps(record))
        return
    say(f"mounted vault {vault} on {mountpoint} (daemon pid {pid})")


def _statuses() -> list[tuple[ControlClient, dict[str, object]]]:
    found = []
    for path in list_sockets():
        client = ControlClient(path)
        try:
            found.append((client, client.request("status")))
        except ForeignServerError as exc:
            click.echo(f"kryptvault: warning: {exc}", err=True)
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


def _lock(
    target: str | None,
    all_vaults: bool,
    vault: str | None,
    reason: str,
    as_json: bool = False,
    if_mounted: bool = False,
) -> None:
    locked: list[dict[str, object]] = []
    tell = (lambda text: None) if as_json else say
    try:
        _lock_each(target, all_vaults, vault, reason, locked, tell, if_mounted)
    finally:
        if as_json and locked:
            click.echo(json.dumps({"locked": locked}))  # even if a later one failed: these did lock
    if as_json and not locked:
        click.echo(json.dumps({"locked": []}))


def _lock_each(
    target: str | None,
    all_vaults: bool,
    vault: str | None,
    reason: str,
    locked: list[dict[str, object]],
    tell: Callable[[str], None],
    if_mounted: bool = False,
) -> None:
    """Lock the targets; each one locked goes into `locked` and is told as it happens.
    `if_mounted`: nothing to lock is success (the unplug unit, whose vault has usually
    locked itself already when it runs)."""

    def done(text: str, **record: object) -> None:
        locked.append(record)
        tell(text)

    targets = _lock_targets(target, all_vaults, vault)
    if not targets:
        if target and fusectl.clean_stale_mount(Path(target)):
            done(
                f"removed the dead mount at {target} (its daemon had been killed)",
                vault=None, mountpoint=str(Path(target).resolve()), dead_mount_removed=True,
            )
            return
        if all_vaults:
            tell("no vault is mounted")
            return
        if if_mounted:
            tell(f"vault {target or vault} is not mounted: nothing to lock")
            return
        raise KryptvaultError(f"no mounted vault at {target or vault}")
    unsaved: list[str] = []  # locked, but the final commit failed: said once, at the end
    for client, status in targets:
        mountpoint = Path(str(status["mountpoint"]))
        pid = status.get("pid")
        answered = True
        try:
            client.request("lock", reason=reason)
        except (NoAnswerError, DaemonNotRunningError):
            # It answered `status` a moment ago: since then it either locked (another
            # route fired at the same time) or died. What is left tells which.
            answered = False
        _wait_until_locked(mountpoint, pid if isinstance(pid, int) else None)
        if not answered:
            _confirm_unanswered_lock(mountpoint, pid if isinstance(pid, int) else None)
        elif fusectl.is_mounted(mountpoint):
            raise KryptvaultError(f"{mountpoint} did not unmount")
        lost = _unsaved_at_lock(status)
        if lost is not None:
            unsaved.append(lost)
            continue
        unanswered = "" if answered else " (the daemon exited before answering)"
        done(
            f"locked vault {status['vault']} ({mountpoint}){unanswered}",
            vault=status["vault"], mountpoint=str(mountpoint), answered=answered,
        )
    if unsaved:
        raise KryptvaultError("; ".join(unsaved))


def _unsaved_at_lock(status: dict[str, object], timeout: float = 75.0) -> str | None:
    """What the lock of this daemon could not save, as one line, or None if its final
    commit succeeded. The daemon's own lock entry in the audit log tells (it writes it
    before it exits; a late commit can take up to a minute): the lock's answer is sent
    before the lock runs, so it cannot."""
    pid = status.get("pid")
    where = f"locked vault {status['vault']} ({status['mountpoint']})"
    deadline = time.monotonic() + timeout
    # Entries since this daemon started: an older daemon may have had the same pid.
    uptime = status.get("uptime_seconds")
    since = (
        datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=uptime + 5)
        if isinstance(uptime, int | float) else None
    )
    while True:
        alive = isinstance(pid, int) and _alive(pid)
        entry = None
        for found in read_entries(AuditLog().path, vault=str(status.get("vault")), since=since):
            if found.get("event") == "lock" and found.get("pid") == pid:
                entry = found
        if entry is not None:
            break
        if not alive or time.monotonic() > deadline:
            return (f"{where}, but whether everything was saved is unknown: "
                    "its lock entry is missing from the audit log")
        time.sleep(0.1)
    error = entry.get("error")
    if not error:
        return None
    lost = entry.get("unsaved_bytes")
    amount = f"{lost / 2**20:.1f} MiB" if isinstance(lost, int) else "what was"
    return f"{where}, but {amount} accepted since the last commit could not be saved: {error}"


def _wait_until_locked(mountpoint: Path, pid: int | None, timeout: float = 15.0) -> None:
    """Until the mount is gone and the daemon has exited, at most `timeout` seconds. A
    daemon gone with its mount still there left a dead mount: that will not change."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = pid is not None and _alive(pid)
        mounted = fusectl.is_mounted(mountpoint)
        if not alive and (not mounted or pid is not None):
            return
        time.sleep(0.02)


def _confirm_unanswered_lock(mountpoint: Path, pid: int | None) -> None:
    """Success without an answer only if the lock's effects are all there: the mount gone
    and the key-holding process ended."""
    if fusectl.is_mounted(mountpoint):
        dead = pid is not None and not _alive(pid)
        raise KryptvaultError(
            f"the daemon of {mountpoint} ended without answering and without locking; "
            + (
                f"it left a dead mount there (`kryptvault lock {mountpoint}` removes it)"
                if dead
                else "the vault is still mounted"
            )
        )
    if pid is None or _alive(pid):
        raise KryptvaultError(
            f"the daemon of {mountpoint} did not answer the lock and has not exited"
            + (f" (pid {pid})" if pid is not None else "")
            + "; its mount is gone"
        )


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
@click.option("--json", "as_json", is_flag=True, help='Print {"locked": [...]} as one JSON object.')
@click.option("--if-mounted", is_flag=True,
              help="Succeed when the vault is not mounted (already locked) instead of failing.")
def lock(
    target: str | None, all_vaults: bool, vault: str | None, reason: str, as_json: bool, if_mounted: bool
) -> None:
    """Lock a mounted vault now: commit, unmount, wipe the keys."""
    _lock(target, all_vaults, vault, reason, as_json, if_mounted)


@cli.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
def umount(mountpoint: Path) -> None:
    """Commit and unmount (the same as `lock MOUNTPOINT`)."""
    _lock(str(mountpoint), False, None, "command")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """List this session's mounted vaults (token, uptime, last commit, unsaved bytes), the dead
    mounts its killed daemons left, and the last backups."""
    statuses = [s for _, s in _statuses()]
    dead = fusectl.dead_mounts(
        among=recorded_mountpoints(), exclude=[str(s.get("mountpoint")) for s in statuses]
    )
    backups = _last_backups()
    if as_json:
        for mounted in statuses:
            mounted["last_backups"] = [b for b in backups if b.get("vault") == mounted.get("vault")]
            mounted["dead"] = False
            # Not the control protocol's "the daemon answered": whether the vault is well,
            # i.e. can save what it accepts ("problem" says why not).
            mounted["ok"] = not mounted.get("problem")
        click.echo(json.dumps(statuses + [_dead_entry(d) for d in dead], indent=2))
        return
    if not statuses and not dead:
        click.echo("no vault is mounted")
    for d in dead:
        click.echo(
            f"dead mount of vault {_short_vault(d)}… on {d.mountpoint} (its daemon was killed; "
            f"the files are unreachable): `kryptvault lock {shlex.quote(d.mountpoint)}` removes it"
        )
    for s in statuses:
        ro = ", read-only" if s.get("read_only") else ""
        if s.get("lineage") not in (None, "original"):
            ro += f", fork {s['lineage']}"  # a copy of the vault with a history of its own
        click.echo(f"{s['vault']} on {s['mountpoint']} (pid {s['pid']}, up {s['uptime_seconds']} s{ro})")
        click.echo(
            f"  token: {s['token']}; generation {s['generation']}; unsaved {s['dirty_bytes']} bytes; "
            f"last commit {s['last_commit_age_seconds']} s ago"
        )
        if s.get("problem"):
            click.echo(
                f"  NOT OK: changes cannot be saved ({s['problem']}); {s['dirty_bytes']} bytes "
                "accepted since the last commit are unsaved and the vault refuses changes "
                "until a commit succeeds"
            )
    for entry in backups:
        where = entry.get("dest") or entry.get("backup") or ""
        detail = entry.get("error") or (f"version {entry['version']}" if "version" in entry else "")
        click.echo(
            f"last backup of {entry['vault']} to {where}: {entry['event'].removeprefix('backup_')} "
            f"at {entry['ts']} {detail}".rstrip()
        )


def _short_vault(dead: fusectl.DeadMount) -> str:
    return dead.fsname.removeprefix("kryptvault:")


def _dead_entry(dead: fusectl.DeadMount) -> dict[str, object]:
    """A dead mount in `status --json`: the keys of a live one (unknown ones null) and
    "dead": true. Only the first 8 hex digits of the vault UUID are in the mount table."""
    return {
        "vault": None,
        "vault_prefix": _short_vault(dead),
        "container": None,
        "mountpoint": dead.mountpoint,
        "pid": None,
        "dead": True,
    }


def _last_backups() -> list[dict[str, Any]]:
    """The newest backup outcome per vault and destination, from the audit log."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in read_entries(AuditLog().path):
        if entry.get("event") in ("backup_done", "backup_failed", "backup_skipped"):
            key = (str(entry.get("vault")), str(entry.get("dest") or entry.get("backup")))
            newest[key] = entry
    return list(newest.values())
