"""`kryptvault demo` tells the whole story on a machine without a USB stick."""

from __future__ import annotations

import re

import pytest
from cli_helpers import run_process

pytestmark = pytest.mark.fuse


def test_demo_mounts_locks_on_unplug_shows_the_audit_log_and_remounts() -> None:
    result = run_process("demo")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "the container holds no trace of the name: True" in out
    unplug = re.search(r"the folder was unmounted (\d+) ms after the unplug", out)
    assert unplug, out
    assert re.search(r"lock vault=\S+ reason=unplug", out)
    # The removal is written by the lock's own audit step, with the time it was seen.
    removed = re.search(r"^  (\S+ \S+) token_removed vault=\S+ route=\w+$", out, re.M)
    locked = re.search(r"^  (\S+ \S+) lock vault=\S+ reason=unplug", out, re.M)
    assert removed and locked and removed.start() < locked.start(), out
    assert removed.group(1) <= locked.group(1), out
    assert "hello.txt: 'the vault works'" in out
    assert "Traceback" not in out
