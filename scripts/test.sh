#!/usr/bin/env bash
# Runs the whole test suite: lint, types, then every test (FUSE, loop devices, QEMU guest).
# Where FUSE or a program the tests drive is missing those tests skip; under CI=true they
# fail instead, and KRYPTVAULT_SKIP_QEMU=1 is refused (tests/needs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check kryptvault tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
