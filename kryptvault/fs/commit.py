"""A background thread that commits at most `delay` seconds after the first unsaved change."""

from __future__ import annotations

import logging
import threading
import time
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("CommitScheduler already started")
        self._thread = threading.Thread(target=self._run, name="kryptvault-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = self.delay - self.interval
        while not self._stop.wait(self.interval):
            try:
                since = self.fs.dirty_since()
                if since is not None and time.monotonic() - since >= deadline:
                    self.fs.commit()
            except Exception:  # keep committing later; the error is in the log
                self.failures += 1
                log.exception("background commit failed")

    def stop(self, commit: bool = True) -> None:
        self._stop.set()
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
