"""The one progress display of the command line: a bar or a phase line on stderr, only
when stderr is a terminal (and not with -q or --json); nothing at all otherwise."""

from __future__ import annotations

import sys
import time

import click

from kryptvault.cli import output
from kryptvault.cli.units import human_size

WIDTH = 100


class Progress:
    """A one-line progress bar on stderr (bytes, rate, ETA; or a count of `unit`), and
    phase lines ("calibrating Argon2id…") for work that has no measurable steps."""

    def __init__(self, label: str, enabled: bool = True, unit: str | None = None) -> None:
        self.label = label
        self.enabled = enabled and not output.current.quiet and sys.stderr.isatty()
        self.unit = unit  # None: bytes
        self.started = time.monotonic()
        self.last = 0.0
        self.shown = False
        self.detail = ""  # appended to the bar, e.g. chunk counts

    def _amount(self, n: float) -> str:
        return human_size(n) if self.unit is None else f"{int(n)}"

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and (not total or done < total):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        line = f"{self.label}: {self._amount(done)}{unit}"
        if total:
            width = 24
            filled = min(width, int(width * done / total))
            eta = (total - done) / rate if rate > 0 else 0.0
            speed = f"{human_size(rate)}/s" if self.unit is None else f"{rate:.0f}{unit}/s"
            line = (
                f"{self.label}: [{'#' * filled}{'.' * (width - filled)}] "
                f"{self._amount(done)} / {self._amount(total)}{unit}"
                f"  {speed}  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
            )
        if self.detail:
            line += f"  {self.detail}"
        self._show(line)

    def phase(self, text: str) -> None:
        """Name the step now running, e.g. a key derivation that takes a second."""
        if self.enabled:
            self._show(f"{self.label}: {text}…")

    def _show(self, line: str) -> None:
        click.echo("\r" + line.ljust(WIDTH)[:WIDTH], nl=False, err=True)
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            click.echo("\r" + " " * WIDTH + "\r", nl=False, err=True)
            self.shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
