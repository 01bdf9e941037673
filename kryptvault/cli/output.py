"""How chatty the command line is: the top-level -q/-v/--debug flags, in one place.

Reset by the top-level group on every invocation (tests run many in one process).
Errors are never affected: they always print their one line on stderr.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import click


@dataclass
class Verbosity:
    quiet: bool = False
    verbose: bool = False
    debug: bool = False


current = Verbosity()


def configure(quiet: bool, verbose: bool, debug: bool) -> None:
    current.quiet, current.verbose, current.debug = quiet, verbose and not quiet, debug
    level = logging.DEBUG if debug else (logging.INFO if current.verbose else logging.WARNING)
    logging.getLogger("kryptvault").setLevel(level)


def debug_enabled() -> bool:
    """--debug, or KRYPTVAULT_DEBUG in the environment (for the daemon and old scripts)."""
    return current.debug or bool(os.environ.get("KRYPTVAULT_DEBUG"))


def say(message: str, err: bool = False) -> None:
    """An informational line (what was done); -q leaves it out. Data the user asked for
    (listings, --json, a recovery key) does not go through here."""
    if not current.quiet:
        click.echo(message, err=err)


def detail(message: str) -> None:
    """Extra detail for -v, on stderr so that stdout stays what scripts parse."""
    if current.verbose:
        click.echo(message, err=True)
