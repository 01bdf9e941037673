#!/bin/sh
# Guest side of the kryptvault USB test rig (see README.md next to this file).
#
#   (as PID 1)         stage 1: /init of the initramfs, run by busybox sh
#   stage2             stage 2: PID 1 after switch_root, run by the host's bash
#   stick-dev SERIAL   helper for commands: print /dev/sdX of the stick with that serial
#   wait-stick SERIAL present|absent TIMEOUT   helper: wait for a stick to (dis)appear
#
# Stage 1 is written for busybox ash, the rest for bash; both parse the whole file.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
CHAN=/run/kvrig/chan
TICK=/run/kvrig/tick

stage1_fail() {
    echo "kvrig: stage 1 failed: $*" >/dev/console
    # Exiting PID 1 panics the kernel; panic=-1 and -no-reboot turn that into QEMU exiting,
    # which the host notices at once instead of waiting for its boot timeout.
    exit 1
}

stage1() {
    . /etc/kvrig.conf
    while read -r m params; do
        # shellcheck disable=SC2086  # params is a word list
        insmod "/lib/modules/$m.ko" $params || stage1_fail "insmod $m"
    done </etc/kvrig-modules
    ip link set lo up
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower \
        || stage1_fail "mount hostroot"
    mount -t tmpfs -o mode=0755 kvrig-rw /rw || stage1_fail "tmpfs"
    mkdir /rw/upper /rw/work
    mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work kvrig-root /newroot \
        || stage1_fail "overlay"
    N=/newroot
    # Everything is mounted from here with the in-RAM busybox: each exec of a dynamic
    # binary over 9p costs tens of milliseconds under TCG.
    mount -t proc proc $N/proc
    mount -t sysfs sysfs $N/sys
    mount -t devtmpfs devtmpfs $N/dev
    mkdir -p $N/dev/pts $N/dev/shm
    mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $N/dev/pts
    mount -t tmpfs -o mode=1777 shm $N/dev/shm
    # udev normally creates these; scripts and Python's subprocess rely on /dev/fd.
    ln -s /proc/self/fd $N/dev/fd
    ln -s /proc/self/fd/0 $N/dev/stdin
    ln -s /proc/self/fd/1 $N/dev/stdout
    ln -s /proc/self/fd/2 $N/dev/stderr
    # ttyS1 is the host's doorbell for new commands: raw, so a bare "\n" is delivered and
    # nothing is echoed back.
    stty -F $N/dev/ttyS1 raw -echo 2>/dev/null
    mount -t fusectl fusectl $N/sys/fs/fuse/connections
    mount -t tmpfs -o mode=0755 run $N/run
    mkdir -p $N/run/kvrig/chan "$N/usr/lib/modules/$KVRIG_KVER"
    mkfifo $N$TICK
    mount --bind "$N$KVRIG_MODDIR" "$N/usr/lib/modules/$KVRIG_KVER" || stage1_fail "modules"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none kvchan $N$CHAN \
        || stage1_fail "mount kvchan"
    # A fresh tmpfs on /tmp would hide a checkout that lives under /tmp (CI clones into
    # /tmp/xyz); park those paths, mount the tmpfs, then move them back into place.
    i=0
    IFS=:
    for p in $KVRIG_KEEP; do
        case $p in /tmp/*) i=$((i + 1)); mkdir /keep/$i; mount --bind "$N$p" /keep/$i ;; esac
    done
    mount -t tmpfs -o mode=1777 tmp $N/tmp
    i=0
    for p in $KVRIG_KEEP; do
        case $p in /tmp/*) i=$((i + 1)); mkdir -p "$N$p"; mount --move /keep/$i "$N$p" ;; esac
    done
    unset IFS
    read -r up _ <$N/proc/uptime
    echo "kvrig: stage 1 done at ${up}s" >/dev/console
    exec switch_root $N /bin/bash "$KVRIG_INIT" stage2
    stage1_fail "switch_root"
}

# The serial of the USB device a /sys/block/sdX sits on, found by walking up sysfs.
block_serial() {
    local d
    cd -P "$1/device" 2>/dev/null || return 1
    d=$PWD
    while [[ $d == /sys/devices/* ]]; do
        if [[ -f $d/serial && -f $d/idVendor ]]; then
            read -r REPLY <"$d/serial" && return 0
            return 1
        fi
        d=${d%/*}
    done
    return 1
}

stick_dev() {
    local b
    for b in /sys/block/sd*; do
        if block_serial "$b" && [[ $REPLY == "$1" && -b /dev/${b##*/} ]]; then
            echo "/dev/${b##*/}"
            return 0
        fi
    done
    return 1
}

usb_present() {
    local f s
    for f in /sys/bus/usb/devices/*/serial; do
        read -r s 2>/dev/null <"$f" && [[ $s == "$1" ]] && return 0
    done
    return 1
}

# Fractional sleep without forking: a read with a timeout on a FIFO nobody writes to.
nap() {
    read -r -t "$1" _ <>"$TICK"
}

wait_stick() {  # SERIAL present|absent TIMEOUT
    local deadline=$((SECONDS + ${3%.*} + 1))
    while ((SECONDS < deadline)); do
        if [[ $2 == present ]]; then
            stick_dev "$1" && return 0
        elif ! usb_present "$1" && ! stick_dev "$1" >/dev/null; then
            return 0
        fi
        nap 0.02
    done
    echo "kvrig: stick $1 not $2 after $3 s" >&2
    return 1
}

# Runs command N in its own process group (set -m) so it gets default SIGINT handling
# and the host can signal the whole tree; the exit status is written last, as the
# host's "done" marker.
launch() {
    local b=$CHAN/$1 cmd pid rc
    set -m
    cd "$KVRIG_REPO" 2>/dev/null || cd /
    read -r -d '' cmd <"$b.sh"
    (exec /bin/sh -c "$cmd" <"$b.in" >"$b.out" 2>"$b.err") &
    pid=$!
    echo "$pid" >"$b.pid"
    wait "$pid"
    rc=$?
    echo "$rc" >"$b.rc"
}

stage2() {
    cd /
    read -r up _ </proc/uptime
    echo "kvrig: stage 2 started at ${up}s" >/dev/console
    echo kvrig >/proc/sys/kernel/hostname
    export HOME=/root LANG=C.UTF-8 TERM=dumb
    local s
    for s in $KVRIG_SERIALS; do
        wait_stick "$s" present 30 >/dev/null
    done
    cd / && unset OLDPWD  # block_serial cd-ed around sysfs; commands inherit our env
    # Sleep on the doorbell; the timeout is only a fallback poll (the FIFO if no ttyS1).
    if [[ -c /dev/ttyS1 ]]; then exec 9<>/dev/ttyS1; else exec 9<>"$TICK"; fi
    read -r up _ </proc/uptime
    echo "kvrig: ready at ${up}s" >/dev/console
    echo "$up" >"$CHAN/ready"
    local n=1
    while :; do
        if [[ -e $CHAN/$n.sh ]]; then
            launch "$n" 2>/dev/null &
            n=$((n + 1))
            continue
        fi
        read -r -t "$KVRIG_POLL" -u 9 _
    done
}

case "${1:-}" in
stage2)
    stage2
    echo "kvrig: agent loop ended" >/dev/console
    echo o >/proc/sysrq-trigger
    ;;
stick-dev) stick_dev "$2" ;;
wait-stick) wait_stick "$2" "$3" "$4" ;;
*)
    # The kernel hands init any command-line word it does not know (e.g. "nokaslr"),
    # so stage 1 is recognised by being PID 1, not by an empty argument list.
    if [ "$$" = 1 ]; then
        stage1
    fi
    echo "usage: $0 [stage2 | stick-dev SERIAL | wait-stick SERIAL present|absent TIMEOUT]" >&2
    exit 2
    ;;
esac
