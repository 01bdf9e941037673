"""The lock sequence: one latch, then a fixed order of steps, however many routes fire.

Order (issue "Lock on unplug"): latch → refuse new operations (EIO) → commit what was
accepted, within a deadline → record the commit generation on the token if it is still
reachable → drop cached plaintext of open files and take the mount away (lazy unmount,
abort the FUSE connection) → wipe keys → audit → exit. If the commit overruns its
deadline, the mount is taken away anyway (no process may read plaintext meanwhile) and
the commit is still waited for before the keys are wiped: accepted writes are never lost.

Every step's duration goes into `LockOutcome.step_ms` (the daemon logs it), so a slow lock
shows where its time went (tests/test_e2e_unplug.py prints them per step).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("kryptvault.lock")

COMMIT_HARD_LIMIT = 60.0


@dataclass
class LockSteps:
    refuse: Callable[[], None]
    needs_commit: Callable[[], bool]
    commit: Callable[[], int]
    record_generation: Callable[[int], bool]
    take_mount_away: Callable[[], None]
    wipe: Callable[[], None]
    audit: Callable[[LockOutcome], None]
    finish: Callable[[LockOutcome], None]
    # Bytes accepted since the last commit, asked when the final commit failed: what
    # the lock could not save (None: not known).
    unsaved_bytes: Callable[[], int] | None = None


@dataclass
class LockOutcome:
    reason: str
    route: str
    started: float
    generation: int | None = None
    commit_seconds: float | None = None
    commit_late: bool = False
    commit_error: str | None = None
    unsaved_bytes: int | None = None  # set when the commit failed: what was lost
    token_updated: bool = False
    steps: list[str] = field(default_factory=list)
    step_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def describe_steps(self) -> str:
        """`refuse=0.4 commit=0.0 ...`: where the lock spent its time, in ms."""
        return " ".join(f"{name}={ms:.1f}" for name, ms in self.step_ms.items())


def describe_error(exc: BaseException) -> str:
    """One line for the audit log and the user: an OSError's own text without the
    "[Errno N]" prefix, anything else with its type."""
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return f"{type(exc).__name__}: {exc}"


class LockSequence:
    """`commit_runner`, if given, hands the commit to a thread that is already waiting
    (the filesystem's commit scheduler) and says whether it took it; the sequence then
    needs no thread of its own, one fewer for the daemon's exit to end (~1 ms each in the
    TCG guest). When it cannot (no such thread yet), a thread started then runs it."""

    def __init__(
        self,
        steps: LockSteps,
        commit_deadline: float = 0.2,
        commit_runner: Callable[[Callable[[], None]], bool] | None = None,
    ) -> None:
        self._steps = steps
        self._deadline = commit_deadline
        self._commit_runner = commit_runner
        self._latch = threading.Lock()
        self._locked = False
        self.outcome: LockOutcome | None = None

    @property
    def locked(self) -> bool:
        return self._locked

    def trigger(self, reason: str, route: str) -> bool:
        """Run the sequence once; every later call returns False at once."""
        with self._latch:
            if self._locked:
                return False
            self._locked = True
        outcome = LockOutcome(reason, route, time.monotonic())
        self.outcome = outcome
        steps = self._steps
        try:
            self._run(outcome, steps)
        finally:
            outcome.seconds = time.monotonic() - outcome.started
            steps.finish(outcome)
        return True

    def _run(self, outcome: LockOutcome, steps: LockSteps) -> None:
        self._step(outcome, "refuse", steps.refuse)
        if not steps.needs_commit():
            # Nothing accepted is unsaved: the commit is a no-op that only reads the
            # generation, so no thread (and no deadline) is needed.
            start = time.monotonic()
            outcome.generation = steps.commit()
            outcome.commit_seconds = time.monotonic() - start
            self._after_commit(outcome, steps)
            self._step(outcome, "take_mount_away", steps.take_mount_away)
            self._step(outcome, "wipe", steps.wipe)
            self._step(outcome, "audit", lambda: steps.audit(outcome))
            return
        done = threading.Event()

        def commit() -> None:
            start = time.monotonic()
            try:
                outcome.generation = steps.commit()
            except Exception as exc:  # keep locking: the keys must still go
                outcome.commit_error = describe_error(exc)
                log.exception("commit during lock failed")
                if steps.unsaved_bytes is not None:
                    try:
                        outcome.unsaved_bytes = steps.unsaved_bytes()
                    except Exception:
                        log.exception("cannot tell how much the failed commit left unsaved")
            finally:
                outcome.commit_seconds = time.monotonic() - start
                done.set()

        if self._commit_runner is None or not self._commit_runner(commit):
            # A thread started now took 6-21 ms to run in the TCG guest (the request loops
            # hold the GIL then), hence the runner's waiting thread whenever there is one.
            # It inherits the lock thread's signal mask (the lock signals blocked).
            threading.Thread(target=commit, name="kryptvault-lock-commit", daemon=True).start()
        if done.wait(self._deadline):
            self._after_commit(outcome, steps)
            self._step(outcome, "take_mount_away", steps.take_mount_away)
        else:
            outcome.commit_late = True
            self._step(outcome, "take_mount_away", steps.take_mount_away)
            done.wait(COMMIT_HARD_LIMIT)
            self._after_commit(outcome, steps)
        self._step(outcome, "wipe", steps.wipe)
        self._step(outcome, "audit", lambda: steps.audit(outcome))

    def _after_commit(self, outcome: LockOutcome, steps: LockSteps) -> None:
        """The commit is over (in time or late): note it, then record its generation."""
        outcome.steps.append("commit")
        outcome.step_ms["commit"] = (outcome.commit_seconds or 0.0) * 1000
        if outcome.generation is None:
            return
        start = time.monotonic()
        try:
            outcome.token_updated = steps.record_generation(outcome.generation)
        except Exception:
            log.exception("recording the generation on the token failed")
        outcome.steps.append("record_generation")
        outcome.step_ms["record_generation"] = (time.monotonic() - start) * 1000

    @staticmethod
    def _step(outcome: LockOutcome, name: str, action: Callable[[], None]) -> None:
        start = time.monotonic()
        try:
            action()
        except Exception:
            log.exception("lock step %s failed", name)
        outcome.steps.append(name)
        outcome.step_ms[name] = (time.monotonic() - start) * 1000
