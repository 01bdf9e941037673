"""Reading passwords and recovery keys without them ever becoming Python `str` objects.

Sources: the controlling terminal (echo off), an inherited file descriptor, or a file.
Never argv and never the environment: both are readable by other processes via /proc.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kryptvault.crypto.secret import Secret
from kryptvault.errors import UsageError

MAX_SECRET_INPUT = 1024
MIN_PASSWORD_CHARS = 10


@dataclass(frozen=True)
class SecretSource:
    """Where a secret comes from, as the user gave it on the command line."""

    fd: int | None = None
    file: Path | None = None

    @property
    def scripted(self) -> bool:
        return self.fd is not None or self.file is not None


def _strip_newline(buf: bytearray) -> None:
    while buf and buf[-1] in (0x0A, 0x0D):
        buf.pop()


def _read_stream(fd: int, what: str) -> Secret:
    buf = bytearray(MAX_SECRET_INPUT + 1)
    filled = 0
    try:
        with memoryview(buf) as view:
            while filled < len(buf):
                got = os.readv(fd, [view[filled:]])
                if got == 0:
                    break
                newline = buf.find(b"\n", filled, filled + got)
                filled += got
                if newline >= 0:
                    filled = newline
                    break
        if filled > MAX_SECRET_INPUT:
            raise UsageError(f"the {what} is longer than {MAX_SECRET_INPUT} bytes")
        line = bytearray(buf[:filled])
        _strip_newline(line)
        try:
            return _from_line(line)
        finally:
            line[:] = bytes(len(line))
    finally:
        buf[:] = bytes(len(buf))


def _from_line(line: bytearray) -> Secret:
    # A zero-length Secret cannot exist (mmap of 0 bytes); an empty input becomes a
    # one-byte secret flagged as empty so that the strength check can name the problem.
    if not line:
        return EmptySecret()
    return Secret.from_bytes(line)


class EmptySecret(Secret):
    def __init__(self) -> None:
        super().__init__(1)

    def __len__(self) -> int:
        return 0

    def view(self) -> memoryview:
        return super().view()[:0]


def read_from_fd(fd: int, what: str) -> Secret:
    try:
        return _read_stream(fd, what)
    except OSError as exc:
        raise UsageError(f"cannot read the {what} from file descriptor {fd}: {exc.strerror}")


def read_from_file(path: Path, what: str) -> Secret:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}")
    try:
        return _read_stream(fd, what)
    finally:
        os.close(fd)


# What to say instead of a prompt when there is no terminal: the options that give it.
_SCRIPTED_OPTIONS = {
    "password": "--password-fd N or --password-file PATH",
    "new password": "--new-password-fd N or --new-password-file PATH",
    "recovery key": "--recovery-key-file PATH",
    "PIN": "--pin-file PATH",
}


@contextlib.contextmanager
def _terminal(what: str = "password") -> Iterator[int]:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        options = _SCRIPTED_OPTIONS.get(what, _SCRIPTED_OPTIONS["password"])
        raise UsageError(f"no terminal to ask for the {what}: use {options}")
    try:
        yield fd
    finally:
        os.close(fd)


def read_from_terminal(prompt: str, what: str = "password") -> Secret:
    with _terminal(what) as tty:
        old = termios.tcgetattr(tty)
        silent = list(old)
        silent[3] &= ~(termios.ECHO | termios.ECHONL)
        # Echo goes off (discarding anything typed ahead) before the prompt appears, so
        # an answer typed after the prompt is never lost.
        termios.tcsetattr(tty, termios.TCSAFLUSH, silent)
        os.write(tty, prompt.encode())
        try:
            return _read_stream(tty, what)
        finally:
            termios.tcsetattr(tty, termios.TCSAFLUSH, old)
            os.write(tty, b"\n")


def read_secret(source: SecretSource, prompt: str, what: str = "password") -> Secret:
    if source.fd is not None:
        return read_from_fd(source.fd, what)
    if source.file is not None:
        return read_from_file(source.file, what)
    return read_from_terminal(prompt, what)


def read_new_password(
    source: SecretSource, prompt: str = "New password: ", what: str = "password"
) -> Secret:
    """Ask twice on a terminal (once when scripted), then apply the strength rules.
    `what` names the secret in the no-terminal hint ("new password": passwd's options)."""
    password = read_secret(source, prompt, what)
    try:
        if not source.scripted:
            repeat = "Repeat new password: " if prompt.startswith("New") else "Repeat the password: "
            with read_from_terminal(repeat, what) as again:
                if not password.equals(again):
                    raise UsageError("the two passwords differ")
        check_password_strength(password)
    except BaseException:
        password.wipe()
        raise
    return password


def check_password_strength(password: Secret) -> None:
    """Refuse empty, short and guessable passwords, saying why (zxcvbn judges the
    guessability: see kryptvault.cli.strength; the rules are in README.md)."""
    from kryptvault.cli.strength import judge, weakness

    with password.view() as raw:
        if len(raw) == 0:
            raise UsageError("the password is empty")
        chars = sum(1 for b in raw if b & 0xC0 != 0x80)  # UTF-8 characters, without decoding
    if chars < MIN_PASSWORD_CHARS:
        raise UsageError(
            f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters "
            "(a few random words work well)"
        )
    reason = weakness(judge(password))
    if reason is not None:
        raise UsageError(reason)


def show_secret(printable: Secret) -> None:
    """Print a secret meant for the user's eyes (a recovery key) on a line of its own,
    straight from its wipeable buffer to stdout: it never becomes a Python string."""
    out = sys.stdout.buffer
    with printable.view() as text:
        out.write(b"\n    ")
        out.write(text)
        out.write(b"\n\n")
    out.flush()
