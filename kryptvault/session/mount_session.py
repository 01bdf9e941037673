"""One mounted vault: the key-holding daemon process and everything it runs.

The daemon opens the store with keys handed over by the unlocking process, serves the
filesystem over FUSE, watches the token, answers the control socket, and ends only
through the lock sequence (kryptvault/session/lock.py), whatever the trigger.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kryptvault.container.commit import ORIGINAL_LINEAGE
from kryptvault.container.header import read_header
from kryptvault.container.layout import Layout
from kryptvault.container.store import ObjectStore
from kryptvault.crypto.secret import Secret, harden_process
from kryptvault.errors import IntegrityError, KryptvaultError
from kryptvault.fs.filesystem import Filesystem
from kryptvault.fuseadapter.mount import serve
from kryptvault.fuseadapter.server import FuseServer
from kryptvault.fuseadapter.spinner import CpuSpinner
from kryptvault.session import fusectl
from kryptvault.session.audit import AuditLog, Scalar, make_entry
from kryptvault.session.config import VaultPrefs, load_config, load_vault_prefs
from kryptvault.session.control import (
    AfterReply,
    ControlServer,
    Handler,
    PeerCred,
    container_instance,
    socket_path_for,
)
from kryptvault.session.desktop import Desktop
from kryptvault.session.handoff import SessionSettings
from kryptvault.session.lineages import remember_lineage
from kryptvault.session.lock import COMMIT_HARD_LIMIT, LockOutcome, LockSequence, LockSteps
from kryptvault.session.rollback import (
    RECORD_INTERVAL,
    RECORD_POLL,
    check_rollback,
    describe_lineage,
    local_records_dir,
)
from kryptvault.session.writer_lock import WriterLock, take_writer_lock
from kryptvault.token.base import Token
from kryptvault.token.records import RecordsDamaged, advance_records, read_records
from kryptvault.token.resolve import resolve_token
from kryptvault.watcher.watcher import TokenWatcher

log = logging.getLogger("kryptvault.session")

LOCK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# Writing back the kernel's dirty pages at a lock: bounded by the FUSE mount's strict
# dirty limit, so normally milliseconds; past this the lock goes on (and says so).
DRAIN_TIMEOUT = 10.0
# How often the holds of backups that died without releasing them are looked for.
HOLD_REAP_INTERVAL = 1.0


class MountSession:
    def __init__(
        self,
        settings: SessionSettings,
        data_key: Secret,
        meta_key: Secret,
        report: Callable[[str], None],
        spinner: CpuSpinner | None = None,
    ) -> None:
        self.settings = settings
        self.spinner = spinner  # made at the daemon's start, before any key arrived
        self.vault_uuid = uuid.UUID(settings.vault_uuid)
        self.mountpoint = Path(settings.mountpoint)
        self._report = report
        self._keys = (data_key, meta_key)
        self.audit = AuditLog()
        self.started = time.time()
        self.fd = -1
        self.store: ObjectStore | None = None
        self.fs: Filesystem | None = None
        self.token: Token | None = None
        self.watcher: TokenWatcher | None = None
        self.control: ControlServer | None = None
        self.operations: FuseServer | None = None
        self.connection: int | None = None
        self._holds: list[int] = []  # pids of the backups holding reuse
        self._holds_lock = threading.Lock()
        self._writer_lock: WriterLock | None = None  # held while a writable mount lives
        self.lock = LockSequence(
            LockSteps(
                refuse=self._refuse,
                needs_commit=self._needs_commit,
                commit=self._commit,
                record_generation=self._record_generation_at_lock,
                take_mount_away=self._take_mount_away,
                wipe=self._wipe,
                audit=self._audit_lock,
                finish=self._finish,
                unsaved_bytes=self._unsaved_bytes,
            ),
            commit_deadline=settings.lock_deadline_ms / 1000,
            commit_runner=self._run_on_commit_thread,
        )
        self._idle_deadline: float | None = None
        self.backup_after_lock = False
        # Audit entries of the token's removal wait for the lock's own audit step (one
        # write, one fsync, after the mount is gone) instead of delaying the lock's start.
        self._pending_audit: list[dict[str, Scalar]] = []
        self._pending_lock = threading.Lock()
        self._lock_audited = False
        self._removed_at: float | None = None
        self._record_lock = threading.Lock()
        self._recorded = 0  # the generation the token's record last got
        self._recorded_local = 0
        self.desktop: Desktop | None = None  # D-Bus: sleep inhibitor, notifications

    # ------------------------------------------------------------------ start-up
    def open(self) -> None:
        """Open the container and filesystem; a failure here never leaves a mount behind."""
        harden_process()
        path = Path(self.settings.container)
        try:
            # A read-only mount cannot change the container even by mistake.
            mode = os.O_RDONLY if self.settings.read_only else os.O_RDWR
            self.fd = os.open(path, mode | os.O_CLOEXEC)
        except OSError as exc:
            raise KryptvaultError(f"cannot open {path}: {exc.strerror}")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise KryptvaultError(f"{path} is already mounted (another kryptvault holds it)")
        # Any copy: the one that authenticated at unlock need not be the newest-looking
        # one (a key-less edit of the other copy, even of its UUID).
        read = read_header(self.fd, allow_disagreement=True)
        if all(h.vault_uuid != self.vault_uuid for _, h in read.copies()):
            raise KryptvaultError("the container changed while it was being unlocked")
        data_key, meta_key = self._keys
        try:
            # The geometry of the copy that authenticated at unlock (settings), not of the
            # newest-looking copy read here before any key: that one may be a forgery.
            self.store = ObjectStore.open(
                self.fd, Layout(block_size=self.settings.block_size), self.vault_uuid, data_key, meta_key,
                read_only=self.settings.read_only,
                accept_lost_commit=self.settings.accept_lost_commit,
            )
        finally:
            data_key.wipe()
            meta_key.wipe()
        self._check_commit_damage()
        damage = self.store.open_damage
        if damage and not self.settings.read_only:
            # The store opened read-only (free space unknown): say so now, not at the
            # first write, and say what repairs it.
            first = damage[0]
            where = f"object {first.oid} stream {first.stream}: " if first.level >= 0 else ""
            raise KryptvaultError(
                f"the vault is damaged ({where}{first.reason}); run 'kryptvault fsck --repair {path}'"
                " (or mount --read-only to copy files out first)"
            )
        if self.store.bad_copies:
            # Nothing is lost (the other copy was read), but the redundancy is gone there.
            log.warning("%d metadata block(s) have one bad copy; 'kryptvault fsck --repair %s' "
                        "rewrites them", len(self.store.bad_copies), path)
        self._check_rollback()
        self._acknowledge_lost_commit()
        # For key-less backups of this file: whether it is a fork (docs/BACKUP.md §9).
        remember_lineage(os.fstat(self.fd), self.vault_uuid, self.store.lineage, str(path))
        try:
            # statfs counts the free space of the disk the container can still grow into.
            self.fs = Filesystem(self.store, host_dir=str(path.parent))
        except IntegrityError as exc:
            raise KryptvaultError(f"the vault is damaged ({exc}); run 'kryptvault fsck {path}'") from None
        try:
            backup = load_config(self.vault_uuid)
            # A read-only mount changed nothing, and is often a restored copy beside the vault.
            self.backup_after_lock = (
                backup.after_lock and bool(backup.destinations) and not self.settings.read_only
            )
        except KryptvaultError as exc:
            log.warning("automatic backups are off: %s", exc)
        if self.backup_after_lock and self.store.lineage != ORIGINAL_LINEAGE:
            # The destinations hold the vault's backup set, keyed by UUID only: a fork's
            # versions there would be another history, and --keep would prune the vault's.
            self.backup_after_lock = False
            lineage = describe_lineage(self.store.lineage)
            why = (f"a fork (lineage {lineage}) is never backed up automatically into the "
                   "vault's backup set; back it up by hand to a destination of its own")
            log.warning("no automatic backup after the lock: %s", why)
            # Not "backup_skipped": `status` shows that as the vault's last backup outcome.
            self.audit.append("auto_backup_skipped", vault=str(self.vault_uuid), lineage=lineage,
                              container=self.settings.container, reason=why)

    def _check_commit_damage(self) -> None:
        assert self.store is not None
        damage = self.store.commit_damage
        if damage is None:
            return
        self.audit.append(
            "commit_record_damaged",
            vault=str(self.vault_uuid),
            slot=damage.slot,
            newest_lost=damage.newest_lost,
            generation=damage.opened_generation,
        )
        if damage.newest_lost and not self.settings.read_only and not self.settings.accept_lost_commit:
            raise KryptvaultError(
                f"{damage.describe()}; mount --read-only to look at it, or, to write anyway "
                "(the first commits then reuse the space of the lost generation), --accept-lost-commit"
            )

    def _acknowledge_lost_commit(self) -> None:
        """After the rollback check (which must not see a commit of an old copy first)."""
        store = self.store
        assert store is not None
        damage = store.commit_damage
        if damage is None or not damage.newest_lost or self.settings.read_only:
            return
        generation = store.acknowledge_lost_commit()
        self.audit.append("lost_commit_accepted", vault=str(self.vault_uuid),
                          fell_back_to=damage.opened_generation, generation=generation)

    def _check_rollback(self) -> None:
        """Compare the container with the records of its lineage; on an accepted rollback
        of a writable mount, fork it first so no record of the old lineage ever moves."""
        store = self.store
        assert store is not None
        read_only = self.settings.read_only
        spec = self.settings.token.get("spec")
        if isinstance(spec, str):
            self.token = resolve_token(spec, vault_uuid=self.vault_uuid)
            seen = self._token_record(store.lineage)
            accept = bool(self.settings.token.get("accept_rollback"))
            damage = store.commit_damage
            if (
                damage is not None
                and damage.newest_lost
                and (read_only or self.settings.accept_lost_commit)
                and (damage.newer_generation is None or seen <= damage.newer_generation)
            ):
                # The token saw the generation whose record was lost: that, not a
                # rollback, is why the container is older, and the user has been told.
                # No fork: it is the same line of commits, one generation short.
                seen = min(seen, store.generation)
            if check_rollback(store.generation, seen, accept):
                self.audit.append(
                    "rollback_accepted",
                    vault=str(self.vault_uuid),
                    container_generation=store.generation,
                    token_generation=seen,
                    lineage=describe_lineage(store.lineage),
                    read_only=read_only,
                )
                if not read_only:
                    old = store.lineage
                    new = store.fork_lineage()
                    store.commit()
                    self.audit.append(
                        "lineage_forked",
                        vault=str(self.vault_uuid),
                        old_lineage=describe_lineage(old),
                        lineage=describe_lineage(new),
                        generation=store.generation,
                    )
        if not read_only:
            # After a fork (a lineage of its own), before anything raises this lineage's
            # records: another writable mount of the same history is refused here.
            self._writer_lock = take_writer_lock(
                self.vault_uuid, store.lineage, describe_lineage(store.lineage),
                str(self.mountpoint), self.settings.container,
            )
            self._record_generation(store.generation)

    def _token_record(self, lineage: bytes) -> int:
        """What the token saw of this lineage: its record file, and for the original
        lineage also the generation older builds kept in the share file itself."""
        token = self.token
        assert token is not None
        try:
            seen = read_records(token.share_dir, self.vault_uuid).get(lineage)
        except RecordsDamaged as exc:
            log.warning("%s; rollback detection starts afresh from this mount", exc)
            seen = 0
        if lineage == ORIGINAL_LINEAGE:
            seen = max(seen, int(str(self.settings.token.get("generation", 0))))
        return seen

    def _record_generation(self, generation: int) -> bool:
        """Raise this lineage's records to `generation` (never lower them): the local one,
        and the token's if it is present. True if the token's record is current."""
        if self.settings.read_only or self.store is None:
            return False
        lineage = self.store.lineage
        with self._record_lock:
            try:
                advance_records(local_records_dir(), self.vault_uuid, lineage, generation)
                self._recorded_local = generation
            except (KryptvaultError, OSError) as exc:
                log.warning("could not update the local rollback record: %s", exc)
            if self.token is None or not self.token.is_present():
                return False
            try:
                advance_records(self.token.share_dir, self.vault_uuid, lineage, generation)
            except KryptvaultError as exc:
                log.warning("could not update the token's rollback record: %s", exc)
                return False
            self._recorded = generation
            return True

    def _chores(self) -> None:
        """The daemon's unhurried duties, on one thread: every thread alive at a lock is
        one more for the kernel to end before the process is gone (~1 ms each in the TCG
        guest's unplug test, where these were three threads until 2026-12-07). A duty that
        fails is logged and tried again at its next turn; the others go on."""
        last_record, last_reap = 0.0, time.monotonic()
        while True:
            time.sleep(RECORD_POLL)
            if self.lock.locked:
                return
            now = time.monotonic()
            if now - last_reap >= HOLD_REAP_INTERVAL:
                last_reap = now
                self._chore(self._reap_holds)
            generation = self._unrecorded_generation()
            if generation is not None and now - last_record >= RECORD_INTERVAL:
                last_record = now
                self._chore(functools.partial(self._record_generation, generation))
            if self.settings.idle_lock_minutes and self._idle_expired():
                self.trigger_lock("idle", "timer")
                return

    @staticmethod
    def _chore(duty: Callable[[], object]) -> None:
        try:
            duty()
        except Exception:
            log.exception("a background duty of the mount failed")

    def _unrecorded_generation(self) -> int | None:
        """The committed generation if the rollback records (local, and the token's) lag
        it, else None: kept close behind while the token is present, so that a lock by
        unplugging (which cannot write to the token) leaves them current."""
        store = self.store
        if self.settings.read_only or store is None:
            return None
        generation = store.generation
        if generation > self._recorded_local or (self.token is not None and generation > self._recorded):
            return generation
        return None

    def run(self) -> int:
        """Serve until a lock; returns only if the lock did not end the process."""
        assert self.fs is not None
        signal.pthread_sigmask(signal.SIG_BLOCK, LOCK_SIGNALS)  # before any thread starts
        threading.Thread(target=self._wait_for_signals, name="kryptvault-signals", daemon=True).start()
        self._start_control()
        threading.Thread(target=self._chores, name="kryptvault-chores", daemon=True).start()
        if self.token is not None:
            self.watcher = TokenWatcher(
                self.token, lambda route: self.trigger_lock("unplug", route), on_event=self._token_event
            )
            self.watcher.start()
        self.audit.append(
            "mount",
            vault=str(self.vault_uuid),
            mountpoint=str(self.mountpoint),
            generation=self.store.generation if self.store else None,
        )
        try:
            serve(
                self.fs,
                str(self.mountpoint),
                allow_other=self.settings.allow_other,
                fsname=self.vault_uuid.hex[:8],
                commit_delay=self.settings.commit_delay,
                extra_options={"ro": True} if self.settings.read_only else None,
                on_ready=self._ready,
                on_operations=self._set_operations,
                handle_signals=False,
                spin=self.spinner or False,
            )
        except Exception as exc:
            log.exception("FUSE failed")
            self._report(f"error: cannot mount {self.mountpoint}: {exc}")
        # The FUSE loop ended: either a lock took the mount away (and will end the process
        # itself), or an outside unmount (fusermount -u) or a failure, which locks now.
        if not self.trigger_lock("exit", "fuse"):
            time.sleep(COMMIT_HARD_LIMIT + 30)
        return 0

    def _set_operations(self, operations: FuseServer) -> None:
        self.operations = operations

    def _ready(self) -> None:
        # Learn the FUSE connection number now, off the FUSE thread, so the lock need not.
        threading.Thread(target=self._learn_connection, name="kryptvault-conn", daemon=True).start()
        self._report("ok")
        self._start_desktop()

    def _start_desktop(self) -> None:
        try:
            prefs = load_vault_prefs(self.vault_uuid, Path(self.settings.container)) or VaultPrefs()
        except KryptvaultError as exc:
            log.warning("desktop settings ignored: %s", exc)
            prefs = VaultPrefs()
        # A failing commit during the lock is the lock's own notification to report.
        problem = lambda: None if self.lock.locked else self._save_problem()  # noqa: E731
        try:
            desktop = Desktop(self.vault_uuid.hex[:8], prefs, self.trigger_lock, problem)
            desktop.start()
        except Exception:  # a convenience: never a reason for the mount to fail
            log.exception("the desktop links did not start")
            return
        self.desktop = desktop

    def _learn_connection(self) -> None:
        for _ in range(100):
            conn = fusectl.connection_id(self.mountpoint, resolve=False)
            if conn is not None:
                self.connection = conn
                return
            time.sleep(0.02)

    def _wait_for_signals(self) -> None:
        sig = signal.sigwait(LOCK_SIGNALS)
        self.trigger_lock("signal", signal.Signals(sig).name)

    def _token_event(self, kind: str, details: dict[str, object]) -> None:
        entry = make_entry(kind, str(self.vault_uuid), {k: str(v) for k, v in details.items()})
        if kind == "token_removed":
            self._removed_at = time.monotonic()
            with self._pending_lock:
                if not self._lock_audited:  # the lock that follows writes it
                    self._pending_audit.append(entry)
                    return
        self.audit.append_entries([entry])

    def _idle_expired(self) -> bool:
        minutes = self.settings.idle_lock_minutes
        assert self.fs is not None and minutes
        return time.monotonic() - self.fs.last_activity >= minutes * 60

    # ------------------------------------------------------------------ control API
    def _start_control(self) -> None:
        handlers: dict[str, Handler] = {
            "status": self._op_status,
            "lock": self._op_lock,
            "commit": self._op_commit,
            "backup-hold": self._op_backup_hold,
            "backup-release": self._op_backup_release,
        }
        # One socket per container file: a restored copy mounts beside its vault.
        path = socket_path_for(self.vault_uuid, container_instance(os.fstat(self.fd)))
        self.control = ControlServer(path, handlers, self.audit, mountpoint=self.mountpoint)
        self.control.start()

    def status(self) -> dict[str, object]:
        store = self.store
        return {
            "vault": str(self.vault_uuid),
            "container": self.settings.container,
            "mountpoint": str(self.mountpoint),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "token": self.token.identity.describe() if self.token else "recovery key",
            "generation": store.generation if store else None,
            "dirty_bytes": store.dirty_bytes() if store else 0,
            "last_commit_age_seconds": self._last_commit_age(),
            "backup_holds": self.backup_holds,
            "locking": self.lock.locked,
            "read_only": self.settings.read_only,
            "lineage": describe_lineage(store.lineage) if store else None,
            # Why changes cannot be saved (a commit failed; the vault refuses changes until
            # one succeeds), or None: `status` shows "ok": false with this as the reason.
            "problem": self._save_problem(),
        }

    def _save_problem(self) -> str | None:
        fs, store = self.fs, self.store
        problem = fs.save_failure if fs is not None else None
        if problem is None and store is not None:
            problem = store.save_problem
        return problem

    def _unsaved_bytes(self) -> int:
        return self.store.dirty_bytes() if self.store is not None else 0

    def _last_commit_age(self) -> float | None:
        stamp = self.fs.last_commit if self.fs else None
        return None if stamp is None else round(time.monotonic() - stamp, 1)

    def _op_status(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        return self.status()

    def _op_lock(self, request: dict[str, object], peer: PeerCred) -> AfterReply:
        # The udev removal unit locks through `kryptvault lock --reason unplug`.
        unplug = request.get("reason") == "unplug"
        reason, route = ("unplug", "udev") if unplug else ("command", f"control pid {peer.pid}")
        # The lock ends this process: it starts only once the answer is with the client.
        return AfterReply({"locking": True}, lambda: self.trigger_lock(reason, route))

    def _op_commit(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        return {"generation": self._commit_now()}

    def _commit_now(self) -> int:
        """Commit for a client: a failure is its answer (one line), not an internal error."""
        assert self.fs is not None
        try:
            return self.fs.commit()
        except OSError as exc:
            raise KryptvaultError(f"cannot commit: {exc.strerror or exc}") from None

    def _op_backup_hold(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        assert self.fs is not None and self.store is not None
        if self.lock.locked:
            raise KryptvaultError("the vault is locking")
        self._commit_now()
        generation, head = self.store.hold_reuse_with_head()
        with self._holds_lock:
            self._holds.append(peer.pid)
        return {"generation": generation, "header_area": base64.b64encode(head).decode()}

    def _op_backup_release(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        assert self.store is not None
        with self._holds_lock:
            if peer.pid not in self._holds:
                raise KryptvaultError("this process holds no backup hold")
            self._holds.remove(peer.pid)
        self.store.release_reuse()
        return {"released": True}

    def _reap_holds(self) -> None:
        """A backup killed mid-way never releases its hold: release holds of dead processes,
        so freed space does not stay blocked until the next lock."""
        with self._holds_lock:
            dead = [pid for pid in self._holds if not Path(f"/proc/{pid}").exists()]
            for pid in dead:
                self._holds.remove(pid)
        for pid in dead:
            if self.store is not None:
                self.store.release_reuse()
            self.audit.append("backup_hold_expired", vault=str(self.vault_uuid), pid=pid)

    @property
    def backup_holds(self) -> int:
        return len(self._holds)

    # ------------------------------------------------------------------ locking
    def trigger_lock(self, reason: str, route: str) -> bool:
        if not self.lock.locked:
            # The lock's thread must not queue for the GIL behind bulk work (a commit, the
            # poll thread) for the default 5 ms a turn; nothing else matters any more.
            sys.setswitchinterval(0.0005)
        return self.lock.trigger(reason, route)

    def _refuse(self) -> None:
        timings = _Stopwatch(self.lock.outcome, "refuse")
        if self.operations is not None:
            # The writeback cache holds data that write(2) already accepted: have the
            # kernel write it back (only that is served meanwhile) before the seal.
            if not self.operations.drain(DRAIN_TIMEOUT):
                log.error("the kernel's dirty pages were not all written back in %.0f s", DRAIN_TIMEOUT)
            timings.lap("drain")
        if self.fs is not None:
            self.fs.seal()
        timings.lap("seal")

    def _run_on_commit_thread(self, job: Callable[[], None]) -> bool:
        """The lock's commit goes to the thread that commits in the background (it starts
        when the kernel connects, so a lock before that starts a thread of its own)."""
        scheduler = self.operations.scheduler if self.operations is not None else None
        return scheduler is not None and scheduler.run_soon(job)

    def _needs_commit(self) -> bool:
        return self.fs is not None and self.fs.has_unsaved_changes()

    def _commit(self) -> int:
        assert self.fs is not None
        return self.fs.commit_sealed()

    def _record_generation_at_lock(self, generation: int) -> bool:
        outcome = self.lock.outcome
        # After an unplug the token has just left; asking it costs time and cannot work:
        # its record is at most one RECORD_INTERVAL behind (_chores).
        # The local record waits too: its fsync would delay taking the mount away.
        if outcome is not None and outcome.reason == "unplug":
            return False
        return self._record_generation(generation)

    def _take_mount_away(self) -> None:
        timings = _Stopwatch(self.lock.outcome, "take_mount_away")
        conn = self.connection or fusectl.connection_id(self.mountpoint, resolve=False)
        if self.operations is not None:
            # First, while the connection still carries notifications.
            self.operations.invalidate_open_files()
        timings.lap("invalidate")
        # Measured in the TCG guest: running the lazy unmount in a thread beside the abort
        # saves nothing (the kernel's work in it is CPU, not waiting), so plain order it is.
        fusectl.detach(self.mountpoint)
        timings.lap("detach")
        if conn is not None:
            fusectl.abort_connection(conn)
        timings.lap("abort")

    def _wipe(self) -> None:
        # The process exits right after the audit entry, and its end is the wipe that
        # counts (AESGCM objects and cached plaintext cannot be zeroed from Python): here
        # only what must not outlive the lock by even that long. The socket goes, so no
        # client talks to a dying daemon; the store takes no more work; the key buffers
        # (wiped once the store had them) are wiped again in case a failure skipped it.
        # Nothing is joined or freed: that is exit's job, done once, by the kernel.
        if self.control is not None:
            with contextlib.suppress(Exception):
                self.control.abandon()
        if self._writer_lock is not None:
            self._writer_lock.remove_name()  # held until exit all the same
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.abandon()
        for key in self._keys:
            key.wipe()

    def _start_backup_after_lock(self) -> None:
        """Every lock is a backup: a detached process waits for this one to exit (and let
        go of the container), then backs up to each reachable destination. Starting it
        costs the lock a fork, not the backup."""
        try:
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kryptvault.cli.main",
                    "backup",
                    "auto",
                    self.settings.container,
                    "--after-lock",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            log.exception("could not start the backup after the lock")

    def _audit_lock(self, outcome: LockOutcome) -> None:
        entry = make_entry(
            "lock",
            str(self.vault_uuid),
            {
                "reason": outcome.reason,
                "route": outcome.route,
                "generation": outcome.generation,
                "commit_ms": _ms(outcome.commit_seconds),
                "commit_late": outcome.commit_late,
                "token_updated": outcome.token_updated,
                "error": outcome.commit_error,
                "unsaved_bytes": outcome.unsaved_bytes,
                "pid": os.getpid(),  # lets `kryptvault lock` find this lock's entry
            },
        )
        with self._pending_lock:
            entries, self._pending_audit = [*self._pending_audit, entry], []
            self._lock_audited = True
        self.audit.append_entries(entries)

    def _finish(self, outcome: LockOutcome) -> None:
        log.info("locked (%s via %s) in %.0f ms", outcome.reason, outcome.route, outcome.seconds * 1000)
        removed_at = self._removed_at
        if removed_at is not None and outcome.reason == "unplug":
            outcome.step_ms["removal_to_start"] = (outcome.started - removed_at) * 1000
        log.info("lock steps (ms): %s", outcome.describe_steps())
        if self.backup_after_lock:
            self._start_backup_after_lock()
        if self.desktop is not None:
            # After the commit and the audit entry: only now may the machine sleep.
            with contextlib.suppress(Exception):  # nothing may stand between the lock and exit
                self.desktop.notify_locked(outcome.reason, outcome.commit_error)
            with contextlib.suppress(Exception):
                self.desktop.release()
        logging.shutdown()
        # Ending the key-holding process is the only certain wipe (AESGCM keeps key copies).
        os._exit(1 if outcome.commit_error else 0)


class _Stopwatch:
    """Sub-step times of a lock step, added to the outcome as `step.part` entries."""

    def __init__(self, outcome: LockOutcome | None, step: str) -> None:
        self._outcome = outcome
        self._step = step
        self._last = time.monotonic()

    def lap(self, part: str) -> None:
        now = time.monotonic()
        if self._outcome is not None:
            self._outcome.step_ms[f"{self._step}.{part}"] = (now - self._last) * 1000
        self._last = now


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def run_daemon(
    settings: SessionSettings,
    data_key: Secret,
    meta_key: Secret,
    report: Callable[[str], None],
    spinner: CpuSpinner | None = None,
) -> int:
    """`spinner`: made at the daemon's start, before any key arrived (None: no spinning)."""
    session = MountSession(settings, data_key, meta_key, report, spinner)
    try:
        session.open()
    except KryptvaultError as exc:
        session.audit.append("mount_failed", vault=settings.vault_uuid, error=str(exc))
        report(f"error: {exc}")
        return 1
    except OSError as exc:
        report(f"error: {exc.strerror or exc}")
        return 1
    if not os.path.isdir(settings.mountpoint):
        report(f"error: the mount point {settings.mountpoint} is not a directory")
        return 1
    return session.run()
