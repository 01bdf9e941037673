#!/usr/bin/env python3
"""Guest side of the kryptvault end-to-end tests: one long-lived helper process per guest.

Runs inside the usbrig guest (``tests/e2e_support.py`` starts it) and

- imports the kryptvault CLI once and runs every CLI command in a *forked* child. Under
  TCG each fresh ``kryptvault`` process spends 3-5 s importing; a fork costs
  milliseconds. The child runs the real console entry point (``kryptvault.cli.app.main``)
  with its own argv, stdin, stdout and stderr, so exit codes and the one-line error
  messages are exactly what a user sees; ``mount`` still starts the real daemon with
  ``python -m kryptvault.session.daemon``.
- executes requests the host drops into ``<chan>/kvz``: ``req-N.json`` -> ``res-N.json``;
- asks the host for stick actions through the same directory: ``act-K.json`` ->
  ``act-K.done.json`` (the host does the QMP part: ``device_del`` / ``device_add``);
- runs the lock-on-unplug cycles entirely in the guest (``unplug_cycles.py``).

Files are written as ``.name.tmp`` and renamed, so the other side never reads half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUEST_POLL_S = 0.005


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


class Guest:
    """What the request handlers get: CLI runs, shell runs and host actions."""

    def __init__(self, chan: Path, scratch: Path) -> None:
        self.chan = chan
        self.scratch = scratch
        self._acts = 0
        self._cli_runs = 0

    # ------------------------------------------------------------------ CLI
    def cli(self, args: list[str], timeout: float = 120, stdin: str | None = None) -> dict[str, Any]:
        """Run `kryptvault ARGS` in a forked child; {rc, out, err, s}."""
        self._cli_runs += 1
        base = self.scratch / f"cli-{self._cli_runs}"
        paths = {name: Path(f"{base}.{name}") for name in ("in", "out", "err")}
        paths["in"].write_text(stdin or "")
        sys.stdout.flush()
        sys.stderr.flush()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: become `kryptvault ARGS`
            code = 70
            try:
                for fd, name, flags in (
                    (0, "in", os.O_RDONLY),
                    (1, "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                    (2, "err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                ):
                    new = os.open(paths[name], flags, 0o600)
                    os.dup2(new, fd)
                    os.close(new)
                os.setpgid(0, 0)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                sys.argv = ["kryptvault", *args]
                from kryptvault.cli.app import main

                try:
                    main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        rc = self._wait_child(pid, timeout)
        return {
            "rc": rc,
            "out": paths["out"].read_text(errors="replace"),
            "err": paths["err"].read_text(errors="replace"),
            "s": round(time.monotonic() - started, 3),
        }

    @staticmethod
    def _wait_child(pid: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return -9
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    # ------------------------------------------------------------------ shell
    def sh(self, command: str, timeout: float = 120) -> dict[str, Any]:
        started = time.monotonic()
        try:
            done = subprocess.run(
                ["/bin/bash", "-c", command], capture_output=True, text=True, timeout=timeout
            )
            rc, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -9, str(exc.stdout or ""), f"timed out after {timeout} s"
        return {"rc": rc, "out": out, "err": err, "s": round(time.monotonic() - started, 3)}

    # ------------------------------------------------------------------ host actions
    def host_action(self, kind: str, stick: str) -> int:
        """Ask the host to unplug/plug a stick; returns the action's number (see wait_action)."""
        self._acts += 1
        write_json(self.chan / f"act-{self._acts}.json", {"kind": kind, "stick": stick})
        return self._acts

    def host_action_stamped(self, kind: str, stick: str) -> tuple[int, int]:
        """Like host_action, and CLOCK_MONOTONIC taken right before the request becomes
        visible to the host (the rename); the host measures from the file's ctime."""
        self._acts += 1
        path = self.chan / f"act-{self._acts}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"kind": kind, "stick": stick}))
        stamp = time.monotonic_ns()
        tmp.rename(path)
        return stamp, self._acts

    def wait_action(self, number: int, timeout: float = 60) -> dict[str, Any]:
        path = self.chan / f"act-{number}.done.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the host did not do action {number} within {timeout} s")
            time.sleep(0.005)
        result: dict[str, Any] = json.loads(path.read_text())
        if result.get("error"):
            raise RuntimeError(f"host action {number} failed: {result['error']}")
        return result


def serve(chan: Path, scratch: Path) -> None:
    guest = Guest(chan, scratch)
    import unplug_cycles  # next to this file; imported late so the CLI preload comes first

    handlers: dict[str, Callable[..., Any]] = {
        "cli": lambda args, timeout=120, stdin=None: guest.cli(args, timeout, stdin),
        "sh": lambda command, timeout=120: guest.sh(command, timeout),
        "unplug_cycles": lambda **kw: unplug_cycles.run(guest, **kw),
        # Imported only when asked for: it brings jeepney, pytest and the desktop fakes.
        "desktop_flow": lambda **kw: __import__("desktop_flow").run(guest, **kw),
        "ping": lambda: {"pid": os.getpid(), "ns": time.monotonic_ns()},
    }
    print(f"# ready pid={os.getpid()}", flush=True)
    number = 1
    while True:
        request_path = chan / f"req-{number}.json"
        if not request_path.exists():
            time.sleep(REQUEST_POLL_S)
            continue
        request = json.loads(request_path.read_text())
        op = request.get("op")
        if op == "quit":
            write_json(chan / f"res-{number}.json", {"ok": True, "result": None})
            return
        try:
            result = handlers[op](**request.get("args", {}))
            response = {"ok": True, "result": result}
        except Exception:
            response = {"ok": False, "error": traceback.format_exc()}
        write_json(chan / f"res-{number}.json", response)
        number += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chan", type=Path, required=True, help="the request directory (on the 9p share)")
    ap.add_argument("--scratch", type=Path, required=True, help="a tmpfs directory for CLI output")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    for item in args.env:
        name, _, value = item.partition("=")
        os.environ[name] = value
    args.scratch.mkdir(parents=True, exist_ok=True)
    # The preload: everything `kryptvault` imports, so that each forked command starts warm.
    from kryptvault.cli import register_commands

    register_commands()
    serve(args.chan, args.scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
