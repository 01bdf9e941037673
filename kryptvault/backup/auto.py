"""Automatic backups ("every lock is a backup"): destinations from the config file.

`$XDG_CONFIG_HOME/kryptvault/config.toml`:

    [backup]
    destinations = ["/media/me/backup-disk/kryptvault", "/mnt/nas/kryptvault"]
    keep = 7            # versions kept in each destination
    after_lock = true   # start a backup after every lock (unplug included)

    [backup.vaults."<vault-uuid>"]   # optional, per vault; replaces the global list
    destinations = ["/media/me/other-disk"]
    keep = 3

After a lock the mount daemon starts `kryptvault backup auto CONTAINER --after-lock` in
the background; it waits until the daemon has let go of the container, then backs up to
every destination that is reachable (an unplugged backup disk is skipped, not an error).
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kryptvault.backup.engine import run_backup
from kryptvault.backup.remote import run_remote_backup
from kryptvault.backup.transport import RemoteUnreachable, is_remote
from kryptvault.errors import KryptvaultError
from kryptvault.session.audit import AuditLog
from kryptvault.session.config import AutoBackupConfig


def wait_until_unmounted(container: Path, timeout: float) -> None:
    """The daemon holds an exclusive flock on the container until it has exited."""
    deadline = time.monotonic() + timeout
    fd = os.open(container, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise KryptvaultError(f"{container} is still in use after {timeout:.0f} s")
                time.sleep(0.1)
    finally:
        os.close(fd)


@dataclass
class AutoOutcome:
    destination: Path
    status: str  # "done", "skipped", "failed"
    detail: str = ""


def run_auto_backup(
    container: Path, vault_uuid: uuid.UUID, config: AutoBackupConfig, audit: AuditLog
) -> list[AutoOutcome]:
    outcomes = []
    for dest in config.destinations:
        if is_remote(dest):
            outcomes.append(_auto_remote(container, vault_uuid, os.fspath(dest), config.keep, audit))
            continue
        if not dest.is_dir():
            audit.append("backup_skipped", vault=vault_uuid, dest=str(dest), reason="not reachable")
            outcomes.append(AutoOutcome(dest, "skipped", "not reachable"))
            continue
        audit.append("backup_started", vault=vault_uuid, container=str(container), dest=str(dest), auto=True)
        try:
            result = run_backup(container, dest, keep=config.keep)
        except (KryptvaultError, OSError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            audit.append("backup_failed", vault=vault_uuid, dest=str(dest), error=message, auto=True)
            outcomes.append(AutoOutcome(dest, "failed", message))
            continue
        audit.append(
            "backup_done",
            vault=vault_uuid,
            container=str(container),
            backup=str(result.set_path),
            version=result.version,
            method=result.method,
            bytes_written=result.bytes_written,
            seconds=round(result.seconds, 3),
            auto=True,
        )
        outcomes.append(AutoOutcome(dest, "done", f"version {result.version}"))
    return outcomes


def _auto_remote(
    container: Path, vault_uuid: uuid.UUID, dest: str, keep: int, audit: AuditLog
) -> AutoOutcome:
    """An rclone remote that does not answer is skipped like an unplugged disk: the next
    lock tries it again, and nothing already uploaded is uploaded twice."""
    audit.append("backup_started", vault=vault_uuid, container=str(container), dest=dest, auto=True)
    try:
        result = run_remote_backup(container, dest, keep=keep)
    except RemoteUnreachable as exc:
        message = " ".join(str(exc).split())
        audit.append("backup_skipped", vault=vault_uuid, dest=dest, reason=f"not reachable: {message}",
                     auto=True)
        return AutoOutcome(Path(dest), "skipped", f"not reachable: {message}")
    except (KryptvaultError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        audit.append("backup_failed", vault=vault_uuid, dest=dest, error=message, auto=True)
        return AutoOutcome(Path(dest), "failed", message)
    audit.append(
        "backup_done",
        vault=vault_uuid,
        container=str(container),
        dest=dest,
        backup=result.set_display,
        version=result.version,
        method=result.method,
        bytes_written=result.bytes_uploaded,
        seconds=round(result.seconds, 3),
        auto=True,
    )
    return AutoOutcome(Path(dest), "done",
                       f"version {result.version}, uploaded {result.chunks_uploaded} chunks")
