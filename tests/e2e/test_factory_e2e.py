"""VM templating and the VM cache end to end: containerd 1.6 + ctr/CRI + the installed shim with
``[factory] enable_template`` (a configuration written for this module from the node's one:
same kernel, image and QEMU, 2 vCPUs, 4 PCIe root ports for NIC hotplug, crun in the guest).

- ``factory init`` builds the template; two ``ctr run --rm`` at once are two clones: correct
  output, different /dev/urandom bytes, different hostnames, guest clock within 1 s;
- vCPU priorities are placed on a clone's vCPU threads (host cgroups and guest cpusets);
- ``factory destroy`` while a clone runs: the clone keeps running and is then removed cleanly;
- the VM cache daemon hands a pre-booted VM to the shim (``--runtime-config-path``);
- a truncated template means a cold boot with a warning, nothing left;
- a CRI pod in a clone: NIC hot-plugged with the veth's MAC, HTTP into and out of the guest.
"""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from cri.client import CriClient, container_config, pod_config
from shim import config as cfgmod
from tests.support.containerd import (
    CNI_BIN_DIR,
    CRI_NAMESPACE,
    IMAGE,
    RUNTIME,
    Containerd,
    assert_nothing_left,
    product_shim_dir,
    start_containerd,
    stop_containerd,
)

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]

REPO = Path(__file__).resolve().parents[2]
CLOCK = "adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {printf \"%d.%06d\\n\", s, $2}'"
PROBE = f"echo first-output; hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; {CLOCK}"


@dataclass
class Factory:
    dir: Path
    config: Path        # templating on
    cache_config: Path  # templating + the VM cache daemon
    template: Path
    endpoint: Path

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ctl", "factory", *args, "--config", str(config or self.config)],
                              capture_output=True, text=True, timeout=180,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))


def _toml(cfg: cfgmod.Config, template: Path, endpoint: Path, cache: int) -> str:
    hv = cfg.hypervisor
    image = f'image = "{hv.image}"' if hv.image else ""
    return f"""
[hypervisor.qemu]
path = "{hv.binary}"
kernel = "{hv.kernel}"
initrd = "{hv.initrd}"
{image}
default_vcpus = 2
pcie_root_ports = 4

[agent.kata]
oci_runtime = "crun"

[factory]
enable_template = true
template_path = "{template}"
vm_cache_number = {cache}
vm_cache_endpoint = "{endpoint}"

[colo.priorities.high]
cpu_shares = 1024

[colo.priorities.low]
cpu_shares = 2
"""


@pytest.fixture(scope="module")
def factory():
    node = cfgmod.load()
    if not Path(node.hypervisor.initrd).exists():
        pytest.skip("guest image not built")
    d = Path(tempfile.mkdtemp(prefix="kc-e2e-fac-", dir="/run"))
    f = Factory(d, d / "factory.toml", d / "cache.toml", d / "template", d / "cache.sock")
    f.config.write_text(_toml(node, f.template, f.endpoint, 0))
    f.cache_config.write_text(_toml(node, f.template, f.endpoint, 1))
    yield f
    f.cli("destroy", config=f.cache_config)
    shutil.rmtree(d, ignore_errors=True)


def _containerd(f: Factory, namespace: str = "default") -> Containerd:
    shim_dir = product_shim_dir()
    old = os.environ.get("KATA_COLO_CONFIG")
    os.environ["KATA_COLO_CONFIG"] = str(f.config)  # containerd passes its env on to the shim
    try:
        c = start_containerd([shim_dir])
    finally:
        if old is None:
            del os.environ["KATA_COLO_CONFIG"]
        else:
            os.environ["KATA_COLO_CONFIG"] = old
    c.namespace = namespace
    c.shim_dir = shim_dir  # type: ignore[attr-defined]
    try:
        c.import_busybox()
    except BaseException:
        stop_containerd(c)
        raise
    return c


@pytest.fixture(scope="module")
def ctrd(factory):
    if shutil.which("containerd") is None:
        pytest.skip("needs Debian's containerd")
    c = _containerd(factory)
    yield c
    stop_containerd(c)
    shutil.rmtree(c.shim_dir, ignore_errors=True)  # type: ignore[attr-defined]


def ctr_run(c: Containerd, name: str, *cmd: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return c.ctr("run", "--rm", "--runtime", RUNTIME, *extra, IMAGE, name, *cmd)


def shim_log(c: Containerd, sandbox: str) -> str:
    return "\n".join(ln for ln in (c.dir / "containerd.log").read_text(errors="replace").splitlines()
                     if f"sandbox {sandbox} VM:" in ln)


def test_factory_init_then_two_clones_at_once_are_different_machines(factory, ctrd):
    res = factory.cli("init")
    assert res.returncode == 0 and "vm factory initialized" in res.stdout, res.stderr
    results: dict[str, tuple[float, float, str]] = {}

    def run(name: str) -> None:
        t0 = time.time()
        out = ctr_run(ctrd, name, "sh", "-c", PROBE).stdout.decode()
        results[name] = (t0, time.time(), out)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("kc-fac-a", "kc-fac-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == ["kc-fac-a", "kc-fac-b"], results
    seen = {}
    for name, (t0, t1, out) in results.items():
        first, host, rnd, clock = out.split()
        assert first == "first-output" and host == name, out
        assert re.fullmatch(r"[0-9a-f]{64}", rnd), out
        assert t0 - 1.0 < float(clock) < t1 + 1.0, (t0, clock, t1)
        seen[name] = rnd
        assert "clone of template" in shim_log(ctrd, name), shim_log(ctrd, name)
        assert_nothing_left(ctrd, name)
    assert seen["kc-fac-a"] != seen["kc-fac-b"]
    st = factory.cli("status")
    assert "vm factory is on" in st.stdout and "clones mapping the template: 0" in st.stdout, st.stdout


def test_vcpu_priorities_are_placed_in_a_clone(factory, ctrd):
    cid = "kc-fac-colo"
    ctrd.ctr("run", "-d", "--runtime", RUNTIME,
             "--annotation", "io.katacontainers.colo.vcpu-priorities=high:1,low:1",
             "--annotation", "io.katacontainers.colo.container-priority=low",
             IMAGE, cid, "sleep", "120")
    try:
        assert "clone of template" in shim_log(ctrd, cid)
        # ctr's cgroupsPath /<namespace>/<id> is the sandbox's pod group (sandbox_cgroup_only)
        groups = {p: Path(f"/sys/fs/cgroup/cpu/default/{cid}/vcpu-{p}/tasks") for p in ("high", "low")}
        deadline = time.monotonic() + 20
        while not all(g.exists() and g.read_text().split() for g in groups.values()):
            assert time.monotonic() < deadline, "vCPU groups not populated"
            time.sleep(0.2)
        tids = {p: g.read_text().split() for p, g in groups.items()}
        assert len(tids["high"]) == 1 and len(tids["low"]) == 1 and tids["high"] != tids["low"], tids
        out = ctrd.ctr("task", "exec", "--exec-id", "e1", cid, "grep", "Cpus_allowed_list",
                       "/proc/self/status").stdout.decode()
        assert re.search(r"Cpus_allowed_list:\s+1$", out, re.M), out
    finally:
        ctrd.ctr("task", "kill", "-s", "KILL", cid, check=False)
        time.sleep(1)
        ctrd.ctr("task", "delete", "-f", cid, check=False)
        ctrd.ctr("container", "delete", cid, check=False)
    assert_nothing_left(ctrd, cid)
    assert not Path(f"/sys/fs/cgroup/cpu/kata-colo/{cid}").exists()


def test_destroy_while_a_clone_runs(factory, ctrd):
    cid = "kc-fac-destroy"
    ctrd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "120")
    try:
        assert factory.cli("destroy").returncode == 0
        assert not factory.template.exists()
        assert not any(str(factory.template) in ln for ln in Path("/proc/self/mounts").read_text().splitlines())
        out = ctrd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "alive").stdout.decode()
        assert out.strip() == "alive"
    finally:
        ctrd.ctr("task", "kill", "-s", "KILL", cid, check=False)
        time.sleep(1)
        ctrd.ctr("task", "delete", "-f", cid, check=False)
        ctrd.ctr("container", "delete", cid, check=False)
    assert_nothing_left(ctrd, cid)


def _qemus() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_the_vm_cache_hands_a_pre_booted_vm_to_the_shim(factory, ctrd):
    daemon = subprocess.Popen([sys.executable, "-m", "shim.factory.cache_server", "--config",
                               str(factory.cache_config)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.DEVNULL, stderr=open(factory.dir / "vmcache.log", "wb"))
    try:
        deadline = time.monotonic() + 90  # builds the template first (destroyed above)
        while "(ready)" not in (st := factory.cli("status", config=factory.cache_config)).stdout:
            assert daemon.poll() is None and time.monotonic() < deadline, (factory.dir / "vmcache.log").read_text()
            time.sleep(0.5)
        before = _qemus()
        cid = "kc-fac-cache"
        out = ctr_run(ctrd, cid, "sh", "-c", PROBE,
                      extra=("--runtime-config-path", str(factory.cache_config))).stdout.decode()
        assert out.split()[:2] == ["first-output", cid], out
        assert "pre-booted clone" in shim_log(ctrd, cid), shim_log(ctrd, cid)
        assert_nothing_left(ctrd, cid)
        deadline = time.monotonic() + 30
        while True:  # the VM the sandbox took is gone with it; the cache refilled another
            st = factory.cli("status", config=factory.cache_config).stdout
            if "(ready)" in st and len(before - _qemus()) == 1:
                break
            assert time.monotonic() < deadline, (st, before, _qemus())
            time.sleep(0.5)
        assert factory.cli("destroy", config=factory.cache_config).returncode == 0
        assert daemon.wait(30) == 0
        assert not factory.endpoint.exists() and not factory.template.exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_a_truncated_template_boots_cold_with_a_warning(factory, ctrd):
    assert factory.cli("init").returncode == 0
    state = factory.template / "state"
    os.truncate(state, state.stat().st_size // 2)
    cid = "kc-fac-trunc"
    out = ctr_run(ctrd, cid, "echo", "cold-but-fine").stdout.decode()
    assert out.strip() == "cold-but-fine"
    log = shim_log(ctrd, cid)
    assert "booting cold: template unusable" in log and "truncated" in log, log
    assert_nothing_left(ctrd, cid)
    assert factory.cli("destroy").returncode == 0


# -- CRI ------------------------------------------------------------------------------------------

class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = b"hello-from-the-host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_cri_pod_in_a_clone_has_working_networking(factory):
    if not all((CNI_BIN_DIR / p).exists() for p in ("bridge", "host-local", "loopback")):
        pytest.skip("CNI plugins missing")
    c = _containerd(factory, namespace=CRI_NAMESPACE)
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"kc-fac-cri-{uuid.uuid4().hex[:6]}"

    async def go() -> None:
        async with CriClient(c.address) as client:
            for _ in range(100):  # ctr image import returns before the CRI plugin sees it
                if await client.image_status(IMAGE) is not None:
                    break
                await asyncio.sleep(0.2)
            config = pod_config(name, "kc-e2e", uid=f"{name}-uid", log_directory=str(c.dir / "logs"))
            t0 = time.monotonic()
            pod = await client.run_pod_sandbox(config, runtime_handler="kata-colo")
            print(f"RunPodSandbox from a template: {time.monotonic() - t0:.2f}s")
            try:
                status = await client.pod_sandbox_status(pod, verbose=True)
                ip = status.status.network.ip
                cid = await client.create_container(pod, container_config(
                    "web", IMAGE, command=["sh", "-c", "echo in-a-clone > /index.html && exec httpd -f -p 8080 -h /"],
                    log_path="web.log"), sandbox_config=config)
                await client.start_container(cid)
                assert "clone of template" in shim_log(c, pod), shim_log(c, pod)
                deadline = time.monotonic() + 30
                while True:  # host → guest: only the guest's httpd can answer
                    try:
                        with urllib.request.urlopen(f"http://{ip}:8080/", timeout=3) as resp:
                            assert resp.read().decode().strip() == "in-a-clone"
                            break
                    except OSError:
                        assert time.monotonic() < deadline, "pod HTTP not reachable"
                        await asyncio.sleep(0.5)
                gw = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", c.cni_bridge], capture_output=True,
                                    text=True).stdout.split()[3].split("/")[0]
                req = f"GET / HTTP/1.0\\r\\nHost: {gw}\\r\\n\\r\\n"
                rc, out, err = await client.exec_sync(cid, ["sh", "-c", f"printf '{req}' | nc -w 10 {gw} "
                                                                        f"{server.server_address[1]}"], 60)
                assert rc == 0 and b"hello-from-the-host" in out, (rc, out, err)  # guest → host
                rc, out, _ = await client.exec_sync(cid, ["ip", "-o", "link", "show"], 30)
                macs = re.findall(rb"link/ether ([0-9a-f:]{17})", out)
                veth = json.loads(status.info["info"])["runtimeSpec"]["linux"]["namespaces"]
                netns = next(ns["path"] for ns in veth if ns["type"] == "network")
                pod_mac = subprocess.run(["ip", "netns", "exec", os.path.basename(netns), "cat",
                                          "/sys/class/net/eth0/address"], capture_output=True, text=True).stdout
                assert pod_mac.strip().encode() in macs, (pod_mac, macs)  # the veth's MAC, hot-plugged
            finally:
                await client.stop_pod_sandbox(pod)
                await client.remove_pod_sandbox(pod)

    try:
        asyncio.run(go())
    finally:
        server.shutdown()
        stop_containerd(c)
        shutil.rmtree(c.shim_dir, ignore_errors=True)  # type: ignore[attr-defined]
