"""The lock sequence: its order, its deadline, and exactly one lock however many routes fire."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

from kryptvault.fs.commit import CommitScheduler
from kryptvault.session.lock import LockOutcome, LockSequence, LockSteps
from kryptvault.session.rollback import RollbackDetected, check_rollback


class Recorder:
    def __init__(self, commit_seconds: float = 0.0, token_present: bool = True, dirty: bool = True) -> None:
        self.dirty = dirty
        self.events: list[str] = []
        self.finished: list[LockOutcome] = []
        self.commit_seconds = commit_seconds
        self.token_present = token_present
        self._lock = threading.Lock()

    def note(self, name: str) -> None:
        with self._lock:
            self.events.append(name)

    def steps(self) -> LockSteps:
        def commit() -> int:
            time.sleep(self.commit_seconds)
            self.note("commit")
            return 42

        def record(generation: int) -> bool:
            self.note(f"record:{generation}")
            return self.token_present

        return LockSteps(
            refuse=lambda: self.note("refuse"),
            needs_commit=lambda: self.dirty,
            commit=commit,
            record_generation=record,
            take_mount_away=lambda: self.note("take_mount_away"),
            wipe=lambda: self.note("wipe"),
            audit=lambda outcome: self.note(f"audit:{outcome.reason}"),
            finish=self.finished.append,
        )


def test_lock_runs_its_steps_in_the_specified_order() -> None:
    rec = Recorder()
    assert LockSequence(rec.steps(), commit_deadline=1.0).trigger("unplug", "uevent")
    assert rec.events == ["refuse", "commit", "record:42", "take_mount_away", "wipe", "audit:unplug"]
    (outcome,) = rec.finished
    assert outcome.generation == 42 and not outcome.commit_late and outcome.token_updated


def test_the_outcome_says_how_long_each_step_took_in_the_order_they_ran() -> None:
    rec = Recorder(commit_seconds=0.05)
    steps = rec.steps()
    steps.take_mount_away = lambda: time.sleep(0.03)
    assert LockSequence(steps, commit_deadline=1.0).trigger("unplug", "uevent")
    (outcome,) = rec.finished
    order = ["refuse", "commit", "record_generation", "take_mount_away", "wipe", "audit"]
    assert list(outcome.step_ms) == order
    assert outcome.step_ms["commit"] >= 50 and outcome.step_ms["take_mount_away"] >= 30
    assert outcome.step_ms["refuse"] < 30
    assert sum(outcome.step_ms.values()) <= outcome.seconds * 1000 + 1
    assert outcome.describe_steps().startswith("refuse=") and " commit=" in outcome.describe_steps()


def test_with_nothing_unsaved_the_lock_commits_inline_in_the_same_order() -> None:
    rec = Recorder(dirty=False)
    assert LockSequence(rec.steps(), commit_deadline=0.001).trigger("unplug", "uevent")
    assert rec.events == ["refuse", "commit", "record:42", "take_mount_away", "wipe", "audit:unplug"]
    assert not rec.finished[0].commit_late


def test_a_slow_commit_does_not_keep_the_mount_but_is_still_waited_for_before_the_wipe() -> None:
    rec = Recorder(commit_seconds=0.3)
    start = time.monotonic()
    LockSequence(rec.steps(), commit_deadline=0.05).trigger("unplug", "poll")
    assert rec.events == ["refuse", "take_mount_away", "commit", "record:42", "wipe", "audit:unplug"]
    assert rec.finished[0].commit_late
    assert time.monotonic() - start >= 0.3


IN_ORDER = ["refuse", "commit", "record:42", "take_mount_away", "wipe", "audit:unplug"]
COMMIT_LATE = ["refuse", "take_mount_away", "commit", "record:42", "wipe", "audit:unplug"]


def _commit_thread() -> CommitScheduler:
    nothing_dirty = SimpleNamespace(dirty_since=lambda: None, commit=lambda: 0)
    scheduler = CommitScheduler(nothing_dirty, delay=5.0)
    scheduler.start()
    return scheduler


def _commit_on_thread_named(rec: Recorder) -> tuple[LockSteps, list[str]]:
    steps = rec.steps()
    names: list[str] = []
    commit = steps.commit

    def named_commit() -> int:
        names.append(threading.current_thread().name)
        return commit()

    steps.commit = named_commit
    return steps, names


def test_a_commit_runner_runs_the_commit_without_a_thread_of_the_lock() -> None:
    rec = Recorder()
    steps, names = _commit_on_thread_named(rec)
    scheduler = _commit_thread()
    threads_before = threading.active_count()
    try:
        sequence = LockSequence(steps, commit_deadline=1.0, commit_runner=scheduler.run_soon)
        assert sequence.trigger("unplug", "uevent")
        assert threading.active_count() == threads_before  # none started for the lock
    finally:
        scheduler.stop()
    assert names == ["kryptvault-commit"]
    assert rec.events == IN_ORDER


def test_a_runner_that_turns_the_commit_down_leaves_it_to_the_lock_s_own_thread() -> None:
    rec = Recorder()
    steps, names = _commit_on_thread_named(rec)
    scheduler = _commit_thread()
    scheduler.stop()  # e.g. the FUSE loop ended and stopped it
    sequence = LockSequence(steps, commit_deadline=1.0, commit_runner=scheduler.run_soon)
    assert sequence.trigger("unplug", "uevent")
    assert names == ["kryptvault-lock-commit"]
    assert rec.events == IN_ORDER


def test_a_commit_behind_a_busy_runner_is_late_but_still_waited_for_before_the_wipe() -> None:
    rec = Recorder()
    steps, names = _commit_on_thread_named(rec)
    scheduler = _commit_thread()
    try:
        assert scheduler.run_soon(lambda: time.sleep(0.4))  # a background commit in progress
        sequence = LockSequence(steps, commit_deadline=0.1, commit_runner=scheduler.run_soon)
        assert sequence.trigger("unplug", "uevent")
    finally:
        scheduler.stop()
    assert rec.events == COMMIT_LATE
    (outcome,) = rec.finished
    assert outcome.commit_late and outcome.generation == 42 and names == ["kryptvault-commit"]


def test_a_failing_step_does_not_stop_the_keys_from_being_wiped() -> None:
    rec = Recorder()
    steps = rec.steps()

    def broken_commit() -> int:
        raise OSError(5, "I/O error")

    steps.commit = broken_commit
    LockSequence(steps, commit_deadline=0.5).trigger("signal", "SIGTERM")
    assert rec.events == ["refuse", "take_mount_away", "wipe", "audit:signal"]
    assert rec.finished[0].commit_error and "I/O error" in rec.finished[0].commit_error


def test_concurrent_triggers_from_every_route_lock_exactly_once() -> None:
    routes = ["uevent", "poll", "udev", "control", "signal", "exit", "idle"]
    for round_ in range(200):
        rec = Recorder()
        sequence = LockSequence(rec.steps(), commit_deadline=1.0)
        results: list[bool] = []
        barrier = threading.Barrier(len(routes))

        def fire(route: str) -> None:
            barrier.wait()
            time.sleep(random.random() / 2000)
            results.append(sequence.trigger(route, route))

        threads = [threading.Thread(target=fire, args=(r,)) for r in routes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * (len(routes) - 1) + [True], round_
        assert len(rec.finished) == 1
        assert rec.events.count("wipe") == 1 and rec.events.count("refuse") == 1


def test_rollback_rule_alarms_only_when_the_token_saw_a_newer_state() -> None:
    assert check_rollback(10, 10, accept=False) is False
    assert check_rollback(12, 10, accept=False) is False  # a backup token that missed mounts
    assert check_rollback(5, 10, accept=True) is True
    try:
        check_rollback(5, 10, accept=False)
    except RollbackDetected as exc:
        assert "--accept-rollback" in str(exc) and "5 < 10" in str(exc)
    else:
        raise AssertionError("rollback not detected")
