"""Rollback detection with generation records (docs/TOKEN.md, "Rollback").

A record is the highest commit generation seen for one (vault, lineage): the lineage id
sits in every commit record (docs/FORMAT.md §4.6); a copy forked from the vault gets a
lineage of its own. Records live in `<vault>.kvgen` on each token (and in the local state
directory, for mounts with the recovery key). The rule: **an alarm means a record has
witnessed a newer state of this lineage than the container now holds.** Records only
rise: a writable mount raises its lineage's record as it commits (at most every
RECORD_INTERVAL seconds while the token is present, and at a lock that is not an
unplug). `--accept-rollback` never lowers a record: a writable mount of an older
container forks it into a new lineage first, so nothing done with that copy can raise the
record the live vault is checked against. A read-only mount never writes a record.
A backup token that missed recent mounts holds a smaller number, so it never raises a
false alarm.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from kryptvault.container.commit import ORIGINAL_LINEAGE, inspect_commits
from kryptvault.container.layout import Layout
from kryptvault.crypto.aead import Aead
from kryptvault.crypto.secret import Secret
from kryptvault.errors import KryptvaultError
from kryptvault.session.lineages import remember_lineage
from kryptvault.session.paths import state_dir
from kryptvault.token.records import RecordsDamaged, read_records

# Seconds between two record writes to the token while mounted: the record is never more
# than this (plus one RECORD_POLL and the write itself) behind the last commit.
RECORD_INTERVAL = 2.0
RECORD_POLL = 0.5


class RollbackDetected(KryptvaultError):
    pass


def check_rollback(container_generation: int, token_generation: int, accept: bool) -> bool:
    """True when the container is older than the token's record and that was accepted."""
    if container_generation >= token_generation:
        return False
    if accept:
        return True
    raise RollbackDetected(
        f"this container is older than the last state its token saw (generation "
        f"{container_generation} < {token_generation}): it was rolled back or restored from a backup; "
        "to look into it without changing it, mount with --read-only --accept-rollback; "
        "to write to it, mount with --accept-rollback (which forks it into a lineage of its own)"
    )


def local_records_dir() -> Path:
    path = state_dir() / "rollback"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def describe_lineage(lineage: bytes) -> str:
    return "original" if lineage == ORIGINAL_LINEAGE else lineage.hex()[:12]


def local_rollback_warning(container_generation: int, recorded: int) -> str | None:
    if container_generation >= recorded:
        return None
    return (
        f"this container is older than the last state this machine saw of it (generation "
        f"{container_generation} < {recorded}): it was rolled back or restored from a backup"
    )


def mount_warnings(
    container: Path,
    layout: Layout,
    vault_uuid: uuid.UUID,
    meta_key: Secret,
    *,
    with_token: bool,
    read_only: bool,
) -> list[str]:
    """What `mount` tells the user before the daemon starts: a damaged commit record
    (the daemon refuses a writable mount when the newest one is lost), and, for a mount
    with the recovery key, a container older than this machine's record of it."""
    warnings: list[str] = []
    fd = os.open(container, os.O_RDONLY | os.O_CLOEXEC)
    try:
        slots, damage = inspect_commits(fd, layout, Aead(meta_key), vault_uuid.bytes)
    finally:
        os.close(fd)
    if damage is not None and (read_only or not damage.newest_lost):
        warnings.append(damage.describe() + ("; opened read-only" if damage.newest_lost else ""))
    if not with_token:
        try:
            recorded = read_records(local_records_dir(), vault_uuid).get(slots.latest.lineage)
        except RecordsDamaged as exc:
            warnings.append(f"{exc}; this machine's rollback record starts afresh")
            recorded = 0
        local = local_rollback_warning(slots.latest.generation, recorded)
        if local:
            warnings.append(local + ("" if read_only else "; the record is left as it was"))
    return warnings


def fork_container(
    container: Path, layout: Layout, vault_uuid: uuid.UUID, data_key: Secret, meta_key: Secret
) -> tuple[int, bytes]:
    """Give `container` (not mounted) a new lineage with one commit; -> (generation, lineage).

    Its rollback records then start afresh, and nothing done with it touches the records
    of the vault it was copied from."""
    from kryptvault.container.store import ObjectStore  # the store is heavy; only here

    fd = os.open(container, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise KryptvaultError(f"{container} is mounted; lock it first")
        store = ObjectStore.open(fd, layout, vault_uuid, data_key, meta_key)
        try:
            lineage = store.fork_lineage()
            generation = store.commit()
            remember_lineage(os.fstat(fd), vault_uuid, lineage, str(container))
            return generation, lineage
        finally:
            store.close()
    finally:
        os.close(fd)
