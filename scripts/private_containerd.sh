#!/usr/bin/env bash
# Start/stop a private containerd (own root, state and sockets under DIR); never touches a
# system containerd.   private_containerd.sh start DIR | stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?DIR}
case "$cmd" in
start)
  mkdir -p "$dir"/{root,state}
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-colo]
  runtime_type = "io.containerd.kata-colo.v2"
  pod_annotations = ["io.katacontainers.*"]
  container_annotations = ["io.katacontainers.colo.*"]
TOML
  containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 100); do
    ctr -a "$dir/containerd.sock" version >/dev/null 2>&1 && exit 0
    sleep 0.1
  done
  echo "containerd did not come up; log:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1 ;;
stop)
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  # containerd leaves its snapshot mounts when killed; release them before removing the dir.
  { grep -o " $dir/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$dir" ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
