"""Memory elasticity on real VMs (QEMU under TCG, the built guest image), through the Sandbox
handle the management socket and the node policy use.

1. Reclaim time: a 512 MiB + 512 MiB virtio-mem VM grown to 1 GiB gives 256 MiB back — by
   virtio-mem (unplug), and a 1 GiB balloon VM by the balloon (inflate); baseline: giving the
   same 256 MiB back to the guest (grow) in the same VM. Printed: seconds and reclaim ÷ grow.
2. Free page reporting: the guest writes ``KC_BENCH_FREE_MIB`` MiB (default 300) to a tmpfs, then
   deletes it; host RSS of QEMU returned ÷ guest memory freed, with reclaim_guest_freed_memory
   on (goal ≥ 0.9) and, as the baseline, off (the host keeps the pages).
3. Policy reaction time: a host memory hog below the low watermark → the node policy
   (kata-colo-resourced, ``resourced.policies.memory``) shrinks the offline VM: seconds from the
   hog's allocation to the shrink reaching the VM, and back after the hog exits; baseline: the
   policy's own sampling interval. Skipped (said so) when the policy is not installed.

Run under the VM lock: ``flock /work/.vm.lock python -m bench memory``.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from tests.integration.memory_vm import MIB, guest_sh, qemu_rss, running_sandbox, write_config

FREE_MIB = int(os.environ.get("KC_BENCH_FREE_MIB", "300"))
RECLAIM_MIB = 256


async def reclaim_times() -> None:
    with tempfile.TemporaryDirectory() as d:
        conf = write_config(Path(d), memory=512, maxmemory=1024, virtio_mem=True, resize_timeout=120)
        async with running_sandbox(conf, "kcbench-vmem") as sb:
            await sb.set_memory(1024 * MIB)
            t0 = time.monotonic()
            r = await sb.set_memory((1024 - RECLAIM_MIB) * MIB)
            reclaim = time.monotonic() - t0
            t0 = time.monotonic()
            await sb.set_memory(1024 * MIB)
            grow = time.monotonic() - t0
        print(f"virtio-mem: reclaim {RECLAIM_MIB} MiB {reclaim:.2f}s ({', '.join(r.steps)}), grow back {grow:.2f}s "
              f"(reclaim/grow {reclaim / grow:.2f})")
    with tempfile.TemporaryDirectory() as d:
        conf = write_config(Path(d), memory=1024, reclaim=True, resize_timeout=120)
        async with running_sandbox(conf, "kcbench-balloon") as sb:
            pid = sb.vmm_pid() or 0
            before = qemu_rss(pid)
            t0 = time.monotonic()
            r = await sb.set_memory((1024 - RECLAIM_MIB) * MIB)
            reclaim = time.monotonic() - t0
            after = qemu_rss(pid)
            t0 = time.monotonic()
            await sb.set_memory(1024 * MIB)
            grow = time.monotonic() - t0
        print(f"balloon:    reclaim {RECLAIM_MIB} MiB {reclaim:.2f}s ({', '.join(r.steps)}), deflate back {grow:.2f}s "
              f"(reclaim/grow {reclaim / grow:.2f}); host RSS {before // MIB} → {after // MIB} MiB")


async def rss_returned(reclaim: bool) -> float:
    """Host RSS QEMU gave back ÷ what the guest freed."""
    with tempfile.TemporaryDirectory() as d:
        conf = write_config(Path(d), memory=1024, reclaim=reclaim, resize_timeout=60)
        async with running_sandbox(conf, "kcbench-fpr") as sb:
            pid = sb.vmm_pid() or 0
            rc, out = await guest_sh(sb, f"dd if=/dev/zero of=/tmp/fill bs=1M count={FREE_MIB} 2>&1")
            assert rc == 0, out
            await asyncio.sleep(1)
            filled = qemu_rss(pid)
            await guest_sh(sb, "rm /tmp/fill")
            best = filled
            for _ in range(20):  # the guest reports after ~2 s; settle
                await asyncio.sleep(0.5)
                best = min(best, qemu_rss(pid))
            return (filled - best) / (FREE_MIB * MIB)


async def amain() -> None:
    await reclaim_times()
    on = await rss_returned(True)
    off = await rss_returned(False)
    print(f"free page reporting: host RSS returned / guest memory freed ({FREE_MIB} MiB) = {on:.2f} "
          f"(goal >= 0.9); without reporting (baseline) {off:.2f}")
    try:
        from bench import bench_memory_policy
    except ImportError:
        print("policy reaction time: skipped (resourced.policies.memory not on this branch yet)")
        return
    await bench_memory_policy.reaction()


def main() -> None:
    asyncio.run(amain())


if __name__ == "__main__":
    main()
