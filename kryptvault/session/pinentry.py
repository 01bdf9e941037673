"""Asking for the password with pinentry (the Assuan protocol's few commands).

pinentry picks its own face: a graphical dialog when a display is there, curses or a tty
otherwise (Debian's `pinentry` alternative). The password comes back in a bytearray the
caller wipes; it never passes through argv, the environment or a Python `str`.
"""

from __future__ import annotations

import os
import subprocess
from urllib.parse import quote

MAX_LINE = 4096


class PinentryCancelled(Exception):
    """The user closed the prompt: stay locked, ask no more."""


class PinentryFailed(Exception):
    """No prompt could be shown (no program, no display nor terminal)."""


def ask_password(
    program: str, description: str, error: str | None = None, prompt: str = "Password:"
) -> bytearray:
    """The password (or, with `prompt` "PIN:", a security key's PIN) typed into a pinentry
    prompt; PinentryCancelled on Cancel."""
    try:
        proc = subprocess.Popen(
            [program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    except OSError as exc:
        raise PinentryFailed(f"cannot start {program}: {exc.strerror}")
    assert proc.stdin is not None and proc.stdout is not None
    reader = _Lines(proc.stdout.fileno())
    try:
        _expect_ok(reader, "greeting")
        commands = [
            "SETTITLE kryptvault",
            f"SETDESC {_escape(description)}",
            f"SETPROMPT {_escape(prompt)}",
        ]
        if error:
            commands.append(f"SETERROR {_escape(error)}")
        for command in commands:
            proc.stdin.write(command.encode() + b"\n")
            proc.stdin.flush()
            _expect_ok(reader, command.split()[0])
        proc.stdin.write(b"GETPIN\n")
        proc.stdin.flush()
        pin = bytearray()
        while True:
            line = reader.line()
            try:
                if line.startswith(b"D "):
                    pin += _unescape(line[2:])
                elif line.startswith(b"OK"):
                    return pin
                elif line.startswith(b"ERR"):
                    pin[:] = bytes(len(pin))
                    # 83886179: "Operation cancelled" (GPG_ERR_CANCELED in the pinentry source).
                    if b"83886179" in line or b"cancel" in line.lower():
                        raise PinentryCancelled()
                    raise PinentryFailed(f"{program}: {line[4:].decode(errors='replace')}")
            finally:
                line[:] = bytes(len(line))
    except (BrokenPipeError, EOFError) as exc:
        raise PinentryFailed(f"{program} ended without asking ({exc or 'no answer'})")
    finally:
        try:
            proc.stdin.write(b"BYE\n")
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Lines:
    """Reads the program's answer lines into bytearrays (no `bytes` copy of a pin)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()

    def line(self) -> bytearray:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = self._buf[:end]
                self._buf[: end + 1] = bytes(end + 1)
                del self._buf[: end + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise EOFError("answer line too long")
            chunk = bytearray(1024)
            got = os.readv(self._fd, [chunk])
            if got == 0:
                raise EOFError("no answer")
            self._buf += chunk[:got]
            chunk[:] = bytes(len(chunk))


def _expect_ok(reader: _Lines, what: str) -> None:
    while True:
        line = reader.line()
        if line.startswith(b"OK"):
            return
        if line.startswith(b"ERR"):
            raise PinentryFailed(f"pinentry refused {what}: {line[4:].decode(errors='replace')}")
        # "#" comments and "S" status lines may come before the answer.


def _escape(text: str) -> str:
    # Assuan lines are percent-escaped: at least %, CR and LF.
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _unescape(data: bytearray) -> bytearray:
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x25 and i + 2 < len(data):
            out.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(data[i])
            i += 1
    return out


def ask_with_program(program: str, prompt: str) -> bytearray:
    """The fallback when no pinentry can run: a program in the manner of
    `systemd-ask-password PROMPT` (the password on stdout; a non-zero exit is a cancel)."""
    try:
        proc = subprocess.Popen([program, prompt], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                close_fds=True)
    except OSError as exc:
        raise PinentryFailed(f"cannot start {program}: {exc.strerror}")
    assert proc.stdout is not None
    pin = bytearray()
    chunk = bytearray(1024)
    try:
        while len(pin) <= MAX_LINE:
            got = os.readv(proc.stdout.fileno(), [chunk])
            if got == 0:
                break
            pin += chunk[:got]
    finally:
        chunk[:] = bytes(len(chunk))
        proc.stdout.close()
    if proc.wait() != 0:
        pin[:] = bytes(len(pin))
        raise PinentryCancelled()
    while pin and pin[-1] in (0x0A, 0x0D):
        pin.pop()
    return pin
