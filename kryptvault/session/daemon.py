"""Entry point of the mount daemon: `python -m kryptvault.session.daemon --handoff-fd N --ready-fd M`.

Started by `kryptvault mount` (kryptvault/session/launcher.py); never by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kryptvault.crypto.secret import harden_process
from kryptvault.session.handoff import receive
from kryptvault.session.mount_session import run_daemon


def main(argv: list[str] | None = None) -> int:
    harden_process()  # before any key byte arrives
    parser = argparse.ArgumentParser(prog="kryptvault-daemon")
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
    return run_daemon(settings, data_key, meta_key, report)


if __name__ == "__main__":
    sys.exit(main())
