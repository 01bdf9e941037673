"""Entry point of the mount daemon: `python -m kryptvault.session.daemon --handoff-fd N --ready-fd M`.

Started by `kryptvault mount` (kryptvault/session/launcher.py); never by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from kryptvault.crypto.secret import harden_process
from kryptvault.errors import KryptvaultError
from kryptvault.fuseadapter.spinner import CpuSpinner
from kryptvault.session.handoff import receive
from kryptvault.session.mount_session import LOCK_SIGNALS, run_daemon


class SessionLog(logging.Handler):
    """Log records to stderr, which the launcher made the daemon's log file (0600). One
    os.write per record: a lock that ends in os._exit loses no buffered line."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(2, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    harden_process()  # before any key byte arrives
    # Blocked before any thread exists, so every thread inherits the block and only the
    # session's sigwait() takes SIGTERM/SIGINT/SIGHUP (a lock). A thread started earlier
    # with them unblocked (libusb's event thread, for a USB stick token) would take the
    # signal's default action instead: the process killed, no lock, a dead mount.
    signal.pthread_sigmask(signal.SIG_BLOCK, LOCK_SIGNALS)
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

    # The spinner's helper starts now, before any key byte arrives, and its interpreter
    # starts beside the daemon's own start-up instead of beside the first requests (and,
    # in the TCG guest, beside a lock soon after the mount: ~18 ms of CPU).
    spinner = CpuSpinner.for_this_machine()
    try:
        settings, data_key, meta_key = receive(args.handoff_fd)
    except (EOFError, ValueError, TypeError) as exc:
        report(f"error: bad session hand-over: {exc}")
        return 2
    finally:
        os.close(args.handoff_fd)
    try:
        return run_daemon(settings, data_key, meta_key, report, spinner)
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
