#!/usr/bin/env bash
# Installs everything kryptvault and its test suite need on a fresh Debian/Ubuntu machine:
# system packages, then the package with its test extras into ./.venv.
#   --system-packages-only   stop after the system packages (e.g. for a CI image layer)
# Another apt run (unattended-upgrades, cloud-init, a second terminal) holding apt's locks
# is waited for, up to APT_LOCK_WAIT seconds (default 600), instead of failing at once.
set -euo pipefail
SYSTEM_ONLY=""
for arg in "$@"; do
  case "$arg" in
    --system-packages-only) SYSTEM_ONLY=1 ;;
    *) echo "install.sh: unknown option $arg (known: --system-packages-only)" >&2; exit 2 ;;
  esac
done
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
  acl                                    # tests: getfacl/setfacl on the mount
  rclone                                 # runtime: backups to remotes (also serves WebDAV/SFTP in tests)
  udev                                   # tests: udev rules loaded by udevd in the QEMU guest
  systemd                                # tests: a systemd user manager in the QEMU guest (udev -> units)
  dbus-daemon                            # tests: private buses for the desktop links (fake logind, notifications)
  libglib2.0-bin                         # tests: `gio mount -l/-u` as file managers see the mount
)
APT_LOCK_WAIT="${APT_LOCK_WAIT:-600}"
apt_get() {
  # apt itself waits for the dpkg lock (DPkg::Lock::Timeout), but `update` ignores that
  # option for the package lists' lock (apt 2.6 still fails at once): that one is retried
  # here. LC_ALL=C: the lock message is matched, and it is translated otherwise.
  local deadline=$((SECONDS + APT_LOCK_WAIT)) err told=""
  while :; do
    if err=$($SUDO env LC_ALL=C DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" 2>&1 >/dev/null); then
      if [ -n "$err" ]; then printf '%s\n' "$err" >&2; fi
      return 0
    fi
    if [[ "$err" == *"Could not get lock"* ]] && [ "$SECONDS" -lt "$deadline" ]; then
      if [ -z "$told" ]; then
        echo "install.sh: another apt run holds a lock; waiting for it (at most ${APT_LOCK_WAIT} s)" >&2
        told=1
      fi
      sleep 2
      continue
    fi
    printf '%s\n' "$err" >&2
    return 1
  done
}
if command -v apt-get >/dev/null; then
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${PKGS[@]}"
fi
if [ -n "$SYSTEM_ONLY" ]; then
  echo "system packages installed"
  exit 0
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
# An editable install leaves our own modules uncompiled, and with PYTHONDONTWRITEBYTECODE
# (or a read-only tree, as in the QEMU guest) every process would compile them again:
# measured here, ~3.5 MiB more resident memory in the mount daemon (which a lock's exit
# tears down) and 0.15 s more for every command.
.venv/bin/python -m compileall -q kryptvault
echo "kryptvault installed in $(pwd)/.venv (run: .venv/bin/kryptvault --help)"
