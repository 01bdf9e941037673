"""A background thread that commits at most `delay` seconds after the first unsaved change,
and runs the jobs handed to it (the mount's lock runs its commit there: a thread already
waiting, and none more for the daemon's exit to end)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("kryptvault.fs")


class Committable(Protocol):
    def dirty_since(self) -> float | None: ...
    def commit(self) -> int: ...


class CommitScheduler:
    """Owns one daemon thread; `start()` once, `stop()` to end it (optionally committing)."""

    def __init__(self, fs: Committable, delay: float = 5.0, interval: float = 0.25) -> None:
        self.fs = fs
        self.delay = delay
        self.interval = min(interval, delay)
        self.failures = 0
        # Jobs for the thread; None ends it. Every job accepted before `stop` runs.
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._jobs_lock = threading.Lock()
        self._accepting = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("CommitScheduler already started")
        self._thread = threading.Thread(target=self._run, name="kryptvault-commit", daemon=True)
        with self._jobs_lock:
            self._accepting = True
        self._thread.start()

    def run_soon(self, job: Callable[[], None]) -> bool:
        """Run `job` on the scheduler's thread, after the commit it may be in; False if the
        thread is not running (not started, or stopped), and `job` will not run."""
        with self._jobs_lock:
            if not self._accepting:
                return False
            self._jobs.put(job)
            return True

    def _run(self) -> None:
        deadline = self.delay - self.interval
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=self.interval)
            except queue.Empty:
                self._commit_if_due(deadline)
                continue
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("a job on the commit thread failed")

    def _commit_if_due(self, deadline: float) -> None:
        try:
            since = self.fs.dirty_since()
            if since is not None and time.monotonic() - since >= deadline:
                self.fs.commit()
        except Exception:  # keep committing later; the error is in the log
            self.failures += 1
            log.exception("background commit failed")

    def stop(self, commit: bool = True) -> None:
        with self._jobs_lock:
            if self._accepting:
                self._accepting = False
                self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if commit and self.fs.dirty_since() is not None:
            self.fs.commit()

    def __enter__(self) -> CommitScheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
