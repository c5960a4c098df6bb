#!/bin/sh
# ftvm image init: PID 1 of the initramfs, run by busybox sh.
#
# Kernel command line it reads (all optional):
#   ftvm.ip=ADDR/PREFIX   static address for eth0 (no DHCP)
#   ftvm.gw=ADDR          default route
#   ftvm.exec=BASE64      a shell command (base64, standard or URL-safe alphabet): run it as root
#                         with `sh -c`, print `ftvm-exit-status: N` on its own line, power off.
# Without ftvm.exec it starts a shell on the console.
#
# FTVM_INIT_TEST=1 is for host-side tests only: the command line comes from $FTVM_CMDLINE, and
# nothing is mounted, loaded, configured or powered off (the script exits with the status instead).

PATH=/sbin:/bin:/usr/sbin:/usr/bin
HOME=/root
TERM=linux
export PATH HOME TERM

log() { echo "ftvm-init: $*"; }

testing() { [ -n "$FTVM_INIT_TEST" ]; }

setup_base() {
    /bin/busybox mkdir -p /proc /sys /dev /tmp /run /root
    /bin/busybox mount -t proc proc /proc
    # `--install` finds busybox through /proc/self/exe, so proc comes first.
    /bin/busybox --install -s
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev || log "cannot mount devtmpfs on /dev"
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /tmp
    mount -t tmpfs tmpfs /run
    hostname ftvm
}

load_modules() {
    # Full paths, dependencies first (written by `ftvm image build`).
    while read -r ko; do
        [ -n "$ko" ] || continue
        insmod "$ko" || log "cannot load module $ko"
    done </etc/ftvm/modules
}

parse_cmdline() {
    ftvm_ip=
    ftvm_gw=
    ftvm_exec=
    set -f
    for arg in $1; do
        case "$arg" in
        ftvm.ip=*) ftvm_ip=${arg#ftvm.ip=} ;;
        ftvm.gw=*) ftvm_gw=${arg#ftvm.gw=} ;;
        ftvm.exec=*) ftvm_exec=${arg#ftvm.exec=} ;;
        esac
    done
    set +f
}

setup_net() {
    if testing; then
        [ -z "$ftvm_ip" ] || log "would configure eth0 with $ftvm_ip gateway ${ftvm_gw:-none}"
        return 0
    fi
    ip link set lo up
    [ -n "$ftvm_ip" ] || return 0
    # virtio_net registers eth0 while its module loads; give a slow (emulated) guest time.
    n=0
    while [ ! -e /sys/class/net/eth0 ]; do
        n=$((n + 1))
        if [ "$n" -gt 100 ]; then
            log "no eth0 after 10 s: ftvm.ip=$ftvm_ip not applied"
            return 1
        fi
        sleep 0.1
    done
    if ip addr add "$ftvm_ip" dev eth0 && ip link set eth0 up; then
        log "eth0 $ftvm_ip"
    else
        log "cannot configure eth0 with $ftvm_ip"
        return 1
    fi
    if [ -n "$ftvm_gw" ]; then
        ip route add default via "$ftvm_gw" || log "cannot add a default route via $ftvm_gw"
    fi
}

# Prints the decoded ftvm.exec command; fails if it is not base64.
decode_exec() {
    b64=$(printf '%s' "$1" | tr -- '-_' '+/')
    case $((${#b64} % 4)) in
    2) b64="$b64==" ;;
    3) b64="$b64=" ;;
    esac
    printf '%s' "$b64" | base64 -d
}

power_off() {
    sync
    if testing; then
        exit "$1"
    fi
    poweroff -f
    # Still here: power-off failed; the status line is out, so just stay quiet.
    while :; do sleep 3600; done
}

run_exec() {
    if cmd=$(decode_exec "$ftvm_exec"); then
        sh -c "$cmd" </dev/null
        status=$?
    else
        log "ftvm.exec is not valid base64"
        status=2
    fi
    # On a line of its own even if the command's output did not end with a newline.
    printf '\nftvm-exit-status: %d\n' "$status"
    power_off "$status"
}

if testing; then
    cmdline=$FTVM_CMDLINE
else
    setup_base
    load_modules
    cmdline=$(cat /proc/cmdline)
fi
parse_cmdline "$cmdline"
setup_net
testing || log "up: kernel $(uname -r), $(nproc) CPUs"

if [ -n "$ftvm_exec" ]; then
    run_exec
fi

testing && exit 0
log "no ftvm.exec: starting a shell on the console"
while :; do
    setsid cttyhack sh
    sleep 1
done
