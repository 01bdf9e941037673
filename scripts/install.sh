#!/usr/bin/env bash
# Installs everything kryptvault and its test suite need on a fresh Debian/Ubuntu machine:
# system packages, then the package with its test extras into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PKGS=(
  fuse3 libfuse3-3 libusb-1.0-0          # runtime: FUSE mounts, pyusb's backend
  python3-venv                           # the virtual environment
  e2fsprogs util-linux mount kmod        # tests: loop-device filesystems
  dosfstools mtools                      # tests: vfat stick images for the QEMU guest
  qemu-system-x86 busybox-static         # tests: the QEMU guest with an emulated USB stick
  gocryptfs                              # bench: the peer we compare with
  git rsync sqlite3 tar                  # tests: real programs on the mount
  udev                                   # tests: udev rules loaded by udevd in the QEMU guest
)
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "kryptvault installed in $(pwd)/.venv (run: .venv/bin/kryptvault --help)"
