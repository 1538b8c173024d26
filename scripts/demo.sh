#!/usr/bin/env bash
# `make demo`: a private containerd, a locally built busybox image, and containers in a
# kata-colo VM — guest kernel next to host kernel, an exec into a running container, cleanup.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(mktemp -d /tmp/kata-colo-demo.XXXXXX)
IMG=docker.io/library/busybox:kata-colo
RT=io.containerd.kata-colo.v2
cleanup() {
  ctr -a "$DIR/containerd.sock" task kill -s KILL demo-long >/dev/null 2>&1 || true
  sleep 1
  ctr -a "$DIR/containerd.sock" task rm -f demo-long >/dev/null 2>&1 || true
  ctr -a "$DIR/containerd.sock" container rm demo-long >/dev/null 2>&1 || true
  bash scripts/private_containerd.sh stop "$DIR"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
C() { ctr -a "$DIR/containerd.sock" "$@"; }

say "private containerd in $DIR"
bash scripts/private_containerd.sh start "$DIR"
say "import a locally built busybox OCI image"
python3 scripts/make_oci_image.py "$DIR/busybox.tar" "$IMG" >/dev/null
C image import "$DIR/busybox.tar"
say "host kernel"
uname -r
say "guest kernel: ctr run --rm --runtime $RT $IMG demo uname -r"
start=$(date +%s%N)
C run --rm --runtime "$RT" "$IMG" demo-uname uname -r
echo "(ctr run → exit in $(( ($(date +%s%N) - start) / 1000000 )) ms;" \
  "accelerator: $(grep -qE 'vmx|svm' /proc/cpuinfo && echo kvm || echo tcg))"
say "a long-running container, then ctr task exec into it"
C run -d --runtime "$RT" "$IMG" demo-long sleep 300
C task exec --exec-id e1 demo-long sh -c 'echo "exec in $(hostname): kernel $(uname -r), pid $$"'
C task ls
say "stop and clean up"
C task kill -s KILL demo-long
sleep 1
C task rm demo-long
C container rm demo-long
echo "leftover qemu processes: $(pgrep -c qemu-system || true)"
