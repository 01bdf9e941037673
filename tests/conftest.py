"""Shared test set-up.

The suite runs in a session of its own: HOME and the XDG runtime, state and config
directories point into one private temporary directory before any test (or any daemon a
test starts) looks them up, so `lock --all`, audit entries, daemon logs and "last backup"
records of a test run never reach the vaults or files of the person running it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Short, because control sockets live under XDG_RUNTIME_DIR (sun_path is 108 bytes).
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="kvt-session-", dir="/tmp"))
SESSION_ENV = {
    "HOME": str(SESSION_ROOT / "home"),
    "XDG_RUNTIME_DIR": str(SESSION_ROOT / "run"),
    "XDG_STATE_HOME": str(SESSION_ROOT / "state"),
    "XDG_CONFIG_HOME": str(SESSION_ROOT / "config"),
    "XDG_CACHE_HOME": str(SESSION_ROOT / "cache"),
    "XDG_DATA_HOME": str(SESSION_ROOT / "data"),  # `kryptvault setup` installs its desktop entry here
}
for _name, _value in SESSION_ENV.items():
    Path(_value).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[_name] = _value
# No daemon a test starts may reach the real desktop's buses (a sleep inhibitor, a
# notification): both point at sockets that do not exist unless a test starts its own.
os.environ["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={SESSION_ROOT}/no-session-bus"
os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={SESSION_ROOT}/no-system-bus"
# The suite runs as root: `kryptvault setup` would install its udev rules in /etc.
os.environ["KRYPTVAULT_UDEV_RULES_DIR"] = str(SESSION_ROOT / "udev-rules")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `fuse` without FUSE here: skipped, or failed under CI=true (needs.py)."""
    from needs import pytest_runtest_setup as check_needs

    check_needs(item)


@pytest.fixture(scope="session", autouse=True)
def private_session() -> Iterator[Path]:
    """Locks whatever the suite left mounted (only the suite's own daemons are reachable
    from this environment), then removes the session directory."""
    yield SESSION_ROOT
    kryptvault = Path(sys.executable).parent / "kryptvault"
    if kryptvault.exists():
        subprocess.run(
            [str(kryptvault), "lock", "--all"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short base directory: a control socket's path must fit in sun_path (107 bytes),
    and pytest's tmp_path with a vault UUID after it does not."""
    base = Path(tempfile.mkdtemp(prefix="kvs", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
