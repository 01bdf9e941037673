"""The click group every command hangs on, and the one place errors become exit codes.

Exit codes: 0 success; 1 the operation failed (wrong password, damaged container, token
missing...); 2 bad usage or bad input (click's own convention); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from kryptvault import __version__
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
            where = f": {exc.filename}" if exc.filename else ""
            fail(ctx, f"{exc.strerror or exc}{where}", 1)
        except Exception as exc:
            if os.environ.get("KRYPTVAULT_DEBUG"):
                raise
            fail(ctx, f"internal error ({type(exc).__name__}); rerun with KRYPTVAULT_DEBUG=1 for details", 1)


def fail(ctx: click.Context, message: str, code: int) -> NoReturn:
    click.echo(f"kryptvault: {_one_line(message)}", err=True)
    ctx.exit(code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=KryptvaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kryptvault")
def cli() -> None:
    """An encrypted virtual disk that opens only with your password and your USB key.

    Exit codes: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted.
    """


def main() -> None:
    from kryptvault.cli import register_commands

    register_commands()
    try:
        cli.main(prog_name="kryptvault")
    except KeyboardInterrupt:  # outside a command, e.g. while click parses
        click.echo("kryptvault: interrupted", err=True)
        sys.exit(130)
