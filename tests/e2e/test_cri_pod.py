"""End to end through CRI, the way kubelet drives a node: containerd 1.6.20's CRI plugin with
runtime handler ``kata-colo`` (the installed shim, one QEMU/TCG VM per pod), Debian's CNI
plugins (bridge + host-local on a private bridge), the local pause image, and our CRI client.

Two pods, each with a busybox httpd container, are started once for the module (a TCG boot
costs ~10 s per VM) and checked from every side; the last test removes them and checks that
nothing (netns, veth, IP reservation, tap/filters, qemu, shim, state) is left behind.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import platform
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from common.errors import NotFound
from cri.client import CriClient, container_config, pod_config
from proto.cri.runtime.v1 import api_pb2 as api
from tests.support.containerd import IMAGE, RUNTIME, STATE_ROOT, Containerd, shim_processes

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

HANDLER = "kata-colo"
PAUSE_IMAGE = "localhost/kata-colo/pause:3.6"
PORT = 8080
GUEST_KERNEL = re.compile(r"^\d+\.\d+\.\d+-\d+-amd64$")
BUSYBOX = "/bin/busybox"
T = TypeVar("T")


@dataclass
class Pod:
    name: str
    id: str
    ip: str
    netns: str  # /var/run/netns/cni-<uuid>, from the sandbox container's OCI spec
    netns_ino: int
    container: str
    log_dir: Path
    labels: dict[str, str]

    @property
    def marker(self) -> str:
        return f"served-by-{self.name}"


def cri(c: Containerd, fn: Callable[[CriClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with CriClient(c.address) as client:
            return await fn(client)

    return asyncio.run(go())


def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


async def _wait_for_images(client: CriClient, *refs: str, timeout: float = 20) -> None:
    """`ctr image import` returns before the CRI plugin has seen the image event."""
    deadline = time.monotonic() + timeout
    missing = list(refs)
    while missing:
        missing = [r for r in missing if await client.image_status(r) is None]
        if missing and time.monotonic() > deadline:
            raise AssertionError(f"CRI does not see images {missing}")
        await asyncio.sleep(0.2)


async def _start_pod(client: CriClient, c: Containerd, name: str, labels: dict[str, str]) -> Pod:
    log_dir = c.dir / "pod-logs" / name
    config = pod_config(name, "kc-e2e", uid=f"{name}-uid", log_directory=str(log_dir), labels=labels)
    pod_id = await client.run_pod_sandbox(config, runtime_handler=HANDLER)
    status = await client.pod_sandbox_status(pod_id, verbose=True)
    spec = json.loads(status.info["info"])["runtimeSpec"]
    netns = next(ns.get("path", "") for ns in spec["linux"]["namespaces"] if ns["type"] == "network")
    script = (f"mkdir -p /www && echo {name} > /www/who && echo served-by-{name} > /www/index.html "
              f"&& exec httpd -f -p {PORT} -h /www")
    cid = await client.create_container(pod_id, container_config(
        "web", IMAGE, command=["sh", "-c", script], log_path="web/0.log", labels=labels),
        sandbox_config=config)
    await client.start_container(cid)
    return Pod(name, pod_id, status.status.network.ip, netns, os.stat(netns).st_ino, cid, log_dir, labels)


async def _remove_all(client: CriClient, labels: dict[str, str]) -> None:
    for pod in await client.list_pod_sandbox(labels=labels):
        await client.stop_pod_sandbox(pod.id)
        await client.remove_pod_sandbox(pod.id)


@pytest.fixture(scope="module")
def pods(cri_containerd: Containerd):
    c = cri_containerd
    run_id = uuid.uuid4().hex[:6]
    labels = {"kata-colo.e2e/run": run_id}

    async def start(client: CriClient) -> tuple[Pod, Pod]:
        await _wait_for_images(client, PAUSE_IMAGE, IMAGE)
        a, b = await asyncio.gather(_start_pod(client, c, f"kc-cri-a-{run_id}", labels),
                                    _start_pod(client, c, f"kc-cri-b-{run_id}", labels))
        return a, b

    try:
        yield cri(c, start)
    finally:
        cri(c, lambda client: _remove_all(client, labels))


def exec_sync(c: Containerd, pod: Pod, *cmd: str, timeout: int = 60) -> tuple[int, str, str]:
    rc, out, err = cri(c, lambda client: client.exec_sync(pod.container, list(cmd), timeout))
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


def until(what: str, check: Callable[[], object], timeout: float = 20, interval: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy; fail with the last value/exception."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - reported below
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still failing after {timeout}s: {last!r}")
        time.sleep(interval)


def test_pods_are_ready_with_their_cni_ip(pods, cri_containerd):
    c = cri_containerd
    subnet = ipaddress.ip_network(c.cni_subnet)
    for pod in pods:
        st = cri(c, lambda client: client.pod_sandbox_status(pod.id, verbose=True))
        assert st.status.state == api.SANDBOX_READY
        assert st.status.runtime_handler == HANDLER
        assert st.status.metadata.name == pod.name
        assert ipaddress.ip_address(pod.ip) in subnet, (pod.ip, subnet)
        info = json.loads(st.info["info"])
        assert info["runtimeType"] == RUNTIME
        assert info["runtimeSpec"]["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
        assert pod.netns.startswith("/var/run/netns/cni-") and os.path.exists(pod.netns), pod.netns
    assert pods[0].ip != pods[1].ip
    listed = cri(c, lambda client: client.list_pod_sandbox(labels=pods[0].labels))
    assert sorted(p.id for p in listed) == sorted(p.id for p in pods)


def test_containers_run_from_the_cri_image_store(pods, cri_containerd):
    c = cri_containerd
    for pod in pods:
        st = cri(c, lambda client: client.container_status(pod.container)).status
        assert st.state == api.CONTAINER_RUNNING, st
        assert st.image.image == IMAGE
        assert st.log_path == str(pod.log_dir / "web" / "0.log")
        ctrs = cri(c, lambda client: client.list_containers(pod_id=pod.id))
        assert [x.id for x in ctrs] == [pod.container]
    tags = {t for img in cri(c, lambda client: client.list_images()) for t in img.repo_tags}
    assert {IMAGE, PAUSE_IMAGE} <= tags


def test_exec_sync_runs_in_the_guest(pods, cri_containerd):
    pod = pods[0]
    # The exec may race the container's own script that writes /www/who: give it up to 10 s.
    rc, out, err = exec_sync(cri_containerd, pod, "sh", "-c", "for i in $(seq 100); do [ -f /www/who ] && break; "
                             "sleep 0.1; done; uname -r; cat /www/who; echo to-stderr >&2; exit 3")
    assert rc == 3
    kernel, who = out.splitlines()
    assert GUEST_KERNEL.match(kernel) and kernel != platform.release(), kernel
    assert who == pod.name
    assert err == "to-stderr\n"


def test_guest_has_the_pod_ip(pods, cri_containerd):
    for pod in pods:
        rc, out, err = exec_sync(cri_containerd, pod, "ip", "-o", "addr", "show")
        assert rc == 0, err
        assert f"inet {pod.ip}/" in out, f"pod IP {pod.ip} not inside the guest of {pod.name}:\n{out}"


def test_pod_netns_has_tap_and_tc_redirects(pods):
    for pod in pods:
        ns = os.path.basename(pod.netns)
        taps = run("ip", "-n", ns, "-o", "link", "show", "type", "tun").stdout
        assert taps.strip(), f"no tap in {pod.netns}"
        filters = run("tc", "-n", ns, "filter", "show", "dev", "eth0", "ingress").stdout
        assert "mirred" in filters, f"no mirred redirect on eth0 in {pod.netns}:\n{filters}"


def test_host_reaches_the_pods(pods):
    # The ping alone would also be answered by the pod netns' own stack if nothing redirected
    # eth0's traffic to the VM; the HTTP answer can only come from httpd inside the guest.
    for pod in pods:
        until(f"host ping {pod.ip}",
              lambda: run(BUSYBOX, "ping", "-c", "1", "-W", "2", pod.ip).returncode == 0, timeout=15)

        def http_get() -> str:
            with urllib.request.urlopen(f"http://{pod.ip}:{PORT}/", timeout=5) as resp:
                return resp.read().decode()

        body = until(f"HTTP GET {pod.ip}:{PORT} from the host", http_get, timeout=20)
        assert str(body).strip() == pod.marker


def test_pods_reach_each_other(pods, cri_containerd):
    a, b = pods
    # HTTP by hand over nc: Debian's busybox-static wget segfaults (static glibc), here and on the host.
    request = f"GET / HTTP/1.0\\r\\nHost: {b.ip}\\r\\n\\r\\n"
    rc, out, err = exec_sync(cri_containerd, a, "sh", "-c", f"ping -c 1 -W 5 {b.ip} >/dev/null && "
                             f"printf '{request}' | nc -w 10 {b.ip} {PORT}")
    assert rc == 0, f"pod {a.name} ({a.ip}) cannot reach {b.name} ({b.ip}): rc={rc} {out!r} {err!r}"
    assert out.startswith("HTTP/1.") and " 200 " in out.splitlines()[0], out
    assert out.rstrip().endswith(b.marker), out


def _holders(netns_ino: int) -> list[int]:
    """Processes whose network namespace is the given one (by nsfs inode)."""
    link = f"net:[{netns_ino}]"
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/ns/net") == link:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _qemu(sandbox_id: str) -> list[str]:
    return [ln for ln in run("pgrep", "-af", "qemu-system").stdout.splitlines() if sandbox_id in ln]


def test_removing_the_pods_leaves_nothing_behind(pods, cri_containerd):
    c = cri_containerd
    for pod in pods:
        cri(c, lambda client: client.stop_pod_sandbox(pod.id))
        st = cri(c, lambda client: client.container_status(pod.container)).status
        assert st.state == api.CONTAINER_EXITED, st
        assert cri(c, lambda client: client.pod_sandbox_status(pod.id)).status.state == api.SANDBOX_NOTREADY
        cri(c, lambda client: client.remove_pod_sandbox(pod.id))
        with pytest.raises(NotFound):
            cri(c, lambda client: client.container_status(pod.container))
        with pytest.raises(NotFound):
            cri(c, lambda client: client.pod_sandbox_status(pod.id))
    assert cri(c, lambda client: client.list_pod_sandbox(labels=pods[0].labels)) == []
    ipam = c.dir / "cni" / "ipam"

    def leftovers() -> dict[str, object]:
        found: dict[str, object] = {}
        for pod in pods:
            left = {
                "netns": os.path.exists(pod.netns),
                "netns holders": _holders(pod.netns_ino),
                "ip reservation": [str(p) for p in ipam.rglob(pod.ip)],
                "qemu": _qemu(pod.id),
                "shim": shim_processes(pod.id),
                "state": (STATE_ROOT / pod.id).exists(),
                "mounts": [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if pod.id in ln],
            }
            found.update({f"{pod.name} {k}": v for k, v in left.items() if v})
        veths = run("ip", "-o", "link", "show", "master", c.cni_bridge).stdout.strip()
        if veths:
            found["veths on the bridge"] = veths
        return found

    deadline = time.monotonic() + 20
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    # With the netns gone and no process left in it, its veth end, tap and tc filters are gone too.
    assert not left, f"left behind: {left}"
