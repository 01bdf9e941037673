"""The click group every command hangs on, and the one place errors become exit codes.

Exit codes: 0 success; 1 the operation failed (wrong password, damaged container, token
missing...); 2 bad usage or bad input (click's own convention); 130 interrupted.

A reader that stops reading (`kryptvault log | head -1`) ends the command as it ends
`git log` or `cat`: silently, by SIGPIPE (status 141 in the shell). Not 0: output the
caller asked for was not delivered, which matters when a command did work before printing.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Any, NoReturn

import click

from kryptvault import __version__
from kryptvault.cli import output
from kryptvault.errors import KryptvaultError


class KryptvaultGroup(click.Group):
    """Turns our own errors into one clean line and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KryptvaultError as exc:
            fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail(ctx, "interrupted", 130)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            fail(ctx, exc.format_message() + hint, 2)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) and stdout_reader_gone():
                end_by_sigpipe()
            where = f": {exc.filename}" if exc.filename else ""
            fail(ctx, f"{exc.strerror or exc}{where}", 1)
        except Exception as exc:
            if output.debug_enabled():
                raise
            fail(ctx, f"internal error ({type(exc).__name__}); rerun with --debug for details", 1)


def fail(ctx: click.Context, message: str, code: int) -> NoReturn:
    click.echo(f"kryptvault: {_one_line(message)}", err=True)
    ctx.exit(code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def stdout_reader_gone() -> bool:
    """Whether our stdout is a pipe or socket nobody reads any more. Asked, not assumed
    from EPIPE: a broken pipe to some other process (a helper we write to) is a failure
    to report, not a reader that has seen enough."""
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else -1
    except (OSError, ValueError):
        return False
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    # Linux flags the write end of a pipe without readers (and a shut socket) POLLERR.
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def end_by_sigpipe() -> NoReturn:
    """End as a C program does when its reader goes away: killed by SIGPIPE, no message.
    Python ignores SIGPIPE (and so got EPIPE): restore the default and raise it. Output
    only: the daemon, which writes to sockets, never comes here."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGPIPE})
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal's default action ends us


@click.group(cls=KryptvaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kryptvault")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors (no progress, no notes).")
@click.option("-v", "--verbose", is_flag=True, help="Say more about what is done (on stderr).")
@click.option(
    "--debug",
    is_flag=True,
    help="Show a traceback on an internal error (as KRYPTVAULT_DEBUG=1 does).",
)
def cli(quiet: bool, verbose: bool, debug: bool) -> None:
    """An encrypted virtual disk that opens only with your password and your USB key.

    Exit codes: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted.
    """
    output.configure(quiet, verbose, debug)


def main() -> None:
    from kryptvault.cli import register_commands

    register_commands()
    try:
        cli.main(prog_name="kryptvault")
    except KeyboardInterrupt:  # outside a command, e.g. while click parses
        click.echo("kryptvault: interrupted", err=True)
        sys.exit(130)
