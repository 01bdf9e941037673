"""A missing requirement skips a test on a developer's machine and fails it under CI=true
(tests/needs.py): a CI run can no longer pass with whole areas silently skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

INNER = """
import pytest
from needs import qemu_opt_out, require_tool


def test_tool():
    require_tool("kryptvault-no-such-program")


@pytest.mark.fuse
def test_fuse():
    pass


def test_qemu():
    qemu_opt_out()
"""


def _outcomes(tmp_path: Path, ci: str | None) -> dict[str, str]:
    """Runs INNER under pytest with `needs` as a plugin, without fusermount3 on PATH."""
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    fuse: needs FUSE\n")
    env = {
        k: v for k, v in os.environ.items() if k not in ("CI", "PYTHONPATH", "PATH", "KRYPTVAULT_SKIP_QEMU")
    }
    env.update(PATH=str(Path(sys.executable).parent), PYTHONPATH=str(TESTS_DIR), KRYPTVAULT_SKIP_QEMU="1")
    if ci is not None:
        env["CI"] = ci
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "needs",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), f"--junitxml={report}",
         "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        outcomes[case.attrib["name"]] = kinds[0] if kinds else "passed"
    return outcomes


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_outside_ci_a_missing_tool_fuse_or_an_opt_out_of_qemu_skips(tmp_path: Path, ci: str | None) -> None:
    assert _outcomes(tmp_path, ci) == {"test_tool": "skipped", "test_fuse": "skipped", "test_qemu": "skipped"}


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_under_ci_a_missing_tool_fuse_or_an_opt_out_of_qemu_fails(tmp_path: Path, ci: str) -> None:
    outcomes = _outcomes(tmp_path, ci)
    assert outcomes["test_tool"] == "failure" and outcomes["test_qemu"] == "failure", outcomes
    assert outcomes["test_fuse"] == "error", outcomes  # failed in set-up, before the test ran
