"""Options shared by several commands, so they read and behave the same everywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kryptvault.cli.secrets_input import SecretSource, read_secret
from kryptvault.crypto.secret import Secret
from kryptvault.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

container_argument = click.argument("container", type=click.Path(dir_okay=False, path_type=Path))


def token_option(required: bool = False) -> Callable[[F], F]:
    return click.option(
        "--token",
        "token_spec",
        metavar="PATH|auto|SERIAL|fs:UUID",
        required=required,
        help="The token: a directory on a mounted drive, 'auto' (the only plugged stick), "
        "a stick's serial number, or fs:UUID for a removable filesystem. "
        "Default: the plugged token a keyslot records.",
    )


def password_options(f: F) -> F:
    f = click.option(
        "--password-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the password from the first line of this file (for scripts).",
    )(f)
    f = click.option(
        "--password-fd",
        type=int,
        metavar="N",
        help="Read the password from file descriptor N (for scripts).",
    )(f)
    return f


def recovery_options(f: F) -> F:
    f = click.option(
        "--recovery-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the recovery key from this file instead of the terminal.",
    )(f)
    f = click.option(
        "--recovery",
        is_flag=True,
        help="Open with the recovery key instead of token + password.",
    )(f)
    return f


def password_source(password_fd: int | None, password_file: Path | None) -> SecretSource:
    if password_fd is not None and password_file is not None:
        raise UsageError("give either --password-fd or --password-file, not both")
    return SecretSource(fd=password_fd, file=password_file)


def recovery_asker(recovery: bool, recovery_key_file: Path | None) -> Callable[[], Secret] | None:
    if not recovery and recovery_key_file is None:
        return None
    source = SecretSource(file=recovery_key_file)
    return lambda: read_secret(source, "Recovery key: ", what="recovery key")


def unlock_options(f: F) -> F:
    """Token + password, or the recovery key: how every command that opens a vault asks."""
    return token_option()(password_options(recovery_options(f)))
