"""Issue-3 acceptance: the built guest image booted by the QEMU driver (TCG), the agent reached
over virtio-serial with AgentClient, containers from a local busybox rootfs on the 9p share:
stdout, exec, signals, exit codes (incl. non-zero), a tty with resize, vCPU thread ids; then
destroy, and no qemu process, socket or temp dir remains."""
from __future__ import annotations

import json
import os
import signal

import pytest

from agent_api.client.rpc import AgentClient
from tests.support.agent import exec_process, read_all
from tests.support.booted_vm import IMAGE, booted_vm, container

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(not (IMAGE / "manifest.json").exists(), reason="guest image not built")]


async def test_vm_agent_containers_exec_signals_tty_and_teardown():
    async with booted_vm(2, "kcvm") as vm:
        state, shared, hv, qemu_pid = vm.state, vm.shared, vm.hv, vm.qemu_pid
        client: AgentClient = vm.guest.client

        # vCPU threads: one per vCPU, each a thread of the qemu process
        threads = await hv.vcpu_threads()
        assert sorted(threads) == [0, 1]
        assert len(set(threads.values())) == 2
        for tid in threads.values():
            assert os.path.isdir(f"/proc/{qemu_pid}/task/{tid}")

        # uname -r in a container reads the guest kernel
        await client.create_container("c1", container(shared, "c1", ["uname", "-r"]))
        await client.start_container("c1")
        kernel = (await read_all(client, "c1")).decode().strip()
        assert kernel == json.loads((IMAGE / "manifest.json").read_text())["kernel"]
        assert await client.wait_process("c1") == 0
        await client.remove_container("c1")

        # a long-running container: exec with non-zero exit, exec killed by a signal, tty + resize
        await client.create_container("c2", container(shared, "c2", ["sleep", "600"]))
        await client.start_container("c2")
        await client.exec_process("c2", "e1", exec_process(["sh", "-c", "echo out; exit 3"]))
        assert (await read_all(client, "c2", "e1")).strip() == b"out"
        assert await client.wait_process("c2", "e1") == 3
        await client.exec_process("c2", "e2", exec_process(["sleep", "300"]))
        await client.signal_process("c2", "e2", signal.SIGKILL)
        assert await client.wait_process("c2", "e2") == 128 + signal.SIGKILL
        await client.exec_process("c2", "t1", exec_process(["sh", "-c", "read l; tty; stty size"], terminal=True))
        await client.tty_win_resize("c2", "t1", 40, 100)
        await client.write_stdin("c2", "t1", b"go\n")
        out = await read_all(client, "c2", "t1")
        assert b"/dev/pts/" in out and b"40 100" in out, out
        assert await client.wait_process("c2", "t1") == 0
        await client.signal_process("c2", "", signal.SIGKILL)
        assert await client.wait_process("c2") == 128 + signal.SIGKILL
        await client.remove_container("c2")
        await client.destroy_sandbox()
    assert not os.path.exists(f"/proc/{qemu_pid}")
    assert not state.exists()
