"""The VM is accounted where Kubernetes looks (kata's sandbox_cgroup_only), end to end with the
installed shim and QEMU (TCG):

* ``ctr run --memory-limit`` (cgroupsPath ``/default/<id>``): the shim and every QEMU thread are in
  that group in every hierarchy, vCPUs in ``/default/<id>/vcpu-low``, the host memory limit is
  max(pod limit, guest RAM) + overhead; nothing is left after ``ctr rm``;
* ``ctr run --cgroup ""`` (no cgroupsPath): the VM lives under the offline root ``kata-colo``;
* a shim killed with SIGKILL: containerd's cleanup (``shim delete``) removes the groups;
* CRI with ``cgroup_parent = kubepods/besteffort/pod<uid>`` (made first, as kubelet does):
  PodSandboxStats and ListContainerStats return real CPU and memory numbers; stopping the pod
  removes the sandbox group and keeps kubelet's pod group.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cri.client import CriClient, container_config, pod_config
from tests.support.containerd import IMAGE, RUNTIME, shim_processes

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]
CG = Path("/sys/fs/cgroup")
HIERARCHIES = ("cpu", "cpuacct", "cpuset", "memory", "pids")
MIB = 1 << 20


def groups_of(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    out = {}
    for line in Path(path).read_text().splitlines():
        _h, ctrls, p = line.split(":", 2)
        for c in ctrls.split(","):
            out[c] = p
    return out


def qemu_pid(sandbox_id: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*/sbs/{sandbox_id}/"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 1, pids
    return pids[0]


def shim_pid(sandbox_id: str) -> int:
    lines = shim_processes(f"-id {sandbox_id} ")
    assert len(lines) == 1, lines
    return int(lines[0].split()[0])


def wait_gone(paths: list[Path], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {[str(p) for p in paths if p.exists()]}")
        time.sleep(0.3)


def run_detached(c, name: str, *flags: str) -> None:
    c.ctr("run", "-d", "--runtime", RUNTIME, *flags,
          "--annotation", "io.katacontainers.config.hypervisor.default_vcpus=2",
          "--annotation", "io.katacontainers.colo.vcpu-priorities=low:2", IMAGE, name, "sleep", "600")


def remove(c, name: str) -> None:
    c.ctr("task", "kill", "-s", "KILL", name, check=False)
    deadline = time.monotonic() + 30
    while c.ctr("task", "delete", name, check=False).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    c.ctr("container", "rm", name, check=False)


def test_ctr_memory_limit_accounts_the_vm_in_its_cgroups_path(kata_containerd):
    c = kata_containerd
    name = f"kc-podcg-{uuid.uuid4().hex[:6]}"
    group = f"/default/{name}"
    run_detached(c, name, "--memory-limit", str(256 * MIB))
    try:
        shim, qemu = shim_pid(name), qemu_pid(name)
        for pid in (shim, qemu):
            g = groups_of(pid)
            for h in ("memory", "pids"):
                assert g[h] == group, (pid, h, g)
        tids = [int(t) for t in os.listdir(f"/proc/{qemu}/task")]
        where = {groups_of(qemu, t)["cpu"] for t in tids}
        assert where == {f"{group}/vcpu-low", f"{group}/vmm"}, where
        assert all(groups_of(qemu, t)["memory"] == group for t in tids)
        limit = int((CG / "memory" / group.strip("/") / "memory.limit_in_bytes").read_text())
        guest = 512  # the packaged/installed default_memory
        assert limit == max(256, guest) * MIB + 256 * MIB, limit
        usage = int((CG / "memory" / group.strip("/") / "memory.usage_in_bytes").read_text())
        assert usage > 100 * MIB  # guest RAM + QEMU + shim are charged here
    finally:
        remove(c, name)
    wait_gone([CG / h / "default" / name for h in HIERARCHIES])


def test_ctr_without_cgroups_path_uses_the_offline_root(kata_containerd):
    c = kata_containerd
    name = f"kc-podcg-{uuid.uuid4().hex[:6]}"
    run_detached(c, name, "--cgroup", "")
    try:
        assert groups_of(qemu_pid(name))["memory"] == f"/kata-colo/{name}"
        assert groups_of(shim_pid(name))["cpu"] == f"/kata-colo/{name}"
    finally:
        remove(c, name)
    wait_gone([CG / h / "kata-colo" / name for h in HIERARCHIES])


def test_killed_shim_leaves_no_cgroup(kata_containerd):
    c = kata_containerd
    name = f"kc-podcg-{uuid.uuid4().hex[:6]}"
    run_detached(c, name)
    qemu = qemu_pid(name)
    try:
        os.kill(shim_pid(name), signal.SIGKILL)
        # containerd notices the dead shim and runs `shim delete`: recovery from the journal
        wait_gone([Path(f"/proc/{qemu}")] + [CG / h / "default" / name for h in HIERARCHIES], timeout=60)
    finally:
        remove(c, name)


def make_pod_cgroup(rel: str) -> list[Path]:
    made = []
    for h in HIERARCHIES:
        parts = rel.split("/")
        for i in range(len(parts)):
            d = CG / h / "/".join(parts[: i + 1])
            if not d.exists():
                d.mkdir()
                made.append(d)
                if h == "cpuset":
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        (d / knob).write_text((d.parent / knob).read_text())
    return made


def stats_messages(tmp: Path):
    """Compile tests/e2e/cri_stats.proto (grpc_tools, a test dependency) and import it."""
    import importlib.util

    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    rc = protoc.main(["protoc", f"-I{here}", f"--python_out={tmp}", str(here / "cri_stats.proto")])
    assert rc == 0
    spec = importlib.util.spec_from_file_location("cri_stats_pb2", tmp / "cri_stats_pb2.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def _stats(address: str, pb, pod_id: str):
    """PodSandboxStats and ListContainerStats by their CRI method paths."""
    import grpc.aio

    from cri.client import target

    async with grpc.aio.insecure_channel(target(address)) as ch:
        pod_rpc = ch.unary_unary("/runtime.v1.RuntimeService/PodSandboxStats",
                                 request_serializer=pb.PodSandboxStatsRequest.SerializeToString,
                                 response_deserializer=pb.PodSandboxStatsResponse.FromString)
        list_rpc = ch.unary_unary("/runtime.v1.RuntimeService/ListContainerStats",
                                  request_serializer=pb.ListContainerStatsRequest.SerializeToString,
                                  response_deserializer=pb.ListContainerStatsResponse.FromString)
        pod = (await pod_rpc(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=30)).stats
        ctrs = (await list_rpc(pb.ListContainerStatsRequest(
            filter=pb.ContainerStatsFilter(pod_sandbox_id=pod_id)), timeout=30)).stats
        return pod, list(ctrs)


def test_cri_pod_and_container_stats_are_real(cri_containerd, tmp_path):
    c = cri_containerd
    pb = stats_messages(tmp_path)
    uid = uuid.uuid4().hex
    parent = f"kubepods/besteffort/pod{uid}"
    made = make_pod_cgroup(parent)

    async def go() -> None:
        async with CriClient(c.address) as client:
            config = pod_config(f"kc-podcg-{uid[:6]}", "kc-e2e", uid=uid, cgroup_parent=f"/{parent}",
                                log_directory=str(c.dir / "pod-logs" / uid[:6]))
            pod_id = await client.run_pod_sandbox(config, runtime_handler="kata-colo")
            try:
                sandbox_group = f"{parent}/{pod_id}"
                assert (CG / "memory" / sandbox_group / "cgroup.procs").read_text().split()
                cid = await client.create_container(pod_id, container_config(
                    "spin", IMAGE, command=["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 600"],
                    log_path="spin/0.log"), sandbox_config=config)
                await client.start_container(cid)
                await asyncio.sleep(3)
                pod, ctrs = await _stats(c.address, pb, pod_id)
                assert pod.attributes.id == pod_id
                assert pod.linux.cpu.usage_core_nano_seconds.value > 0
                assert pod.linux.memory.working_set_bytes.value > 100 * MIB  # the whole VM
                assert [s.attributes.id for s in ctrs] == [cid]
                assert ctrs[0].cpu.usage_core_nano_seconds.value > 0
                assert ctrs[0].memory.working_set_bytes.value > 0
            finally:
                await client.stop_pod_sandbox(pod_id)
                await client.remove_pod_sandbox(pod_id)
            wait_gone([CG / h / sandbox_group for h in HIERARCHIES])
            assert all((CG / h / parent).is_dir() for h in HIERARCHIES)  # kubelet's group stays

    try:
        asyncio.run(go())
    finally:
        for d in sorted(made, key=lambda p: -len(p.parts)):
            d.rmdir()
