"""Memory elasticity through containerd: containerd 1.6's CRI plugin with handler ``kata-colo``
(the installed shim, a QEMU/TCG VM per pod), a 512 MiB VM with 512 MiB of virtio-mem headroom.

CRI UpdateContainerResources with a 256 MiB memory limit (containerd → Task Update) grows the VM
to default_memory + the limit (768 MiB, kata's updateResources) before the guest applies the
limit to the container's cgroup (Debian's ctr 1.6 has no ``tasks update``: CRI is the way here);
``kata-colo-ctl mem <pod> 1G`` resizes live and answers with the size reached, the container then
reads the new size in /run/kata-colo/resources.json; a target under the floor is refused with the
limits; ``kata-colo-ctl status`` and ``metrics`` show target and actual.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cri.client import CriClient, container_config, pod_config
from proto.cri.runtime.v1 import api_pb2 as api
from shim import config as cfgmod
from tests.support import image
from tests.support.containerd import IMAGE, Containerd, assert_nothing_left

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]
REPO = Path(__file__).resolve().parents[2]
HANDLER = "kata-colo"
PAUSE_IMAGE = "localhost/kata-colo/pause:3.6"
MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def memory_config():
    """Set before the module's containerd starts: containerd passes its environment to the shim."""
    kernel, initrd = image.kernel_and_initrd()
    d = tempfile.mkdtemp(prefix="kc-mem-e2e-")
    path = Path(d) / "configuration.toml"
    path.write_text(f'[hypervisor.qemu]\nkernel = "{kernel}"\ninitrd = "{initrd}"\ndefault_memory = 512\n'
                    f'default_maxmemory = 1024\nenable_virtio_mem = true\nreclaim_guest_freed_memory = true\n'
                    f'[agent.kata]\ndebug_console_enabled = true\n[colo.memory]\nresize_timeout = 60\n')
    old = os.environ.get(cfgmod.ENV_PATH)
    os.environ[cfgmod.ENV_PATH] = str(path)
    yield str(path)
    if old is None:
        os.environ.pop(cfgmod.ENV_PATH, None)
    else:
        os.environ[cfgmod.ENV_PATH] = old
    shutil.rmtree(d, ignore_errors=True)


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctl", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@dataclass
class Pod:
    c: Containerd
    id: str
    container: str

    def cri(self, fn: Callable[[CriClient], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            async with CriClient(self.c.address) as client:
                return await fn(client)
        return asyncio.run(go())

    def exec(self, *cmd: str) -> str:
        rc, out, err = self.cri(lambda client: client.exec_sync(self.container, list(cmd), 60))
        assert rc == 0, (rc, out, err)
        return out.decode()


@pytest.fixture(scope="module")
def pod(cri_containerd: Containerd):
    c = cri_containerd
    name = f"kc-mem-{uuid.uuid4().hex[:6]}"
    config = pod_config(name, "kc-e2e", uid=f"{name}-uid", log_directory=str(c.dir / "pod-logs" / name))

    async def start(client: CriClient) -> Pod:
        deadline = time.monotonic() + 20
        while await client.image_status(IMAGE) is None or await client.image_status(PAUSE_IMAGE) is None:
            assert time.monotonic() < deadline, "CRI does not see the images"
            await asyncio.sleep(0.2)
        pod_id = await client.run_pod_sandbox(config, runtime_handler=HANDLER)
        cid = await client.create_container(pod_id, container_config("job", IMAGE, command=["sleep", "600"],
                                                                     log_path="job/0.log"), sandbox_config=config)
        await client.start_container(cid)
        return Pod(c, pod_id, cid)

    p = Pod(c, "", "")
    try:
        p = p.cri(start)
        yield p
    finally:
        async def remove(client: CriClient) -> None:
            for sb in await client.list_pod_sandbox():
                if sb.metadata.name == name:
                    await client.stop_pod_sandbox(sb.id)
                    await client.remove_pod_sandbox(sb.id)
        p.cri(remove)
        if p.id:
            assert_nothing_left(c, p.id)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def update_container_resources(client: CriClient, container_id: str, memory_limit: int) -> None:
    """CRI UpdateContainerResources (upstream field numbers: container_id = 1, linux = 2). The
    repository's CRI proto is the subset cri/ drives and lacks this RPC: encoded here."""
    linux = api.LinuxContainerResources(memory_limit_in_bytes=memory_limit).SerializeToString()
    cid = container_id.encode()
    body = b"\x0a" + _varint(len(cid)) + cid + b"\x12" + _varint(len(linux)) + linux
    client.connect()
    assert client._channel is not None
    call = client._channel.unary_unary("/runtime.v1.RuntimeService/UpdateContainerResources",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
    await call(body, timeout=120)


def memory(pod: Pod) -> dict:
    r = ctl("mem", pod.id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cri_update_grows_the_vm_then_kata_colo_ctl_resizes_it(pod):
    assert memory(pod)["target_bytes"] == 512 * MIB
    pod.cri(lambda client: update_container_resources(client, pod.container, 256 * MIB))
    mem = memory(pod)
    assert mem["target_bytes"] == mem["actual_bytes"] == 768 * MIB and mem["plugged_bytes"] == 256 * MIB
    group = pod.exec("cat", "/proc/self/cgroup").strip().split("::", 1)[1]  # the guest's cgroup v2 path
    limit = ctl("exec", pod.id, "--", "cat", f"/sys/fs/cgroup{group}/memory.max")
    assert limit.returncode == 0 and limit.stdout.strip() == str(256 * MIB), (group, limit)

    r = ctl("mem", pod.id, "1G")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("memory: 1024 MiB reached (target 1024 MiB"), r.stdout
    doc = json.loads(pod.exec("cat", "/run/kata-colo/resources.json"))
    assert doc["memory"]["target_bytes"] == doc["memory"]["usable_bytes"] == 1024 * MIB
    guest_total = int(ctl("exec", pod.id, "--", "sh", "-c", "grep MemTotal /proc/meminfo").stdout.split()[1]) * 1024
    assert guest_total == doc["memory"]["total_bytes"]

    r = ctl("mem", pod.id, "64M")
    assert r.returncode == 1 and "under the floor" in r.stderr and "HTTP 400" in r.stderr, r.stderr
    r = ctl("mem", pod.id, "600M")  # live shrink back under what Update asked: the operator's call
    assert r.returncode == 0, r.stderr
    text = ctl("status", pod.id).stdout
    assert "Memory:     600 MiB (target 600 MiB" in text, text
    metrics = ctl("metrics", pod.id).stdout
    assert f'kata_colo_memory_bytes{{item="target"}} {600 * MIB}' in metrics
    assert 'kata_colo_memory_resizes_total{result="ok"} 3' in metrics
