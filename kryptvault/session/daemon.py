"""Entry point of the mount daemon: `python -m kryptvault.session.daemon --handoff-fd N --ready-fd M`.

Started by `kryptvault mount` (kryptvault/session/launcher.py); never by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys

from kryptvault.crypto.secret import harden_process
from kryptvault.errors import KryptvaultError
from kryptvault.session.handoff import receive
from kryptvault.session.mount_session import run_daemon


class SessionLog(logging.Handler):
    """Log records to stderr, which the launcher made the daemon's log file (0600).

    A session that ends without a warning or an error leaves nothing behind: closing the
    handler (logging.shutdown, the lock's last step) cuts the file back to where this
    session started. Anything else in it stays for the user: a warning, an error, or
    bytes this handler did not write (a traceback printed to stderr, libfuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._start = _log_size()
        self._expected = self._start
        self._trouble = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            if record.levelno >= logging.WARNING:
                self._trouble = True
            os.write(2, data)
            if self._expected is not None:
                self._expected += len(data)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            if not self._trouble and self._start is not None and _log_size() == self._expected:
                os.ftruncate(2, self._start)
        except OSError:
            pass
        super().close()


def _log_size() -> int | None:
    try:
        info = os.fstat(2)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def main(argv: list[str] | None = None) -> int:
    harden_process()  # before any key byte arrives
    parser = argparse.ArgumentParser(prog="kryptvault-daemon")
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, handlers=[SessionLog()])
    ready_fd = args.ready_fd

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd < 0:
            return
        try:
            os.write(ready_fd, message.encode("utf-8", "replace")[:4000] + b"\n")
            os.close(ready_fd)
        except OSError:
            pass
        ready_fd = -1

    try:
        settings, data_key, meta_key = receive(args.handoff_fd)
    except (EOFError, ValueError, TypeError) as exc:
        report(f"error: bad session hand-over: {exc}")
        return 2
    finally:
        os.close(args.handoff_fd)
    try:
        return run_daemon(settings, data_key, meta_key, report)
    except Exception as exc:
        if ready_fd < 0:
            raise  # mounted already: the lock handles it; the traceback goes to the log
        # Not mounted yet (the control socket is taken, its path too long...): the parent
        # is waiting on the pipe and prints this line to the user.
        if isinstance(exc, KryptvaultError):
            logging.getLogger("kryptvault.session").error("cannot mount: %s", exc)
        else:
            logging.getLogger("kryptvault.session").exception("cannot mount")
        report(f"error: {describe_startup_error(exc)}")
        return 1


def describe_startup_error(exc: Exception) -> str:
    if isinstance(exc, KryptvaultError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"the mount daemon failed: {exc.strerror or exc}{where}"
    return f"the mount daemon failed with an internal error ({type(exc).__name__})"


if __name__ == "__main__":
    sys.exit(main())
