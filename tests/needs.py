"""What a test needs from the machine, and what its absence means.

On a developer's machine a missing /dev/fuse, fusermount3 or program (git, rsync,
sqlite3, ...) skips the tests that need it, and KRYPTVAULT_SKIP_QEMU=1 skips the QEMU
guest. In CI (CI=true, as GitHub Actions, GitLab CI and most others set it) the machine is
set up by scripts/install.sh, so a missing piece is a broken set-up: it fails the run
instead of passing it off as skipped tests, and KRYPTVAULT_SKIP_QEMU is refused.

Tests marked `fuse` get `require_fuse()` before they run (the hook below, called from
tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or under CI=true fail it: the run must not pass without it."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing requirement fails the run)", pytrace=False)
    pytest.skip(reason)


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        unavailable("needs /dev/fuse")
    if shutil.which("fusermount3") is None:
        unavailable("needs fusermount3 (package fuse3)")


def require_tool(name: str, package: str | None = None) -> str:
    """The program's path; skip (fail under CI) without it."""
    found = shutil.which(name) or shutil.which(name, path=_SYSTEM_PATH)
    if found is None:
        unavailable(f"needs {name}" + (f" (package {package})" if package else ""))
    return found


def qemu_opt_out() -> None:
    """First thing in every fixture that boots the QEMU guest."""
    if os.environ.get("KRYPTVAULT_SKIP_QEMU") == "1":
        if in_ci():
            pytest.fail(
                "KRYPTVAULT_SKIP_QEMU=1 under CI=true: the QEMU tests must run in CI", pytrace=False
            )
        pytest.skip("KRYPTVAULT_SKIP_QEMU=1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `fuse` where FUSE is missing: skipped, or failed under CI=true."""
    if item.get_closest_marker("fuse") is not None:
        require_fuse()
