#!/usr/bin/env bash
# Start/stop a private containerd (own root, state and sockets under DIR); never touches a
# system containerd.   private_containerd.sh start DIR | stop DIR
#
# Its CRI plugin (same socket) is usable like a kubelet node's: sandbox_image is a locally built
# pause image (scripts/make_oci_image.py --pause, imported into the k8s.io namespace), CNI uses
# Debian's containernetworking-plugins (/usr/lib/cni) with a bridge + host-local network whose
# bridge name and /24 are derived from DIR (slot n of 10.240.0.0/12: bridge kcbr<n in hex>,
# subnet 10.<240 + n/256>.<n%256>.0/24; the next free slot if taken), so two private containerds
# never share a bridge or subnet. The runtime handler `kata-colo` runs io.containerd.kata-colo.v2.
# `stop` removes what CNI leaves behind for this instance: the pods' /var/run/netns/cni-* mounts,
# their host veths and the bridge. The bridge plugin's isGateway turns net.ipv4.ip_forward on;
# the value from before the first private containerd's bridge is kept in $FORWARD_SAVED and put
# back when the last such bridge is gone.
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?DIR}
here=$(cd "$(dirname "$0")" && pwd)
PAUSE_IMAGE=localhost/kata-colo/pause:3.6
CNI_BIN_DIR=/usr/lib/cni
FORWARD_SAVED=/run/kata-colo/cni-ip_forward.saved

other_bridges() { ip -o link show type bridge 2>/dev/null | grep -q ': kcbr[0-9a-f]*:'; }

# Claim a bridge name + subnet slot for this DIR; prints "BRIDGE SUBNET".
claim_network() {
  local n=$(( 0x$(printf '%s' "$dir" | sha256sum | cut -c1-8) % 4096 )) i br subnet
  for i in $(seq 4096); do
    br=$(printf 'kcbr%03x' "$n")
    subnet="10.$(( 240 + n / 256 )).$(( n % 256 )).0/24"
    if ! ip link show "$br" >/dev/null 2>&1 && [ -z "$(ip -4 route show "$subnet")" ] \
        && ip link add "$br" type bridge 2>/dev/null; then
      echo "$br $subnet"; return 0
    fi
    n=$(( (n + 1) % 4096 ))
  done
  echo "no free bridge/subnet slot in 10.240.0.0/12" >&2; return 1
}

# Network namespaces of this instance's pods: from the sandbox specs containerd still knows, and
# from the peers of the veths on our bridge (CNI names them /var/run/netns/cni-<uuid>).
pod_netns() {
  local br=$1 id nsid
  if [ -S "$dir/containerd.sock" ]; then
    for id in $(ctr -a "$dir/containerd.sock" -n k8s.io containers ls -q 2>/dev/null || true); do
      ctr -a "$dir/containerd.sock" -n k8s.io containers info "$id" 2>/dev/null \
        | grep -o '"/var/run/netns/cni-[0-9a-f-]*"' | tr -d '"' || true
    done
  fi
  [ -n "$br" ] || return 0
  for nsid in $(ip -o link show master "$br" 2>/dev/null | grep -o 'link-netnsid [0-9]*' | cut -d' ' -f2); do
    ip netns list 2>/dev/null | awk -v id="$nsid" '$1 ~ /^cni-/ && $3 == id")" {print "/var/run/netns/" $1}'
  done
}

case "$cmd" in
start)
  mkdir -p "$dir"/{root,state,cni/net.d,cni/ipam} "$(dirname "$FORWARD_SAVED")"
  if ! other_bridges || [ ! -e "$FORWARD_SAVED" ]; then cat /proc/sys/net/ipv4/ip_forward > "$FORWARD_SAVED"; fi
  read -r bridge subnet < <(claim_network) || true
  [ -n "${bridge:-}" ] || exit 1
  echo "$bridge" > "$dir/cni/bridge"
  # A failed start releases what it took (containerd, the bridge); its log is printed first.
  trap 'rc=$?; [ $rc = 0 ] || bash "$here/$(basename "$0")" stop "$dir" >/dev/null 2>&1 || true; exit $rc' EXIT
  cat > "$dir/cni/net.d/10-kata-colo.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "kata-colo-$bridge",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$subnet"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$dir/cni/ipam"
      }
    }
  ]
}
JSON
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
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "$CNI_BIN_DIR"
  conf_dir = "$dir/cni/net.d"
  max_conf_num = 1
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-colo]
  runtime_type = "io.containerd.kata-colo.v2"
  pod_annotations = ["io.katacontainers.*"]
  container_annotations = ["io.katacontainers.colo.*"]
TOML
  containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 100); do
    kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null || break  # containerd died: fail now
    if ctr -a "$dir/containerd.sock" version >/dev/null 2>&1; then
      python3 "$here/make_oci_image.py" --pause "$dir/pause.tar" "$PAUSE_IMAGE" >/dev/null
      ctr -a "$dir/containerd.sock" -n k8s.io image import "$dir/pause.tar" >/dev/null
      exit 0
    fi
    sleep 0.1
  done
  echo "containerd did not come up; log:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1 ;;
stop)
  bridge=$(cat "$dir/cni/bridge" 2>/dev/null || true)
  netns=$(pod_netns "$bridge" | sort -u)
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  # containerd leaves its snapshot mounts when killed; release them before removing the dir.
  { grep -o " $dir/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for ns in $netns; do umount -l "$ns" 2>/dev/null || true; rm -f "$ns"; done
  if [ -n "$bridge" ]; then
    for veth in $(ip -o link show master "$bridge" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
      ip link delete "$veth" 2>/dev/null || true
    done
    ip link delete "$bridge" type bridge 2>/dev/null || true
    if ! other_bridges && [ -e "$FORWARD_SAVED" ]; then
      cat "$FORWARD_SAVED" > /proc/sys/net/ipv4/ip_forward && rm -f "$FORWARD_SAVED"
    fi
  fi
  rm -rf "$dir" ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
