"""scripts/install.sh waits for another apt run's locks instead of failing at once.

apt runs against a private directory tree (APT_CONFIG: its own package lists, dpkg
status and locks), so the test needs no network and changes nothing on the machine; the
status file lists install.sh's packages as installed, so `apt-get install` has nothing
to do but must still take the dpkg lock.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from needs import in_ci, require_tool

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install.sh"

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    def take(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # apt's locks are fcntl locks
        return fd
    lists, frontend = take(sys.argv[1]), take(sys.argv[2])
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    os.close(lists)
    time.sleep(float(sys.argv[3]))
    """
)


def _script_packages() -> list[str]:
    block = re.search(r"^PKGS=\((.*?)^\)", SCRIPT.read_text(), re.S | re.M)
    assert block is not None
    return [word for line in block.group(1).splitlines() for word in line.split("#", 1)[0].split()]


def _apt_sandbox(root: Path) -> Path:
    for sub in ("lists/partial", "cache/archives/partial", "dpkg/updates", "etc/apt.conf.d",
                "etc/preferences.d", "etc/sources.list.d", "etc/trusted.gpg.d", "log"):  # fmt: skip
        (root / sub).mkdir(parents=True)
    (root / "etc" / "sources.list").write_text("")
    (root / "dpkg" / "status").write_text(
        "".join(
            f"Package: {name}\nStatus: install ok installed\nVersion: 1.0\nArchitecture: all\n"
            f"Maintainer: test <t@example.org>\nDescription: installed\n\n"
            for name in _script_packages()
        )
    )
    config = root / "apt.conf"
    config.write_text(
        f'Dir::State "{root}";\nDir::State::Lists "{root}/lists";\n'
        f'Dir::State::status "{root}/dpkg/status";\nDir::Cache "{root}/cache";\n'
        f'Dir::Etc "{root}/etc";\nDir::Etc::sourcelist "{root}/etc/sources.list";\n'
        f'Dir::Etc::sourceparts "{root}/etc/sources.list.d";\nDir::Log "{root}/log";\n'
    )
    return config


def test_install_waits_for_the_package_lists_lock_and_the_dpkg_lock_of_another_apt_run(
    tmp_path: Path,
) -> None:
    require_tool("apt-get", "apt")
    if os.geteuid() != 0:
        pytest.skip("needs root: install.sh would call sudo")
    config = _apt_sandbox(tmp_path / "apt")
    env = {**os.environ, "APT_CONFIG": str(config), "APT_LOCK_WAIT": "60"}
    assert subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=60).returncode == 0

    hold = 3.0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "apt/lists/lock"),
         str(tmp_path / "apt/dpkg/lock-frontend"), str(hold)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(SCRIPT), "--system-packages-only"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "system packages installed"
    assert "another apt run holds a lock; waiting for it" in result.stderr
    # `update` waited for the lists lock (held `hold` s), `install` for the dpkg lock (2 x hold).
    assert took >= 2 * hold - 0.5, (took, result.stderr)


def test_install_gives_up_with_apts_own_message_once_the_wait_is_over(tmp_path: Path) -> None:
    require_tool("apt-get", "apt")
    if os.geteuid() != 0:
        pytest.skip("needs root: install.sh would call sudo")
    config = _apt_sandbox(tmp_path / "apt")
    env = {**os.environ, "APT_CONFIG": str(config), "APT_LOCK_WAIT": "2"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "apt/lists/lock"),
         str(tmp_path / "apt/dpkg/lock-frontend"), "30"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = subprocess.run(
            ["bash", str(SCRIPT), "--system-packages-only"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert "Could not get lock" in result.stderr
    assert "system packages installed" not in result.stdout


def test_every_module_of_the_package_has_current_bytecode_after_install() -> None:
    """install.sh byte-compiles the package (an editable install does not, and with
    PYTHONDONTWRITEBYTECODE or the QEMU guest's read-only tree every process, the mount
    daemon included, would compile it again: more memory for a lock's exit to tear down,
    slower commands). Checked after a fresh install, i.e. in CI; elsewhere an edit since
    the last install makes bytecode stale, so the test only runs there."""
    import importlib.util

    import kryptvault

    if not in_ci():
        pytest.skip("needs a tree just installed by scripts/install.sh (CI=true)")
    package = Path(kryptvault.__file__).resolve().parent
    stale = []
    for source in sorted(package.rglob("*.py")):
        compiled = Path(importlib.util.cache_from_source(str(source)))
        if not compiled.exists() or compiled.stat().st_mtime < source.stat().st_mtime:
            stale.append(str(source.relative_to(package)))
    assert not stale, f"not byte-compiled: {stale}"
