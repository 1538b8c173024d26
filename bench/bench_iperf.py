"""Guest↔host TCP throughput (Debian's iperf3) through the pod network, for the record.

A netns + veth pair made like CNI would (host end ``kci-<rand>`` in the root netns with
10.239.X.1/24 — outside the 10.240.0.0/12 that private_containerd.sh gives its CNI bridges — pod
end ``eth0`` with 10.239.X.2/24 and a default route via .1). Baseline: an
``iperf3 -s`` in that netns (no VM). Then a private containerd runs ``iperf3 -s`` in a kata-colo
VM joined to the same netns (``ctr run -d --with-ns network:…``: the shim wires a tap to the
veth with tc mirred and gives the guest eth0 the veth's address). Both times the host runs
``iperf3 -c 10.239.X.2 -t N -J``, plain (host→guest) and ``-R`` (guest→host); the receiver's
rate is reported. N is KC_BENCH_IPERF_SECONDS (default 5). Needs root, iperf3, containerd and
the guest image; otherwise says so and returns. Everything made is removed, also on failure.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import image

REPO = Path(__file__).resolve().parents[1]
IMAGE = "docker.io/library/kata-colo-tools:iperf3"
RUNTIME = "io.containerd.kata-colo.v2"
GUEST_IMAGE = image.manifest_path()
PORT = 5201
SECONDS = int(os.environ.get("KC_BENCH_IPERF_SECONDS", "5"))
READY_TIMEOUT = float(os.environ.get("KC_BENCH_IPERF_READY_TIMEOUT", "180"))


def _run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} → {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _free_subnet() -> int:
    used = _run("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(64):
        x = secrets.randbelow(254) + 1
        if f"10.239.{x}." not in used:
            return x
    raise RuntimeError("no free 10.239.X.0/24 subnet")


@contextmanager
def pod_netns(tag: str) -> Iterator[tuple[str, str]]:
    """(netns name, pod IP): a CNI-like netns with eth0 whose veth peer is in the root netns."""
    ns, host = f"kc-iperf-{tag}", f"kci-{tag}"
    x = _free_subnet()
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "addr", "add", f"10.239.{x}.1/24", "dev", host)
        _run("ip", "link", "set", host, "up")
        _run("ip", "-n", ns, "addr", "add", f"10.239.{x}.2/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", f"10.239.{x}.1")
        yield ns, f"10.239.{x}.2"
    finally:
        _run("ip", "netns", "del", ns, check=False)     # takes eth0 and so its peer with it
        _run("ip", "link", "del", host, check=False)


def _wait_port(ip: str, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until something accepts on ip:PORT (an iperf3 server shrugs off the probe)."""
    t0 = time.monotonic()
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((ip, PORT), timeout=1):
                return time.monotonic() - t0
        except OSError as exc:
            last = exc
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"server exited with {alive.returncode} before listening")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"nothing listens on {ip}:{PORT} after {timeout:.0f}s ({last})")
        time.sleep(0.5)


def iperf_client(ip: str, reverse: bool) -> float:
    """Receiver-side throughput in Gbit/s of one ``iperf3 -c`` run."""
    argv = ["iperf3", "-c", ip, "-p", str(PORT), "-t", str(SECONDS), "-J", *(["-R"] if reverse else [])]
    last = ""
    for _ in range(3):      # the server may still be resetting after the readiness probe
        res = _run(*argv, timeout=SECONDS + 60, check=False)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"error": res.stderr.strip() or res.stdout.strip()}
        if "error" not in out:
            return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9
        last = out["error"]
        time.sleep(1)
    raise RuntimeError(f"{' '.join(argv)}: {last}")


def both_directions(ip: str) -> tuple[float, float]:
    """(host→guest, guest→host) Gbit/s against the iperf3 server at ip."""
    return iperf_client(ip, reverse=False), iperf_client(ip, reverse=True)


def bare_veth(ns: str, ip: str) -> tuple[float, float]:
    server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            _wait_port(ip, 10, alive=server)
        except RuntimeError as exc:
            server.kill()
            err = server.communicate(timeout=10)[1].decode(errors="replace").strip()
            raise RuntimeError(f"bare veth: {exc}: {err}") from None
        return both_directions(ip)
    finally:
        server.kill()
        server.wait(timeout=10)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(none)"


def in_vm(ns: str, ip: str, tag: str) -> tuple[float, float, float]:
    """(host→guest, guest→host Gbit/s, seconds from ctr run -d to the server accepting)."""
    sys.path.insert(0, str(REPO))
    import make_tool_image  # on sys.path through tests.support.containerd (scripts/)

    from tests.support.containerd import product_shim_dir, start_containerd, stop_containerd

    cid = f"kc-iperf-{tag}"
    shim_dir = product_shim_dir()
    c = start_containerd([shim_dir])
    try:
        tar = c.dir / "tools.tar"
        make_tool_image.build(str(tar), IMAGE, ["/usr/bin/iperf3"])
        c.ctr("image", "import", str(tar))
        t0 = time.monotonic()
        # TMPDIR: iperf3 mkstemp()s, unlinks, then ftruncate()s its buffer file, which fails
        # (ENOENT) on the container's 9p rootfs (QEMU's 9p truncates by path); /dev/shm is tmpfs.
        c.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns", f"network:/var/run/netns/{ns}",
              "--env", "TMPDIR=/dev/shm", "--log-uri", f"file://{c.dir}/iperf3-server.log",
              IMAGE, cid, "iperf3", "-s", "-p", str(PORT))
        try:
            _wait_port(ip, READY_TIMEOUT)
        except RuntimeError as exc:
            tasks = c.ctr("task", "ls", check=False).stdout.decode(errors="replace").strip()
            raise RuntimeError(f"VM: {exc}\ntasks:\n{tasks}\niperf3 server output:\n"
                               f"{_tail(c.dir / 'iperf3-server.log')}\ncontainerd log:\n"
                               f"{c.log_tail(15)}") from None
        ready = time.monotonic() - t0
        h2g, g2h = both_directions(ip)
        return h2g, g2h, ready
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=60, check=False)
        c.ctr("task", "rm", "-f", cid, timeout=120, check=False)
        c.ctr("container", "rm", cid, timeout=60, check=False)
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)


def main() -> None:
    missing = [t for t in ("ip", "iperf3", "ctr", "containerd") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing or not GUEST_IMAGE.exists():
        print(f"bench_iperf: needs root, iperf3, containerd, ctr, ip and the guest image "
              f"(missing: {missing or '-'}, root: {os.geteuid() == 0}, "
              f"guest image: {GUEST_IMAGE.exists()}); skipped")
        return
    tag = secrets.token_hex(3)
    with pod_netns(tag) as (ns, ip):
        base = bare_veth(ns, ip)
        print(f"iperf3 TCP, {SECONDS} s per direction, receiver's rate; pod {ip} on a veth", flush=True)
        print(f"  baseline  bare veth (server in the netns, no VM): "
              f"host→pod {base[0]:7.2f} Gbit/s   pod→host {base[1]:7.2f} Gbit/s", flush=True)
        h2g, g2h, ready = in_vm(ns, ip, tag)
    print(f"  kata-colo VM (tap + tc mirred, virtio-net):       "
          f"host→guest {h2g:6.3f} Gbit/s   guest→host {g2h:6.3f} Gbit/s")
    print(f"  ratio VM / bare veth: host→guest {h2g / base[0]:.4f}x   guest→host {g2h / base[1]:.4f}x")
    print(f"  (ctr run -d → iperf3 in the guest accepting: {ready:.1f}s; the guest runs under "
          f"{_accel().upper()})")


def _accel() -> str:
    from hypervisor import host
    from shim import config

    return host.resolve_accel(config.load().hypervisor.options.accel)


if __name__ == "__main__":
    main()
