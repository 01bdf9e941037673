"""One mounted vault: the key-holding daemon process and everything it runs.

The daemon opens the store with keys handed over by the unlocking process, serves the
filesystem over FUSE, watches the token, answers the control socket, and ends only
through the lock sequence (kryptvault/session/lock.py), whatever the trigger.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
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

from kryptvault.container.header import read_header
from kryptvault.container.store import ObjectStore
from kryptvault.crypto.secret import Secret, harden_process
from kryptvault.errors import KryptvaultError
from kryptvault.fs.filesystem import Filesystem
from kryptvault.fuseadapter.mount import serve
from kryptvault.fuseadapter.operations import KryptvaultOperations
from kryptvault.session import fusectl
from kryptvault.session.audit import AuditLog, Scalar, make_entry
from kryptvault.session.config import load_config
from kryptvault.session.control import ControlServer, PeerCred, socket_path_for
from kryptvault.session.handoff import SessionSettings
from kryptvault.session.lock import COMMIT_HARD_LIMIT, LockOutcome, LockSequence, LockSteps
from kryptvault.session.rollback import check_rollback
from kryptvault.token.base import Token
from kryptvault.token.resolve import resolve_token
from kryptvault.watcher.watcher import TokenWatcher

log = logging.getLogger("kryptvault.session")

LOCK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class MountSession:
    def __init__(
        self,
        settings: SessionSettings,
        data_key: Secret,
        meta_key: Secret,
        report: Callable[[str], None],
    ) -> None:
        self.settings = settings
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
        self.operations: KryptvaultOperations | None = None
        self.connection: int | None = None
        self._holds: list[int] = []  # pids of the backups holding reuse
        self._holds_lock = threading.Lock()
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
            ),
            commit_deadline=settings.lock_deadline_ms / 1000,
        )
        self._idle_deadline: float | None = None
        self.backup_after_lock = False
        # Audit entries of the token's removal wait for the lock's own audit step (one
        # write, one fsync, after the mount is gone) instead of delaying the lock's start.
        self._pending_audit: list[dict[str, Scalar]] = []
        self._pending_lock = threading.Lock()
        self._lock_audited = False
        self._removed_at: float | None = None

    # ------------------------------------------------------------------ start-up
    def open(self) -> None:
        """Open the container and filesystem; a failure here never leaves a mount behind."""
        harden_process()
        path = Path(self.settings.container)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KryptvaultError(f"cannot open {path}: {exc.strerror}")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise KryptvaultError(f"{path} is already mounted (another kryptvault holds it)")
        header = read_header(self.fd).header
        if header.vault_uuid != self.vault_uuid:
            raise KryptvaultError("the container changed while it was being unlocked")
        data_key, meta_key = self._keys
        try:
            self.store = ObjectStore.open(self.fd, header.layout, self.vault_uuid, data_key, meta_key)
        finally:
            data_key.wipe()
            meta_key.wipe()
        self._check_rollback()
        # statfs counts the free space of the disk the container can still grow into.
        self.fs = Filesystem(self.store, host_dir=str(path.parent))
        try:
            backup = load_config(self.vault_uuid)
            self.backup_after_lock = backup.after_lock and bool(backup.destinations)
        except KryptvaultError as exc:
            log.warning("automatic backups are off: %s", exc)

    def _check_rollback(self) -> None:
        assert self.store is not None
        spec = self.settings.token.get("spec")
        if not isinstance(spec, str):
            return  # opened with the recovery key: no token to compare with
        self.token = resolve_token(spec, vault_uuid=self.vault_uuid)
        seen = int(str(self.settings.token.get("generation", 0)))
        accept = bool(self.settings.token.get("accept_rollback"))
        if check_rollback(self.store.generation, seen, accept):
            self.audit.append(
                "rollback_accepted",
                vault=str(self.vault_uuid),
                container_generation=self.store.generation,
                token_generation=seen,
            )
        self._record_generation(self.store.generation, allow_lower=accept)

    def _record_generation(self, generation: int, allow_lower: bool = False) -> bool:
        token = self.token
        if token is None or not token.is_present():
            return False
        share = token.read_share(self.vault_uuid)
        try:
            if share.generation >= generation and not allow_lower:
                return True
            share.generation = generation
            token.write_share(share)
            return True
        finally:
            share.wipe()

    def run(self) -> int:
        """Serve until a lock; returns only if the lock did not end the process."""
        assert self.fs is not None
        signal.pthread_sigmask(signal.SIG_BLOCK, LOCK_SIGNALS)
        threading.Thread(target=self._wait_for_signals, name="kryptvault-signals", daemon=True).start()
        self._start_control()
        threading.Thread(target=self._reap_holds, name="kryptvault-holds", daemon=True).start()
        if self.token is not None:
            self.watcher = TokenWatcher(
                self.token, lambda route: self.trigger_lock("unplug", route), on_event=self._token_event
            )
            self.watcher.start()
        if self.settings.idle_lock_minutes:
            threading.Thread(target=self._idle_watch, name="kryptvault-idle", daemon=True).start()
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
                on_ready=self._ready,
                on_operations=self._set_operations,
            )
        except Exception as exc:
            log.exception("FUSE failed")
            self._report(f"error: cannot mount {self.mountpoint}: {exc}")
        # The FUSE loop ended: either a lock took the mount away (and will end the process
        # itself), or an outside unmount (fusermount -u) or a failure, which locks now.
        if not self.trigger_lock("exit", "fuse"):
            time.sleep(COMMIT_HARD_LIMIT + 30)
        return 0

    def _set_operations(self, operations: KryptvaultOperations) -> None:
        self.operations = operations

    def _ready(self) -> None:
        # Learn the FUSE connection number now, off the FUSE thread, so the lock need not.
        threading.Thread(target=self._learn_connection, name="kryptvault-conn", daemon=True).start()
        self._report("ok")

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

    def _idle_watch(self) -> None:
        assert self.fs is not None and self.settings.idle_lock_minutes
        limit = self.settings.idle_lock_minutes * 60
        while not self.lock.locked:
            idle = time.monotonic() - self.fs.last_activity
            if idle >= limit:
                self.trigger_lock("idle", "timer")
                return
            time.sleep(min(5.0, limit - idle))

    # ------------------------------------------------------------------ control API
    def _start_control(self) -> None:
        handlers = {
            "status": self._op_status,
            "lock": self._op_lock,
            "commit": self._op_commit,
            "backup-hold": self._op_backup_hold,
            "backup-release": self._op_backup_release,
        }
        self.control = ControlServer(socket_path_for(self.vault_uuid), handlers, self.audit)
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
        }

    def _last_commit_age(self) -> float | None:
        stamp = self.fs.last_commit if self.fs else None
        return None if stamp is None else round(time.monotonic() - stamp, 1)

    def _op_status(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        return self.status()

    def _op_lock(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        # The udev removal unit locks through `kryptvault lock --reason unplug`.
        unplug = request.get("reason") == "unplug"
        reason, route = ("unplug", "udev") if unplug else ("command", f"control pid {peer.pid}")
        threading.Thread(target=self.trigger_lock, args=(reason, route), daemon=True).start()
        return {"locking": True}

    def _op_commit(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        assert self.fs is not None
        return {"generation": self.fs.commit()}

    def _op_backup_hold(self, request: dict[str, object], peer: PeerCred) -> dict[str, object]:
        assert self.fs is not None and self.store is not None
        if self.lock.locked:
            raise KryptvaultError("the vault is locking")
        self.fs.commit()
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
        while not self.lock.locked:
            time.sleep(1.0)
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
        if self.fs is not None:
            self.fs.seal()

    def _needs_commit(self) -> bool:
        return self.fs is not None and self.fs.has_unsaved_changes()

    def _commit(self) -> int:
        assert self.fs is not None
        return self.fs.commit_sealed()

    def _record_generation_at_lock(self, generation: int) -> bool:
        outcome = self.lock.outcome
        if outcome is not None and outcome.reason == "unplug":
            return False  # the token has just left; asking it costs time and cannot work
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
    settings: SessionSettings, data_key: Secret, meta_key: Secret, report: Callable[[str], None]
) -> int:
    session = MountSession(settings, data_key, meta_key, report)
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
