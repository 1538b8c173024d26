#!/usr/bin/env bash
# `make demo`: a private containerd, a locally built busybox image, and containers in a
# kata-colo VM — guest kernel next to host kernel, an exec into a running container; then
# Kubernetes' path: a pod through CRI (runtime handler kata-colo, CNI bridge) serving HTTP on
# its pod IP from inside the VM; cleanup.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(mktemp -d /tmp/kata-colo-demo.XXXXXX)
IMG=docker.io/library/busybox:kata-colo
RT=io.containerd.kata-colo.v2
K() { python3 -m cri --address "$DIR/containerd.sock" "$@"; }  # a tiny crictl (cri/__main__.py)
cleanup() {
  for p in $(K pods -q 2>/dev/null); do K stopp "$p" >/dev/null 2>&1 || true; K rmp "$p" >/dev/null 2>&1 || true; done
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

say "Kubernetes' path: CRI RunPodSandbox with runtime handler kata-colo (python -m cri ≈ crictl)"
ctr -a "$DIR/containerd.sock" -n k8s.io image import "$DIR/busybox.tar" >/dev/null
start=$(date +%s%N)
POD=$(K runp demo-pod -n demo -r kata-colo --log-dir "$DIR/pod-logs")
echo "(RunPodSandbox: VM booted and CNI wired in $(( ($(date +%s%N) - start) / 1000000 )) ms)"
IP=$(K inspectp "$POD" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["network"]["ip"])')
CID=$(K create "$POD" web "$IMG" --log-path web.log -- \
  sh -c 'mkdir -p /www && echo "hello from a kata-colo pod" > /www/index.html && exec httpd -f -p 8080 -h /www')
K start "$CID"
K pods
K ps
say "ExecSync in the container: the pod's CNI address $IP is on the guest's eth0"
K exec "$CID" ip -o -4 addr show eth0
say "from the host: HTTP to $IP:8080, answered by httpd inside the VM"
python3 - "$IP" <<'PY'
import sys, time, urllib.request
for attempt in range(20):
    try:
        print(urllib.request.urlopen(f"http://{sys.argv[1]}:8080/", timeout=5).read().decode(), end="")
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("no HTTP answer from the pod")
PY
say "stop and remove the pod"
K stopp "$POD"
K rmp "$POD"
echo "leftover qemu processes: $(pgrep -c qemu-system || true)"
