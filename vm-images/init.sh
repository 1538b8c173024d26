#!/bin/sh
# kata-colo guest /init (busybox ash, PID 1). Contract: vm-images/README.md.
# Steps: mounts -> cgroup2 controllers -> modules -> lo -> agent (or shell / poweroff).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=linux LANG=C.UTF-8 PYTHONUTF8=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=/opt/kata-colo

mount -t proc proc /proc
# The boot initrd of a read-only root image (root=/dev/vdX, image_rootfs.py): load the modules,
# mount the image and switch_root into it, where this same script runs the steps below.
root_dev=
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root_dev="${arg#root=}" ;; esac
done
if [ -n "$root_dev" ] && [ ! -e /.kata-colo-image ]; then
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    n=0
    while read -r m; do
        [ -n "$m" ] && insmod "/lib/modules/kata-colo/$m.ko" 2>/dev/null && n=$((n+1))
    done < /lib/modules/kata-colo/load.order
    echo "kata-colo-init: modules loaded: $n (boot initrd)" > /dev/console
    mkdir -p /newroot
    if ! mount -t erofs -o ro "$root_dev" /newroot; then
        echo "kata-colo-init: cannot mount the root image $root_dev" > /dev/console
        poweroff -f
    fi
    umount /sys
    mount --move /dev /newroot/dev
    umount /proc
    exec switch_root /newroot /init
fi
# Optional: copy the initramfs into a tmpfs and switch_root into it, so runc can pivot_root
# (costs the copy; default is to stay on the initramfs and run runc with --no-pivot).
if [ ! -e /.kata-colo-switched ] && grep -q 'kata_colo.root=tmpfs' /proc/cmdline; then
    echo "kata-colo-init: copying root to tmpfs uptime=$(cut -d' ' -f1 /proc/uptime)"
    mkdir -p /newroot
    mount -t tmpfs -o mode=755 root /newroot
    for e in /* /.[!.]*; do
        case "$e" in /newroot|/proc|/sys|/dev|/run|/tmp|'/.[!.]*') ;; *) cp -a "$e" /newroot/ ;; esac
    done
    mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp
    chmod 1777 /newroot/tmp
    mknod -m 600 /newroot/dev/console c 5 1 2>/dev/null
    echo "kata-colo-init: switch_root uptime=$(cut -d' ' -f1 /proc/uptime)"
    touch /newroot/.kata-colo-switched
    umount /proc
    exec switch_root /newroot /init
fi
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev run /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mkdir -p /run/kata-colo
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

log() { echo "kata-colo-init: $*"; }
mode=agent
selftest=
debug=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kata_colo.init=*) mode="${arg#kata_colo.init=}" ;;
        kata_colo.selftest=*) selftest="${arg#kata_colo.selftest=}" ;;
        kata_colo.debug=1) debug=1 ;;
    esac
done
# poweroff mode is the image self-test: it prints the diagnostics unless kata_colo.selftest=0
[ -z "$selftest" ] && [ "$mode" = poweroff ] && selftest=1
[ "$debug" = 1 ] && log "start uptime=$(cut -d' ' -f1 /proc/uptime)"

# cgroup v2 with the controllers the agent places containers with
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
for c in cpu cpuset memory pids; do
    echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || log "cgroup controller $c unavailable"
done

# kernel modules, dependency order computed at build time (those the boot initrd of a root image
# loaded already are skipped)
n=0
while read -r m; do
    [ -n "$m" ] || continue
    [ -e "/sys/module/$m" ] && continue
    if insmod "/lib/modules/kata-colo/$m.ko" 2>/dev/null; then n=$((n+1)); else log "insmod $m failed"; fi
    [ "$debug" = 1 ] && log "insmod $m done uptime=$(cut -d' ' -f1 /proc/uptime)"
done < /lib/modules/kata-colo/load.order
log "modules loaded: $n"

ip link set lo up
hostname kata-colo 2>/dev/null

ports=""
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && ports="$ports $(basename "$p")=$(cat "$p/name")"
done
log "virtio-ports:${ports:- none}"
log "init done uptime=$(cut -d' ' -f1 /proc/uptime)"
log "ready"

if [ "$selftest" = 1 ]; then
    t0=$(cut -d' ' -f1 /proc/uptime)
    python3 -c 'import google.protobuf; from google.protobuf.internal import api_implementation as a; print("kata-colo-selftest: python ok protobuf", google.protobuf.__version__, a.Type())' \
        || echo "kata-colo-selftest: python FAILED"
    t1=$(cut -d' ' -f1 /proc/uptime)
    log "python import took $t0 -> $t1"
    python3 -c 'import ttrpc, proto, agent_api, shim.errors; print("kata-colo-selftest: agent layer imports ok")' \
        || echo "kata-colo-selftest: agent layer imports FAILED"
    log "cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
    echo "kata-colo-selftest: runc $(runc --version | head -n1)"
    echo "kata-colo-selftest: crun $(crun --version | head -n1)"
    log "selftest done uptime=$(cut -d' ' -f1 /proc/uptime)"
fi

case "$mode" in
    shell)
        log "starting shell"
        setsid cttyhack sh
        poweroff -f ;;
    poweroff)
        log "poweroff"
        poweroff -f ;;
esac

if [ ! -e /opt/kata-colo/agent_api/agent/__main__.py ]; then
    log "no agent in image (agent_api/agent/__main__.py missing); powering off"
    poweroff -f
fi
# runc cannot pivot_root out of the initramfs root (manifest: runc_no_pivot); after the
# kata_colo.root=tmpfs switch_root it can.
pivot=--no-pivot
[ -e /.kata-colo-switched ] && pivot=
log "exec agent $pivot"
exec python3 -m agent_api.agent $pivot
