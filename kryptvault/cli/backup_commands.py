"""Backup commands: backup (run, list), verify, restore (docs/BACKUP.md)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kryptvault.backup.engine import DEFAULT_KEEP, STRATEGIES, run_backup
from kryptvault.backup.remote import RemoteRestoreResult
from kryptvault.backup.restore import RestoreResult, reading_set, run_restore
from kryptvault.backup.setdir import describe_versions
from kryptvault.backup.transport import is_remote
from kryptvault.backup.verify import verify_blocks, verify_set
from kryptvault.cli.app import cli
from kryptvault.cli.options import UnlockArgs, container_argument, unlock_options
from kryptvault.cli.progress import Progress
from kryptvault.cli.units import human_size
from kryptvault.container.vault import read_container_header
from kryptvault.crypto.secret import harden_process
from kryptvault.errors import IntegrityError, KryptvaultError, UsageError
from kryptvault.session.audit import AuditLog

if TYPE_CHECKING:
    from kryptvault.backup.auto import AutoOutcome

dest_argument = click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
backup_argument = click.argument("backup", type=click.Path(file_okay=False, path_type=Path))
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output, no progress bar."
)


human = human_size


def _audit(event: str, vault: str | None, **fields: object) -> None:
    """Best effort: the audit log never changes a backup's outcome or output."""
    with contextlib.suppress(Exception), AuditLog() as log:
        log.append(event, vault=vault, **fields)


def _vault_of(container: Path) -> str | None:
    with contextlib.suppress(Exception):
        return str(read_container_header(container).header.vault_uuid)
    return None


class BackupGroup(click.Group):
    """`kryptvault backup CONTAINER DEST` runs `backup run CONTAINER DEST`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=BackupGroup)
def backup() -> None:
    """Back a vault's container up into DEST, or list the versions kept there.

    \b
    kryptvault backup CONTAINER DEST [--keep N]   (same as: backup run ...)
    kryptvault backup list DEST

    No key is needed: the container stays encrypted, and later backups copy only what
    changed since the last one (the container's change tables say where). DEST gets one
    directory per vault holding current.kv, a plain container of the newest version,
    plus increments that rebuild the older versions (see 'kryptvault restore').

    DEST may be rclone:REMOTE:path, any remote configured in rclone (S3, B2, WebDAV,
    SFTP, ...): the container goes there in write-once 1 MiB chunks named by their
    hash, and each backup uploads only the chunks the remote lacks (docs/BACKUP.md §12).
    """


@backup.command("run")
@container_argument
@dest_argument
@click.option(
    "--keep",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_KEEP,
    show_default=True,
    help="Versions to keep (the newest plus N-1 older ones).",
)
@click.option(
    "--full",
    "rescan",
    is_flag=True,
    help="Read and compare the whole container instead of trusting its change tables; "
    "also lets a container restored over the vault continue the vault's backup set "
    "(a container with another history is otherwise refused).",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="auto",
    show_default=True,
    help="How current.kv is updated: clone it (reflink) when DEST can, else patch it in place; "
    "'copy' always copies it first.",
)
@json_option
def backup_run(container: Path, dest: Path, keep: int, rescan: bool, strategy: str, as_json: bool) -> None:
    """Back CONTAINER up into DEST (the first time in full, then only what changed).

    The container must not be mounted, unless its mount daemon offers a live backup.
    """
    if is_remote(dest):
        if strategy != "auto":
            raise UsageError("--strategy applies to directory destinations, not to rclone remotes")
        _backup_remote(container, os.fspath(dest), keep, rescan, as_json)
        return
    vault = _vault_of(container)
    _audit("backup_started", vault, container=container.absolute(), dest=dest.absolute())
    bar = Progress("backup", not as_json)
    try:
        result = run_backup(container, dest, keep=keep, rescan=rescan, strategy=strategy, progress=bar)
    except BaseException as exc:
        _audit(
            "backup_failed",
            vault,
            container=container.absolute(),
            dest=dest.absolute(),
            error=" ".join(str(exc).split()) or type(exc).__name__,
        )
        raise
    finally:
        bar.finish()
    _audit(
        "backup_done",
        vault,
        container=container.absolute(),
        backup=result.set_path.absolute(),
        version=result.version,
        method=result.method,
        live=result.live,
        source_bytes_read=result.source_bytes_read,
        bytes_written=result.bytes_written,
        seconds=round(result.seconds, 3),
    )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    how = result.method if result.method == "full" else f"{result.method}, {result.strategy}"
    live = ", live" if result.live else ""
    click.echo(f"backed up vault {result.vault_uuid} as version {result.version} ({how}{live})")
    click.echo(
        f"  read {human(result.source_bytes_read)} of the {human(result.container_size)} container, "
        f"wrote {human(result.bytes_written)} in {result.seconds:.2f} s"
    )
    for note in result.notes:
        click.echo(f"  note: {note}")
    kept = result.versions
    versions = f"versions {kept[0]}..{kept[-1]}" if len(kept) > 1 else f"version {kept[0]}"
    removed = f" (removed {', '.join(map(str, result.pruned))})" if result.pruned else ""
    click.echo(f"  {result.set_path}: {versions}{removed}")


def _backup_remote(container: Path, dest: str, keep: int, replace_history: bool, as_json: bool) -> None:
    from kryptvault.backup.remote import run_remote_backup

    vault = _vault_of(container)
    _audit("backup_started", vault, container=container.absolute(), dest=dest)
    bar = Progress("backup", not as_json)

    def chunks(done: int, new: int, total: int) -> None:
        bar.detail = f"chunks {done}/{total}, {new} to upload"

    try:
        result = run_remote_backup(
            container, dest, keep=keep, progress=bar, replace_history=replace_history, on_chunks=chunks
        )
    except BaseException as exc:
        _audit("backup_failed", vault, container=container.absolute(), dest=dest,
               error=" ".join(str(exc).split()) or type(exc).__name__)
        raise
    finally:
        bar.finish()
    _audit("backup_done", vault, container=container.absolute(), dest=dest, backup=result.set_display,
           version=result.version, method=result.method, live=result.live,
           source_bytes_read=result.source_bytes_read, bytes_written=result.bytes_uploaded,
           seconds=round(result.seconds, 3))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    live = ", live" if result.live else ""
    click.echo(f"backed up vault {result.vault_uuid} as version {result.version} (write-once chunks{live})")
    click.echo(
        f"  read {human(result.source_bytes_read)} of the {human(result.container_size)} container; "
        f"uploaded {result.chunks_uploaded} of {result.chunks_total} chunks "
        f"({human(result.bytes_uploaded)}) in {result.seconds:.2f} s"
    )
    for note in result.notes:
        click.echo(f"  note: {note}")
    kept = result.versions
    versions = f"versions {kept[0]}..{kept[-1]}" if len(kept) > 1 else f"version {kept[0]}"
    removed = f" (removed {', '.join(map(str, result.pruned))}, {result.chunks_pruned} chunks)" \
        if result.pruned or result.chunks_pruned else ""
    click.echo(f"  {result.set_display}: {versions}{removed}")


@backup.command("auto")
@container_argument
@click.option(
    "--after-lock",
    is_flag=True,
    help="Started by the mount daemon after a lock: wait for it "
    "to let go of the container, and do nothing if after_lock = false.",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(0, 3600),
    default=60.0,
    show_default=True,
    help="How long to wait for the container to be free.",
)
def backup_auto(container: Path, after_lock: bool, wait_seconds: float) -> None:
    """Back CONTAINER up to every reachable destination of the config file.

    The destinations and retention live in $XDG_CONFIG_HOME/kryptvault/config.toml
    (see docs/BACKUP.md, "Automatic backups"); scripts/systemd has a timer for this.
    """
    from kryptvault.backup.auto import run_auto_backup, wait_until_unmounted
    from kryptvault.session.config import config_path, load_config

    header = read_container_header(container).header
    config = load_config(header.vault_uuid)
    if after_lock and not config.after_lock:
        return
    # After a lock the user has just seen "Vault locked" and expects to hear how the backup
    # went; a timer's run reports only a failure, and only when no terminal shows it.
    notify = after_lock or not sys.stderr.isatty()
    try:
        if not config.destinations:
            raise UsageError(f"no backup destinations are configured in {config_path()}")
        if after_lock:
            wait_until_unmounted(container, wait_seconds)
        with AuditLog() as audit:
            outcomes = run_auto_backup(container.absolute(), header.vault_uuid, config, audit)
    except (KryptvaultError, OSError) as exc:
        if notify:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _notify_backup(header.vault_uuid.hex[:8], [], container, failure=reason)
        raise
    for outcome in outcomes:
        click.echo(
            f"{outcome.destination}: {outcome.status}" + (f" ({outcome.detail})" if outcome.detail else "")
        )
    failed = any(o.status == "failed" for o in outcomes)
    if after_lock or (notify and failed):
        _notify_backup(header.vault_uuid.hex[:8], outcomes, container)
    if failed:
        sys.exit(1)


def _notify_backup(
    label: str, outcomes: Sequence[AutoOutcome], container: Path, failure: str | None = None
) -> None:
    """"Backup finished" / "Backup failed" (critical) on the session bus, if there is one.
    Destinations are named by their place in config.toml and the vault by its short id:
    a notification can show on a locked screen, so no path or file name is in it."""
    with contextlib.suppress(Exception):  # never changes the backup's outcome or status
        from kryptvault.session.desktop import notify_once

        summary, body, critical = _backup_notification(label, outcomes, container, failure)
        notify_once(summary, body, critical)


def _backup_notification(
    label: str, outcomes: Sequence[AutoOutcome], container: Path, failure: str | None = None
) -> tuple[str, str, bool]:
    """(summary, body, critical) for the outcome of `backup auto`."""
    total = len(outcomes)

    def which(status: str) -> str:
        numbers = [str(i + 1) for i, o in enumerate(outcomes) if o.status == status]
        if len(numbers) == 1:
            return f"destination {numbers[0]}"
        return f"destinations {', '.join(numbers[:-1])} and {numbers[-1]}"

    def scrub(text: str) -> str:
        for i, outcome in enumerate(outcomes):
            text = text.replace(os.fspath(outcome.destination), f"destination {i + 1}")
        text = text.replace(os.fspath(container.absolute()), "the container")
        text = text.replace(os.fspath(container), "the container")
        text = " ".join(text.split()).rstrip(".")
        return text if len(text) <= 200 else text[:199] + "…"

    failed = [o for o in outcomes if o.status == "failed"]
    done = any(o.status == "done" for o in outcomes)
    skipped = any(o.status == "skipped" for o in outcomes)
    if failure is not None or failed:
        reason = scrub(failure if failure is not None else failed[0].detail)
        if failure is not None:
            return "Backup failed", f"Vault {label} was not backed up: {reason}.", True
        body = f"Vault {label}: the backup to {which('failed')} of {total} failed: {reason}."
        if done:
            body += f" Backed up to {which('done')}."
        return "Backup failed", body, True
    if done:
        if total == 1:
            body = f"Vault {label} was backed up to its destination."
        elif not skipped:
            body = f"Vault {label} was backed up to its {total} destinations."
        else:
            body = (f"Vault {label} was backed up to {which('done')} of {total}; "
                    f"{which('skipped')} not reachable.")
        return "Backup finished", body, False
    return "Backup skipped", f"Vault {label} was not backed up: no destination was reachable.", False


@backup.command("list")
@dest_argument
@json_option
def backup_list(dest: Path, as_json: bool) -> None:
    """List the versions kept in DEST (or in one vault's directory under it)."""
    if is_remote(dest):
        _list_remote(os.fspath(dest), as_json)
        return
    with reading_set(dest) as state:
        rows: list[dict[str, Any]] = []
        newest = state.newest
        for v in sorted(state.manifests, reverse=True):
            m = state.manifests[v]
            stored: int | None = None
            if v != newest:
                nxt = state.manifests.get(v + 1)
                stored = nxt.previous.sums.size if nxt and nxt.previous else None
            rows.append(
                {
                    "version": v,
                    "current": v == newest,
                    "backed_up": m.created_text,
                    "container_size": m.size,
                    "stored_bytes": m.size if v == newest else stored,
                    "generation": m.generation,
                    "header_sequence": m.header_sequence,
                    "method": m.method,
                    "live": m.live,
                }
            )
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "backup": str(state.path),
                        "vault_uuid": str(state.vault_uuid),
                        "interrupted_backup_pending": state.pending is not None,
                        "damaged_manifests": sorted(state.bad_manifests),
                        "versions": rows,
                    },
                    indent=2,
                )
            )
            return
        click.echo(f"vault {state.vault_uuid} in {state.path}: {describe_versions(state)}")
        if state.pending is not None:
            click.echo("  note: an interrupted backup is pending rollback (done by the next backup)")
        for v in sorted(state.bad_manifests):
            click.echo(f"  version {v}: manifest damaged ({state.bad_manifests[v]})")
        if rows:
            click.echo(
                f"  {'version':>8}  {'backed up (UTC)':<20}  {'size':>10}  {'stored':>10}  "
                f"{'generation':>10}  method"
            )
        for row in rows:
            shown = (
                "current"
                if row["current"]
                else (human(row["stored_bytes"]) if row["stored_bytes"] is not None else "?")
            )
            method = row["method"] + (" (live)" if row["live"] else "")
            click.echo(
                f"  {row['version']:>8}  {row['backed_up']:<20}  {human(row['container_size']):>10}  "
                f"{shown:>10}  {row['generation']:>10}  {method}"
            )


def _list_remote(dest: str, as_json: bool) -> None:
    from kryptvault.backup.remote import load_remote_set

    state = load_remote_set(dest)
    rows: list[dict[str, Any]] = [
        {
            "version": v,
            "current": v == state.newest,
            "backed_up": m.created_text,
            "container_size": m.size,
            "chunks": len(m.chunks),
            "uploaded_bytes": m.uploaded_bytes,
            "live": m.live,
        }
        for v, m in sorted(state.manifests.items(), reverse=True)
    ]
    if as_json:
        damaged = {str(v): r for v, r in sorted(state.bad_manifests.items())}
        click.echo(json.dumps({"backup": state.display, "vault_uuid": str(state.vault_uuid),
                               "damaged_manifests": damaged,
                               "stored_bytes": sum(state.chunk_sizes.values()),
                               "versions": rows}, indent=2))
        return
    click.echo(f"vault {state.vault_uuid} in {state.display}: {len(rows)} version(s), "
               f"{human(sum(state.chunk_sizes.values()))} stored in {len(state.chunk_sizes)} chunks")
    for v, reason in sorted(state.bad_manifests.items()):
        click.echo(f"  version {v}: manifest damaged ({reason})")
    if rows:
        click.echo(f"  {'version':>8}  {'backed up (UTC)':<20}  {'size':>10}  {'uploaded':>10}")
    for row in rows:
        click.echo(f"  {row['version']:>8}  {row['backed_up']:<20}  {human(row['container_size']):>10}  "
                   f"{human(row['uploaded_bytes']):>10}" + ("  (live)" if row["live"] else ""))


def _fork_restored(target: Path, unlock: UnlockArgs) -> tuple[int, bytes]:
    """Unlock the restored copy and give it a lineage of its own (docs/BACKUP.md)."""
    from kryptvault.container.vault import store_keys
    from kryptvault.session.rollback import fork_container
    from kryptvault.session.unlock import unlock_container

    unlocked = unlock_container(
        target,
        token_spec=unlock.token_spec,
        ask_password=unlock.password_asker(),
        ask_recovery_key=unlock.recovery_asker(),
    )
    with unlocked:
        header = unlocked.header
        keys = store_keys(unlocked.master, header.vault_uuid)
    try:
        return fork_container(target, header.layout, header.vault_uuid, keys.data, keys.meta)
    finally:
        keys.wipe()


def _parse_version(text: str) -> int | None:
    if text in ("current", "latest", "newest"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a version number (or 'current')")
    if value < 1:
        raise UsageError("version numbers start at 1")
    return value


@cli.command()
@backup_argument
@click.option(
    "--version",
    "version_text",
    metavar="V",
    help="Also rebuild version V and check it in full "
    "(with --full: check version V's blocks; default: the newest).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Also unlock the version (token + password or recovery key) and authenticate every block.",
)
@unlock_options
@json_option
def verify(
    backup: Path,
    version_text: str | None,
    full: bool,
    unlock: UnlockArgs,
    as_json: bool,
) -> None:
    """Check a backup: every manifest, current.kv and every increment against their
    checksums (no secret needed); names each damaged chunk and the container region in it."""
    version = _parse_version(version_text) if version_text else None
    bar = Progress("verify", not as_json)
    try:
        if is_remote(backup):
            from kryptvault.backup.remote import verify_remote

            report = verify_remote(os.fspath(backup), progress=bar)
        else:
            report = verify_set(backup, version=version, progress=bar)
    finally:
        bar.finish()
    block_result: tuple[int, int, list[str]] | None = None
    if full and is_remote(backup):
        from kryptvault.backup.remote import materialized_remote
        from kryptvault.backup.verify import verify_container_blocks

        harden_process()
        with materialized_remote(os.fspath(backup), version) as (wanted, path):
            generation, damage = verify_container_blocks(
                path,
                token_spec=unlock.token_spec,
                ask_password=unlock.password_asker(),
                ask_recovery_key=unlock.recovery_asker(),
            )
        block_result = (wanted, generation, damage)
        report.blocks[wanted] = damage
    elif full:
        harden_process()
        block_result = verify_blocks(
            backup,
            version,
            token_spec=unlock.token_spec,
            ask_password=unlock.password_asker(),
            ask_recovery_key=unlock.recovery_asker(),
        )
        report.blocks[block_result[0]] = block_result[2]
    if as_json:
        out = report.to_json()
        if block_result is not None:
            out["full"] = {
                "version": block_result[0],
                "generation": block_result[1],
                "damage": block_result[2],
            }
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(
            f"backup of vault {report.vault_uuid} in {report.set_path}: "
            f"{len(report.versions)} version(s), checked {human(report.checked_bytes)}"
        )
        for note in report.notes:
            click.echo(f"  note: {note}")
        for problem in report.problems:
            click.echo(f"  DAMAGED {problem.text()}")
        if report.rebuilt:
            click.echo(f"  rebuilt version {', '.join(map(str, report.rebuilt))} and checked every chunk")
        if block_result is not None:
            v, generation, damage = block_result
            for line in damage:
                click.echo(f"  DAMAGED version {v}: {line}")
            if not damage:
                click.echo(f"  version {v}: every block authenticates (commit generation {generation})")
    if not report.ok:
        count = len(report.problems) + sum(len(d) for d in report.blocks.values())
        raise IntegrityError(f"the backup is damaged: {count} problem(s) found")
    if not as_json:
        click.echo("  OK")


@cli.command()
@backup_argument
@click.argument("rest", nargs=-1, required=True, metavar="[VERSION] CONTAINER")
@click.option("--force", is_flag=True, help="Overwrite an existing container file.")
@click.option(
    "--new-identity",
    is_flag=True,
    help="Fork the restored copy into a lineage of its own (unlocks it: token + password or "
    "recovery key), so it is used beside the vault without any rollback alarm.",
)
@unlock_options
@json_option
def restore(
    backup: Path, rest: tuple[str, ...], force: bool, new_identity: bool, unlock: UnlockArgs, as_json: bool
) -> None:
    """Rebuild a version kept in BACKUP (default: the newest) into CONTAINER.

    VERSION is a number from 'kryptvault backup list' or 'current'. The container is
    written to a temporary file, checked chunk by chunk against the backup's checksums,
    and renamed into place only when complete.
    """
    if len(rest) == 1:
        version, target = None, Path(rest[0])
    elif len(rest) == 2:
        version, target = _parse_version(rest[0]), Path(rest[1])
    else:
        raise UsageError("give BACKUP, optionally VERSION, and CONTAINER")
    replacing = target.exists()
    bar = Progress("restore", not as_json)
    try:
        if is_remote(backup):
            from kryptvault.backup.remote import run_remote_restore

            result: RestoreResult | RemoteRestoreResult = run_remote_restore(
                os.fspath(backup), version, target, force=force, progress=bar)
        else:
            result = run_restore(backup, version, target, force=force, progress=bar)
    finally:
        bar.finish()
    forked = _fork_restored(result.target, unlock) if new_identity else None
    if as_json:
        out = result.to_json()
        if forked is not None:
            out["forked_generation"], out["lineage"] = forked[0], forked[1].hex()
        click.echo(json.dumps(out, indent=2))
        return
    which = "the newest version" if result.version == result.newest else "an older version"
    click.echo(
        f"restored version {result.version} ({which}, backed up {result.manifest.created_text}) "
        f"of vault {result.vault_uuid} to {result.target}"
    )
    where = os.fspath(result.target)
    if forked is not None:
        click.echo(
            f"  Forked into a lineage of its own ({forked[1].hex()[:12]}, generation {forked[0]}): "
            "it mounts without --accept-rollback and never affects the vault's rollback records."
        )
    elif replacing:
        click.echo(
            "  Its token has most likely seen a newer state of the vault: the first mount then needs "
            "'kryptvault mount --accept-rollback' (a writable mount forks it into a lineage of its own)."
        )
    else:
        click.echo(
            f"  To look into this copy without changing it: 'kryptvault mount {where} DIR --read-only "
            "--accept-rollback'. To use it as a vault beside the live one, restore with --new-identity."
        )
    if replacing and forked is None:
        click.echo(f"  Back it up next with 'kryptvault backup --full {where} DEST' (as the vault's "
                   "new history: --full lets it continue the vault's backup set).")
    else:
        # A side copy's versions in the vault's set would be another history (BACKUP.md §9).
        click.echo("  Back this copy up only to a destination of its own, not into the vault's backup set.")
