"""Memory elasticity on real VMs (QEMU under TCG, the built guest image), through the Sandbox
handle the management socket and the node policy use.

1. Reclaim time: a 512 MiB + 512 MiB virtio-mem VM grown to 1 GiB gives 256 MiB back — by
   virtio-mem (unplug), and a 1 GiB balloon VM by the balloon (inflate); baseline: giving the
   same 256 MiB back to the guest (grow) in the same VM. Printed: seconds and reclaim ÷ grow.
2. Free page reporting: the guest writes ``KC_BENCH_FREE_MIB`` MiB (default 300) to a tmpfs, then
   deletes it; host RSS of QEMU returned ÷ guest memory freed, with reclaim_guest_freed_memory
   on (goal ≥ 0.9) and, as the baseline, off (the host keeps the pages).
3. Policy reaction time: kata-colo-resourced (``resourced.policies.memory``) with a 1 GiB offline
   VM run by containerd and watermarks relative to the host's MemAvailable now; a 2 GiB host
   memory hog (its own memory cgroup) takes the node under the low watermark: seconds from
   MemAvailable crossing the watermark to the VM having shrunk by one 256 MiB step, and from the
   hog's exit to the VM back at 1 GiB, each with the moment the policy's resize started (its
   detection: the node sampled every 200 ms, the shims every 250 ms). Baseline: the same step by
   a direct PUT /colo/memory in the same VM (what the policy issues; after a warm-up pair).

Run under the VM lock: ``flock /work/.vm.lock python -m bench memory``.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from tests.integration.memory_vm import MIB, guest_sh, qemu_rss, running_sandbox, write_config
from tests.support import memory_policy as mp

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
    await asyncio.to_thread(policy_reaction)


def policy_reaction() -> None:
    """Section 3 (blocking: containerd, ctr, the daemon as a process)."""
    hog_size = 2 << 30
    step = 256 * MIB
    with mp.offline_vm(1024) as vm, tempfile.TemporaryDirectory() as d:
        vm.resize(1024 * MIB - step)  # warm-up: the first inflation of a fresh VM is slower
        vm.resize(1024 * MIB)
        direct_shrink = vm.resize(1024 * MIB - step)
        direct_grow = vm.resize(1024 * MIB)
        total, available = mp.meminfo()
        if available < hog_size + (2 << 30):
            print(f"policy reaction time: skipped (only {available // MIB} MiB available)")
            return
        low, high = mp.watermarks(total, available, hog_size)
        policy = Path(d) / "resourced.toml"
        policy.write_text(mp.policy_text(vm.root, low, high, min_mib=1024 - step // MIB))
        hog = mp.Hog(hog_size)
        daemon = mp.Resourced(policy, vm.conf, Path(d) / "resourced.log")
        try:
            time.sleep(2)
            assert vm.memory() == (1024 * MIB, 1024 * MIB), daemon.text()
            hog.start(wait=False)
            crossed = mp.wait_for(lambda: mp.meminfo()[1] < total * low / 100, 10, 0.005)
            assert crossed is not None, "the hog did not take the node under the low watermark"
            t0 = time.monotonic()
            mp.wait_for(lambda: vm.resizing() or vm.memory()[0] < 1024 * MIB, 30, 0.02)
            shrink_start = time.monotonic() - t0
            assert mp.wait_for(lambda: vm.memory()[1] <= 1024 * MIB - step, 30, 0.02) is not None, daemon.text()
            shrink = time.monotonic() - t0
            hog.wait_ready()
            time.sleep(1.5)  # past the policy's 1 s cooldown: the grow is not held by it
            t0 = time.monotonic()
            hog.stop()
            mp.wait_for(lambda: vm.resizing() or vm.memory()[0] > 1024 * MIB - step, 30, 0.02)
            grow_start = time.monotonic() - t0
            assert mp.wait_for(lambda: vm.memory() == (1024 * MIB, 1024 * MIB), 30, 0.02) is not None, daemon.text()
            grow = time.monotonic() - t0
            time.sleep(0.5)  # the daemon logs the resize once the shim answers
        finally:
            hog.stop()
            rc = daemon.stop()
        assert rc == 0, daemon.text()
        decisions = [line.split(" INFO ", 1)[-1] for line in daemon.text().splitlines() if "memory: " in line]
    print(f"policy reaction, pressure on (MemAvailable under the low watermark): resize started after "
          f"{shrink_start:.2f}s, {step // MIB} MiB given back after {shrink:.2f}s; baseline: the same step by a "
          f"direct PUT {direct_shrink:.2f}s (policy total / direct {shrink / direct_shrink:.2f})")
    print(f"policy reaction, pressure off (the hog killed): resize started after {grow_start:.2f}s, back to "
          f"1024 MiB after {grow:.2f}s; baseline: direct PUT {direct_grow:.2f}s (policy total / direct "
          f"{grow / direct_grow:.2f})")
    for line in decisions:
        print(f"  resourced: {line}")


def main() -> None:
    asyncio.run(amain())


if __name__ == "__main__":
    main()
