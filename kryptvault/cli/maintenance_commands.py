"""Offline maintenance of a vault that is not mounted: fsck (check, repair) and compact.

Both take the container's `flock` for their whole run (exclusive to repair or compact,
shared to only check): the mount daemon holds it exclusively while the vault is mounted,
so a mounted vault is refused, and a mount attempted meanwhile fails. A repair that must
rebuild the store, and a compaction, write a new container next to the old one and
rename it over the original (fsync, rename, fsync of the directory), so the container is
always either the old or the new one. docs/FSCK.md describes both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from kryptvault.cli.app import cli
from kryptvault.cli.options import UnlockArgs, container_argument, unlock_options
from kryptvault.cli.progress import Progress
from kryptvault.cli.units import human_size
from kryptvault.cli.vault_commands import unlock_for_change
from kryptvault.container.header import header_unchanged, read_header
from kryptvault.container.layout import Layout
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import (
    StoreKeys,
    header_lock,
    open_container_fd,
    store_keys,
    write_header_copies,
    zero_reserved_regions,
)
from kryptvault.durable import fsync_dir
from kryptvault.errors import KryptvaultError
from kryptvault.fs.compact import CompactStats, copy_header
from kryptvault.fs.compact import compact as compact_container
from kryptvault.fs.fsck import FsckReport, Problem, RepairReport, check, rebuild_container, repair
from kryptvault.session.unlock import Unlocked

EXIT_LOST = 3  # fsck --repair: repaired, but something was lost, moved or left unrepaired
MOUNTED = "the vault is mounted; unmount it first (or wait for the backup, fsck or compact using it)"
_MAX_PATHS_SHOWN = 20


# ---------------------------------------------------------------------- helpers
def open_locked(container: Path, writable: bool) -> int:
    """Open the container and take its flock (held until the fd is closed): exclusive to
    write, shared to only read (like an offline backup). The mount daemon holds it
    exclusively, so either fails while the vault is mounted."""
    fd = open_container_fd(container, writable)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KryptvaultError(MOUNTED) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _unlocked_keys(
    container: Path, unlock: UnlockArgs, progress: Progress | None = None
) -> Iterator[tuple[Unlocked, StoreKeys]]:
    with unlock_for_change(container, unlock, progress=progress) as unlocked:
        keys = store_keys(unlocked.master, unlocked.vault_uuid)
        try:
            yield unlocked, keys
        finally:
            keys.wipe()


@contextlib.contextmanager
def _replacement(container: Path, fd: int, what: str) -> Iterator[tuple[int, Callable[[], None]]]:
    """A new file next to `container` (same permissions); yields (its fd, swap) where
    swap() fsyncs it and renames it over the container. Removed unless swapped."""
    parent = container.parent if str(container.parent) else Path(".")
    st = os.fstat(fd)
    tmp = parent / f".{container.name}.kv-{what}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of an earlier run (we hold the container's lock)
    tfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o7777)
    swapped = False
    with contextlib.suppress(OSError):
        os.fchown(tfd, st.st_uid, st.st_gid)

    def swap() -> None:
        nonlocal swapped
        # Header changes (passwd, slots) take this lock: copy the newest header while
        # holding it, so a change made during the run is not lost.
        with header_lock(fd):
            copy_header(fd, tfd)
            os.fsync(tfd)
            os.replace(tmp, container)
            swapped = True
        fsync_dir(parent)

    try:
        yield tfd, swap
    finally:
        os.close(tfd)
        if not swapped:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _keep_damaged(container: Path) -> Path:
    """Give the damaged original a second name (a hard link) before it is replaced."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = container.with_name(f"{container.name}.damaged-{stamp}")
    i = 0
    while target.exists():
        i += 1
        target = container.with_name(f"{container.name}.damaged-{stamp}.{i}")
    try:
        os.link(container, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # no hard links here (vfat): keep a copy instead
        shutil.copy2(container, target)
    return target


# ---------------------------------------------------------------------- output
def _print_problem(p: Problem) -> None:
    mark = "note" if p.info else p.kind
    click.echo(f"  [{mark}] {p.message}")
    extra = p.paths[1:] if p.paths and p.message.startswith(p.paths[0]) else p.paths
    for path in extra[:_MAX_PATHS_SHOWN]:
        click.echo(f"      {path}")
    if len(extra) > _MAX_PATHS_SHOWN:
        click.echo(f"      ... and {len(extra) - _MAX_PATHS_SHOWN} more")


def _print_summary(report: FsckReport) -> None:
    s = report.summary
    click.echo(
        f"  {s.objects} objects: {s.directories} directories, {s.files} files "
        f"({human_size(s.file_bytes)}), {s.symlinks} symlinks, {s.special} other"
    )
    click.echo(
        f"  {s.units_verified} allocation units ({human_size(s.stored_bytes)}) of blocks authenticated, "
        f"{s.damaged_blocks} damaged; commit generation {s.generation}"
    )


def _print_report(container: Path, report: FsckReport, heading: str) -> None:
    click.echo(f"{heading} {container}:")
    _print_summary(report)
    for p in report.problems:
        _print_problem(p)


def _print_repair(rr: RepairReport) -> None:
    click.echo("repair:")
    for action in rr.actions:
        click.echo(f"  {action}")
    if rr.damaged_copy:
        click.echo(f"  the damaged original is kept as {rr.damaged_copy}")
    for item in rr.unrepaired:
        click.echo(f"  NOT REPAIRED: {item}")


# ---------------------------------------------------------------------- fsck
def _check_only(fd: int, layout: Layout, vault_uuid: uuid.UUID, keys: StoreKeys) -> FsckReport:
    store = ObjectStore.open(fd, layout, vault_uuid, keys.data, keys.meta, read_only=True)
    try:
        return check(store)
    finally:
        store.close()


def _repair_header(fd: int, unlocked: Unlocked) -> str:
    """Rewrite both header copies from the one that authenticated (as passwd does), and
    zero what FORMAT.md says is zero (nothing reads those bytes)."""
    read = unlocked.read
    with header_lock(fd):
        if not header_unchanged(fd, read):
            raise KryptvaultError("the header changed while fsck ran; run it again")
        zeroed = zero_reserved_regions(fd, read)
        if read.damaged:
            write_header_copies(fd, unlocked.header, unlocked.master)
    done = [f"rewrote both header copies from copy {'AB'[read.copy_index]}"] if read.damaged else []
    return "; ".join(done + [f"zeroed {what}" for what in zeroed])


def _run_fsck(
    container: Path, fd: int, unlocked: Unlocked, keys: StoreKeys, do_repair: bool
) -> tuple[FsckReport, RepairReport | None, FsckReport | None]:
    layout, vault_uuid = unlocked.header.layout, unlocked.vault_uuid
    note = unlocked.read.damage_note()
    store = ObjectStore.open(fd, layout, vault_uuid, keys.data, keys.meta, read_only=not do_repair)
    rr: RepairReport | None = None
    try:
        report = check(store)
        if note:
            report.problems.insert(0, Problem("damaged-header", note))
        if not do_repair or not report.problems:
            return report, None, None
        header_action = _repair_header(fd, unlocked) if note else None
        if not report.needs_rebuild:
            rr = repair(store, report) if len(report.problems) > (1 if note else 0) else RepairReport()
    finally:
        store.close()
    if rr is None:
        # Damaged metadata: copy what can be read into a new container and swap it in.
        store = ObjectStore.open(fd, layout, vault_uuid, keys.data, keys.meta, read_only=True)
        try:
            with _replacement(container, fd, "rebuild") as (tfd, swap):
                rr = rebuild_container(fd, tfd, vault_uuid, keys, store, report)
                rr.damaged_copy = str(_keep_damaged(container))
                swap()
                after = _check_only(tfd, layout, vault_uuid, keys)
        finally:
            store.close()
    else:
        after = _check_only(fd, layout, vault_uuid, keys)
    if header_action is not None:
        rr.actions.insert(0, header_action)
        later = read_header(fd).damage_note()
        if later:
            after.problems.insert(0, Problem("damaged-header", later))
    return report, rr, after


@cli.command()
@container_argument
@unlock_options
@click.option("--repair", "do_repair", is_flag=True, help="Repair what is found (see docs/FSCK.md).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fsck(
    container: Path,
    unlock: UnlockArgs,
    do_repair: bool,
    as_json: bool,
) -> None:
    """Check every block and every filesystem invariant of CONTAINER (not mounted).

    Damage is reported with the paths it affects. With --repair: files with unreadable
    blocks move to /lost+found (as <oid>-<name>.partial, unreadable ranges as zeros, with
    a note), orphans are relinked there as #<oid>, link counts and dangling entries are
    fixed; intact files are left alone. If the metadata itself is damaged, everything
    readable is copied into a new container that replaces the old one, which is kept as
    CONTAINER.damaged-<time>.

    Exit status: 0 clean, 1 problems found (or all repaired with nothing lost), 2 usage,
    3 repaired but entries were lost or moved to /lost+found, or something is left
    unrepaired (docs/FSCK.md).
    """
    fd = open_locked(container, writable=do_repair)
    try:
        with (
            Progress("fsck", not as_json) as bar,
            _unlocked_keys(container, unlock, bar) as (unlocked, keys),
        ):
            bar.phase("checking every block and record" + (", then repairing" if do_repair else ""))
            report, rr, after = _run_fsck(container, fd, unlocked, keys, do_repair)
    finally:
        os.close(fd)
    if as_json:
        record: dict[str, Any] = {
            "container": str(container),
            "clean": report.clean,
            "report": report.to_dict(),
            "repair": rr.to_dict() if rr is not None else None,
            "after_repair": after.to_dict() if after is not None else None,
        }
        click.echo(json.dumps(record, indent=2))
    else:
        _print_report(container, report, "checked")
        if rr is not None:
            _print_repair(rr)
        if after is not None:
            if after.clean and rr is not None and rr.lost_anything:
                # Consistent is not clean: files are gone or no longer under their names.
                click.echo(f"after repair: consistent, but {rr.loss_summary()}")
            elif after.clean:
                click.echo("after repair: clean")
            else:
                click.echo("after repair, still:")
                for p in after.problems:
                    _print_problem(p)
        elif report.clean:
            click.echo("clean")
        else:
            n = sum(1 for p in report.problems if not p.info)
            if any(p.kind == "damaged-commit-record" and "--accept-lost-commit" in p.message
                   for p in report.problems):
                # --repair refuses until the loss is acknowledged (docs/FSCK.md).
                click.echo(f"{n} problem(s) found; see above before repairing")
            else:
                click.echo(f"{n} problem(s) found; 'kryptvault fsck --repair {container}' repairs them")
    if rr is not None and (rr.lost_anything or (after is not None and not after.clean)):
        click.get_current_context().exit(EXIT_LOST)
    if not report.clean:
        click.get_current_context().exit(1)


# ---------------------------------------------------------------------- compact
@cli.command()
@container_argument
@unlock_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compact(
    container: Path,
    unlock: UnlockArgs,
    as_json: bool,
) -> None:
    """Shrink CONTAINER (not mounted) to its live data.

    The container file never shrinks while in use; this copies every live block into a
    new, tightly packed container (same keys, keyslots, inode numbers, attributes, hard
    links) and renames it over the old one. Needs free space for the live data. A damaged
    vault is refused: run 'kryptvault fsck --repair' first.
    """
    fd = open_locked(container, writable=True)
    stats: CompactStats
    try:
        with (
            Progress("compact", not as_json, unit="objects") as bar,
            _unlocked_keys(container, unlock, bar) as (unlocked, keys),
            _replacement(container, fd, "compact") as (tfd, swap),
        ):
            bar.phase("copying the live data")
            stats = compact_container(
                fd, tfd, unlocked.header.layout, unlocked.vault_uuid, keys, progress=bar
            )
            bar.phase("replacing the container")
            swap()
    finally:
        os.close(fd)
    if as_json:
        click.echo(json.dumps({"container": str(container), **stats.to_dict()}, indent=2))
    else:
        click.echo(
            f"compacted {container}: {human_size(stats.bytes_before)} -> {human_size(stats.bytes_after)} "
            f"({human_size(max(0, stats.saved))} freed); {stats.objects} objects, "
            f"{human_size(stats.data_bytes)} of data"
        )
