"""However many routes report the removal, and from however many threads: one on_removed."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kryptvault.token.dirtoken import DirectoryToken
from kryptvault.watcher.watcher import STOP_TIMEOUT, TokenWatcher

ROOT = pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root (mount)")


class Calls:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.routes: list[str] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.done = threading.Event()

    def on_removed(self, route: str) -> None:
        with self.lock:
            self.routes.append(route)
        self.done.set()

    def on_event(self, kind: str, details: dict[str, object]) -> None:
        with self.lock:
            self.events.append((kind, details))


def test_many_threads_triggering_at_once_call_on_removed_exactly_once(tmp_path: Path) -> None:
    token = DirectoryToken(tmp_path)
    rng = random.Random(1234)
    for _ in range(200):
        calls = Calls()
        watcher = TokenWatcher(token, calls.on_removed, on_event=calls.on_event, routes=())
        threads = 8
        barrier = threading.Barrier(threads)
        won: list[str] = []
        delays = [rng.uniform(0, 0.0005) for _ in range(threads)]

        def race(i: int, delay: float) -> None:
            barrier.wait()
            time.sleep(delay)
            if watcher.trigger(f"route-{i}"):
                won.append(f"route-{i}")

        workers = [threading.Thread(target=race, args=(i, d)) for i, d in enumerate(delays)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert calls.routes == won and len(won) == 1
        assert watcher.fired == won[0]
        assert [k for k, _ in calls.events] == ["token_removed"]
        assert calls.events[0][1]["route"] == won[0]


def test_token_removed_event_comes_before_on_removed(tmp_path: Path) -> None:
    order: list[str] = []
    watcher = TokenWatcher(
        DirectoryToken(tmp_path),
        lambda route: order.append(f"removed:{route}"),
        on_event=lambda kind, details: order.append(f"{kind}:{details['route']}"),
        routes=(),
    )
    assert watcher.trigger("udev")
    assert not watcher.trigger("command")
    assert order == ["token_removed:udev", "removed:udev"]


def test_failing_callbacks_do_not_break_the_latch(tmp_path: Path) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("callback failed")

    watcher = TokenWatcher(DirectoryToken(tmp_path), boom, on_event=boom, routes=())
    assert watcher.trigger("udev") is True
    assert watcher.trigger("udev") is False


@pytest.mark.parametrize("interval", [0, -1, 0.51, 5])
def test_poll_interval_outside_0_to_500_ms_is_refused(tmp_path: Path, interval: float) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        TokenWatcher(DirectoryToken(tmp_path), lambda r: None, poll_interval=interval)


def test_unknown_route_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown watcher route"):
        TokenWatcher(DirectoryToken(tmp_path), lambda r: None, routes=("carrier-pigeon",))


def test_stop_returns_promptly_with_every_route_running(tmp_path: Path) -> None:
    watcher = TokenWatcher(DirectoryToken(tmp_path), lambda r: None, poll_interval=0.5)
    watcher.start()
    time.sleep(0.05)  # let the thread block in poll()
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < STOP_TIMEOUT
    assert watcher._thread is not None and not watcher._thread.is_alive()
    watcher.stop()  # twice is harmless


def test_stop_called_from_on_removed_in_the_watcher_thread_does_not_hang(tmp_path: Path) -> None:
    # The daemon's lock sequence stops the watcher from inside on_removed.
    gone = tmp_path / "gone"
    gone.mkdir()
    token = DirectoryToken(gone)
    gone.rmdir()  # is_present() is now false: the first poll fires at once
    stopped = threading.Event()
    holder: list[TokenWatcher] = []

    def on_removed(route: str) -> None:
        holder[0].stop()
        stopped.set()

    watcher = TokenWatcher(token, on_removed, routes=("poll",))
    holder.append(watcher)
    watcher.start()
    assert stopped.wait(2.0)
    assert watcher.fired == "poll"
    assert watcher._thread is not None
    watcher._thread.join(1.0)
    assert not watcher._thread.is_alive()


@ROOT
def test_routes_and_triggers_racing_a_real_unmount_fire_exactly_once(tmp_path: Path) -> None:
    # The automatic routes (mount, poll) race 4 trigger() threads against a real umount.
    rng = random.Random(99)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for round_no in range(40):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kvtest", str(mnt)], check=True)
        try:
            calls = Calls()
            watcher = TokenWatcher(DirectoryToken(mnt), calls.on_removed, poll_interval=0.01)
            watcher.start()
            barrier = threading.Barrier(5)

            def race(i: int, delay: float) -> None:
                barrier.wait()
                time.sleep(delay)
                watcher.trigger(f"trigger-{i}")

            workers = [threading.Thread(target=race, args=(i, rng.uniform(0, 0.004))) for i in range(4)]
            for w in workers:
                w.start()
            barrier.wait()
            time.sleep(rng.uniform(0, 0.004))
            subprocess.run(["umount", str(mnt)], check=True)
            for w in workers:
                w.join()
            assert calls.done.wait(2.0)
            time.sleep(0.03)  # give late routes the chance to (wrongly) fire again
            watcher.stop()
            assert len(calls.routes) == 1, (round_no, calls.routes)
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
