"""`ctr run` → first output (cold, a new VM each time) against the floor: the same kernel and
image booted by the QEMU driver alone until the guest agent answers Health.Check."""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("KC_BENCH_ROUNDS", "3"))


async def _floor_once(bare: bool = False) -> float:
    """qemu start → agent ready; with ``bare`` the same boot to the end of init (init powers
    the guest off instead of starting the agent: kernel + initramfs + modules only)."""
    from agent_api.client.convert import agent_url
    from agent_api.client.rpc import AgentClient
    from hypervisor.base import SharedDir
    from hypervisor.qemu.driver import QemuHypervisor
    from shim import config
    from shim.sandbox.vmconfig import vm_config

    d = Path(tempfile.mkdtemp(prefix="kc-floor-", dir="/run"))
    try:
        (d / "shared").mkdir()
        vmcfg = vm_config(config.load(), d.name, d / "vm", shared_dirs=(SharedDir("kataShared", str(d / "shared")),))
        if bare:
            import dataclasses

            vmcfg = dataclasses.replace(vmcfg, kernel_params=vmcfg.kernel_params
                                        + " kata_colo.init=poweroff kata_colo.selftest=0")
        hv = QemuHypervisor()
        t0 = time.monotonic()
        await hv.prepare(vmcfg)
        await hv.start(timeout=120)
        if bare:
            await asyncio.wait_for(hv.wait(), 120)
            elapsed = time.monotonic() - t0
            await hv.cleanup()
            return elapsed
        client = AgentClient(agent_url(hv.agent_address()))
        await client.wait_ready(120)
        elapsed = time.monotonic() - t0
        await client.close()
        await hv.stop()
        await hv.cleanup()
        return elapsed
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _ctr_run_once(address: str, name: str) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen(["ctr", "-a", address, "run", "--rm", "--runtime", "io.containerd.kata-colo.v2",
                             "docker.io/library/busybox:kata-colo", name, "echo", "first-output"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - t0
    proc.wait(timeout=120)
    if b"first-output" not in line:
        raise RuntimeError(f"unexpected output {line!r}: {proc.stderr.read() if proc.stderr else ''}")
    return elapsed


def main() -> None:
    sys.path.insert(0, str(REPO))
    from tests.support.containerd import product_shim_dir, start_containerd, stop_containerd

    bares = [asyncio.run(_floor_once(bare=True)) for _ in range(ROUNDS)]
    floors = [asyncio.run(_floor_once()) for _ in range(ROUNDS)]
    shim_dir = product_shim_dir()
    c = start_containerd([shim_dir])
    try:
        c.import_busybox()
        runs = [_ctr_run_once(c.address, f"kc-bench-{i}") for i in range(ROUNDS)]
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)
    b, f, r = statistics.median(bares), statistics.median(floors), statistics.median(runs)
    print(f"bare boot (qemu start → init done → poweroff):        median {b:.2f}s  {[f'{x:.2f}' for x in bares]}")
    print(f"floor  (qemu start → agent ready, same kernel+image): median {f:.2f}s  {[f'{x:.2f}' for x in floors]}")
    print(f"kata-colo (ctr run --rm → first output, cold):        median {r:.2f}s  {[f'{x:.2f}' for x in runs]}")
    print(f"ratio agent-ready / bare boot: {f / b:.2f}x (Python + protobuf + agent start under TCG)")
    print(f"ratio ctr-run / floor: {r / f:.2f}x  (overhead {r - f:.2f}s: containerd, shim start, "
          f"sandbox + container create in the guest)")


if __name__ == "__main__":
    main()
