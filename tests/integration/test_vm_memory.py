"""Memory elasticity on a real VM (QEMU under TCG, the guest image of ``$KATA_COLO_IMAGE_DIR``),
through the Sandbox handle the management socket and the node policy use:

- virtio-mem: 512 MiB boot + 512 MiB plugged = 1 GiB → 512 MiB, the guest's MemTotal follows
  (the guest onlined the blocks itself, into ZONE_MOVABLE), and back; resources.json read inside
  a container changes with the resize;
- balloon with free page reporting: 1 GiB → 512 MiB shows in MemAvailable and back; 300 MiB the
  guest used and freed go back to the host (QEMU's RSS drops); a guest that then allocates more
  than it has is protected (deflate-on-oom + the guest's OOM killer; QEMU and the agent live on);
- bad input and faults: under the floor / over the maximum refused with the limits and nothing
  changed; a guest whose balloon driver is gone does not give memory back → MemoryTimeout with
  the size reached, the VM keeps running.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from shim.resources.memory import MemoryLimitError, MemoryTimeout
from tests.integration.memory_vm import (
    MIB,
    guest_meminfo,
    guest_sh,
    qemu_alive,
    qemu_rss,
    running_sandbox,
    write_config,
)
from tests.support.agent import read_all
from tests.support.booted_vm import IMAGE, container

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(not (IMAGE / "manifest.json").exists(), reason="guest image not built")]


async def resources_json_in_container(sandbox, cid: str) -> dict:
    """/run/kata-colo/resources.json as a container of the pod reads it (and that it is read-only)."""
    shared = sandbox.resource("sharefs").share.host_dir
    client = sandbox.require_agent().client
    spec = container(Path(shared), cid, ["sh", "-c", "cat /run/kata-colo/resources.json; "
                                                     "if touch /run/kata-colo/x 2>/dev/null; then echo WRITABLE; fi"])
    await client.create_container(cid, spec)
    await client.start_container(cid)
    out = (await read_all(client, cid)).decode()
    assert await client.wait_process(cid) == 0, out
    await client.remove_container(cid)
    assert "WRITABLE" not in out, out
    return json.loads(out)


async def test_virtio_mem_grow_shrink_and_resources_json(tmp_path: Path) -> None:
    conf = write_config(tmp_path, memory=512, maxmemory=1024, virtio_mem=True, resize_timeout=60)
    async with running_sandbox(conf, "kcvmem") as sb:
        mem = sb.resource("memory")
        assert sb.hv is not None and sb.hv.memory_mechanisms() == ("virtio-mem", "balloon")
        boot_total = (await guest_meminfo(sb))["MemTotal"]
        before = await resources_json_in_container(sb, "rj1")
        assert before["memory"]["target_bytes"] == before["memory"]["usable_bytes"] == 512 * MIB
        assert before["vcpus"]["online"] == [0, 1]

        r = await sb.set_memory(1024 * MIB)
        assert (r.actual, r.timed_out, r.steps) == (1024 * MIB, False, ["hotplug 1024 MiB"])
        grown = await guest_meminfo(sb)
        assert grown["MemTotal"] - boot_total == 512 * MIB  # every plugged block onlined by the guest
        rc, pages = await guest_sh(sb, "awk '/zone +Movable/{m=1} m && $1==\"present\"{print $2; exit}' /proc/zoneinfo")
        assert rc == 0 and int(pages) * 4096 >= 256 * MIB, pages  # auto-movable: virtio-mem can take them back
        after = await resources_json_in_container(sb, "rj2")
        assert after["memory"]["target_bytes"] == after["memory"]["usable_bytes"] == 1024 * MIB
        assert after["memory"]["total_bytes"] == grown["MemTotal"] and after != before

        r = await sb.set_memory(512 * MIB)  # 1 GiB → 512 MiB
        assert r.actual == 512 * MIB and not r.timed_out
        assert (await guest_meminfo(sb))["MemTotal"] == boot_total
        assert (await sb.hv.memory_info()).plugged == 0
        rc, out = await guest_sh(sb, "cat /run/kata-colo/resources.json")
        assert json.loads(out)["memory"]["target_bytes"] == 512 * MIB

        r = await sb.set_memory(1024 * MIB)  # growing back works
        assert r.actual == 1024 * MIB and (await guest_meminfo(sb))["MemTotal"] - boot_total == 512 * MIB

        # over the maximum / under the floor: refused with the limits, nothing changed
        with pytest.raises(MemoryLimitError, match="over the maximum") as over:
            await sb.set_memory(2048 * MIB)
        assert over.value.limits.max == 1024 * MIB
        with pytest.raises(MemoryLimitError, match="under the floor") as under:
            await sb.set_memory(64 * MIB)
        assert under.value.limits.floor > 64 * MIB
        assert mem.target == 1024 * MIB and (await sb.hv.memory_info()).usable == 1024 * MIB
        assert mem.counts == {"ok": 3, "timeout": 0, "refused": 2, "failed": 0}


async def wait_rss_below(pid: int, limit: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        rss = qemu_rss(pid)
        if rss <= limit or time.monotonic() > deadline:
            return rss
        await asyncio.sleep(0.5)


async def test_balloon_free_page_reporting_shrink_grow_and_guest_oom(tmp_path: Path) -> None:
    conf = write_config(tmp_path, memory=1024, reclaim=True, resize_timeout=60)
    async with running_sandbox(conf, "kcballoon") as sb:
        pid = sb.vmm_pid()
        assert pid and sb.hv is not None and sb.hv.memory_mechanisms() == ("balloon",)
        # free page reporting: 300 MiB used then freed by the guest go back to the host
        idle = qemu_rss(pid)
        rc, out = await guest_sh(sb, "dd if=/dev/zero of=/tmp/fill bs=1M count=300 2>&1")
        assert rc == 0, out
        filled = qemu_rss(pid)
        assert filled - idle >= 250 * MIB, (idle, filled)
        rc, out = await guest_sh(sb, "rm /tmp/fill")
        freed = await wait_rss_below(pid, filled - 240 * MIB, 20)
        assert filled - freed >= 240 * MIB, (idle, filled, freed)  # ≥ 0.8 of what the guest freed

        # 1 GiB → 512 MiB: the guest's available memory shows it; and back
        avail = (await guest_meminfo(sb))["MemAvailable"]
        r = await sb.set_memory(512 * MIB)
        assert r.actual == 512 * MIB and r.steps == ["balloon 512 MiB"]
        shrunk = (await guest_meminfo(sb))["MemAvailable"]
        assert shrunk < 512 * MIB and avail - shrunk >= 450 * MIB, (avail, shrunk)
        r = await sb.set_memory(1024 * MIB)
        assert r.actual == 1024 * MIB
        assert (await guest_meminfo(sb))["MemAvailable"] - shrunk >= 450 * MIB

        # a guest allocating more than it has: the guest deflates and OOM-kills, the host is spared
        await sb.set_memory(512 * MIB)
        # 900 MiB: under the guest's MemTotal (the kernel's overcommit heuristic lets it try), far
        # over the 512 MiB it has
        rc, out = await guest_sh(sb, "python3 -c \"b = b'x' * (900 << 20); print('allocated')\"; echo rc=$?",
                                 timeout=300)
        deflated = (await sb.hv.balloon_info()).actual_bytes > 512 * MIB + 64 * MIB  # deflate-on-oom
        rc, dmesg = await guest_sh(sb, "dmesg | grep -c 'Out of memory' || true")
        if "allocated" in out:
            assert deflated, out  # it fitted only because the balloon gave its pages back
        else:
            assert "rc=137" in out and int(dmesg.strip() or 0) >= 1, (out, dmesg)  # the guest's OOM killer
        assert qemu_alive(pid) and sb.running
        assert qemu_rss(pid) < (1024 + 600) * MIB  # never more than the VM's RAM + QEMU/TCG's own
        assert (await sb.require_agent().client.check()) is True


async def test_a_guest_that_does_not_give_memory_back_times_out_and_keeps_running(tmp_path: Path) -> None:
    conf = write_config(tmp_path, memory=1024, reclaim=True, resize_timeout=4)
    async with running_sandbox(conf, "kcstuck") as sb:
        rc, out = await guest_sh(sb, "for d in /sys/bus/virtio/drivers/virtio_balloon/virtio*; do "
                                     "echo ${d##*/} > /sys/bus/virtio/drivers/virtio_balloon/unbind; done; "
                                     "ls /sys/bus/virtio/drivers/virtio_balloon/")
        assert rc == 0, out
        t0 = time.monotonic()
        with pytest.raises(MemoryTimeout, match="only down to 1024 MiB") as err:
            await sb.set_memory(600 * MIB)
        assert 3.5 < time.monotonic() - t0 < 30
        assert err.value.actual == 1024 * MIB and err.value.target == 600 * MIB
        mem = sb.resource("memory")
        assert mem.target == 1024 * MIB and mem.counts["timeout"] == 1 and mem.last.timed_out
        assert sb.running and (await sb.require_agent().client.check()) is True
        view = await mem.view()
        assert view["last_error"] and view["target_bytes"] == view["actual_bytes"] == 1024 * MIB
