"""Options shared by several commands, so they read and behave the same everywhere."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
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


def pin_option(f: F) -> F:
    return click.option(
        "--pin-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A FIDO2 security key's PIN, from this file (default: asked on the terminal when needed).",
    )(f)


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


@dataclass(frozen=True)
class UnlockArgs:
    """How the command line says to open the vault: a token and a password, or the recovery key.

    Holds the options as given, unchecked: "--password-fd and --password-file together" is
    refused only when a command asks for the password, so that checks made before that
    (mount point, token, a verify without --full that never reads a password) still come
    first, as they did when each command took the options one by one.
    """

    token_spec: str | None = None
    password_fd: int | None = None
    password_file: Path | None = None
    recovery: bool = False
    recovery_key_file: Path | None = None
    pin_file: Path | None = None

    def pin_asker(self) -> Callable[[], Secret]:
        """Asks for a FIDO2 key's PIN (only called when the key's slot requires it)."""
        source = SecretSource(file=self.pin_file)
        return lambda: read_secret(source, "Security key PIN: ", what="PIN")

    def password_source(self) -> SecretSource:
        return password_source(self.password_fd, self.password_file)

    def password_asker(self, prompt: str = "Password: ") -> Callable[[], Secret]:
        source = self.password_source()
        return lambda: read_secret(source, prompt)

    def recovery_asker(self) -> Callable[[], Secret] | None:
        if not self.recovery and self.recovery_key_file is None:
            return None
        source = SecretSource(file=self.recovery_key_file)
        return lambda: read_secret(source, "Recovery key: ", what="recovery key")


def pass_unlock_args(
    spec_param: str = "token_spec",
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give the command one `unlock: UnlockArgs` in place of the token, password and
    recovery options; `spec_param` names the token option's parameter."""

    def decorate(f: Callable[..., None]) -> Callable[..., None]:
        # wraps also carries over the options already attached to f (click collects them
        # in f.__click_params__), so the order in --help stays as the decorators list it.
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> None:
            unlock = UnlockArgs(
                token_spec=kwargs.pop(spec_param),
                password_fd=kwargs.pop("password_fd"),
                password_file=kwargs.pop("password_file"),
                # passwd has no recovery options: the recovery key cannot stand in for
                # the token + password whose slot it changes.
                recovery=kwargs.pop("recovery", False),
                recovery_key_file=kwargs.pop("recovery_key_file", None),
                pin_file=kwargs.pop("pin_file", None),
            )
            f(*args, unlock=unlock, **kwargs)

        return command

    return decorate


def unlock_options(f: Callable[..., None]) -> Callable[..., None]:
    """Token + password, or the recovery key: how every command that opens a vault asks."""
    return token_option()(password_options(pin_option(recovery_options(pass_unlock_args()(f)))))
