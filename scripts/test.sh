#!/usr/bin/env bash
# Runs the whole test suite: lint, types, then every test (FUSE, loop devices, QEMU guest).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check kryptvault tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
