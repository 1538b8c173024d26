"""The sandbox's view of the guest agent: plain values in, kata protobufs on the wire.

Wraps :class:`agent_api.client.rpc.AgentClient` (which owns transports and the per-RPC timeout
table); every conversion goes through :mod:`agent_api.client.convert`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from agent_api.client import convert
from agent_api.client.rpc import AgentClient
from common.errors import AgentError, KataColoError
from hypervisor.base import AgentAddress
from proto.kata_colo import colo_pb2
from shim.backend import Stats


def _guest_memory(msg: colo_pb2.GuestMemory) -> dict[str, int]:
    return {f.name: int(getattr(msg, f.name)) for f in colo_pb2.GuestMemory.DESCRIPTOR.fields}


class GuestAgent:
    def __init__(self, address: AgentAddress) -> None:
        self.client = AgentClient(convert.agent_url(address))

    async def connect(self, timeout: float, vm_gone: asyncio.Event) -> None:
        """Wait for the agent to answer Health.Check, giving up early if the VM dies."""
        ready = asyncio.ensure_future(self.client.wait_ready(timeout))
        gone = asyncio.ensure_future(vm_gone.wait())
        try:
            done, _ = await asyncio.wait({ready, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if ready not in done:
            ready.cancel()
            raise AgentError("the VM exited before its agent answered")
        try:
            ready.result()
        except KataColoError as exc:
            raise AgentError(f"guest agent not ready after {timeout:.0f}s: {exc}") from None

    async def close(self) -> None:
        await self.client.close()

    async def create_sandbox(self, sandbox_id: str, *, hostname: str, storages: list[Any]) -> None:
        """CreateSandbox with the storages the sandbox's resources contribute (the 9p share)."""
        await self.client.create_sandbox(sandbox_id=sandbox_id, hostname=hostname, storages=storages)

    async def reset_identity(self, seed: bytes, clock: Callable[[], float] = time.time) -> None:
        """A restored template clone becomes its own machine (kata's factory GetVM): reseed the
        guest RNG with ``seed``, then set its clock to ``clock()`` (read just before sending)."""
        await self.client.reseed_random_dev(seed)
        now = clock()
        sec = int(now)
        await self.client.set_guest_date_time(sec, int((now - sec) * 1_000_000))

    async def configure_network(self, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]],
                                neighbors: list[dict[str, Any]]) -> None:
        """Give the guest the pod's network, as kata does: UpdateInterface per interface, then
        UpdateRoutes once with all routes (replacing the guest's), then AddARPNeighbors. The
        dicts are kata-shaped (shim.resources.network.endpoint); all are converted (and a bad
        one rejected with InvalidArgument) before anything is sent."""
        ifaces = [convert.interface_from_dict(d) for d in interfaces]
        route_pbs = [convert.route_from_dict(d) for d in routes]
        neigh_pbs = [convert.neighbor_from_dict(d) for d in neighbors]
        for iface in ifaces:
            await self.client.update_interface(iface)
        await self.client.update_routes(route_pbs)
        if neigh_pbs:
            await self.client.add_arp_neighbors(neigh_pbs)

    async def set_vcpu_priorities(self, mapping: dict[str, list[int]]) -> None:
        await self.client.set_vcpu_priorities(mapping)

    async def set_memory(self, *, usable: int, target: int, maximum: int, floor: int,
                         mechanisms: tuple[str, ...]) -> dict[str, int]:
        """Tell the guest its memory (it rewrites resources.json); the guest's memory now (as
        :meth:`guest_memory`)."""
        state = colo_pb2.MemoryState(usable_bytes=usable, target_bytes=target, max_bytes=maximum,
                                     floor_bytes=floor, mechanisms=list(mechanisms))
        return _guest_memory(await self.client.set_memory(state))

    async def guest_memory(self) -> dict[str, int]:
        """The guest's /proc/meminfo: ``total_bytes``, ``free_bytes``, ``available_bytes``,
        ``cached_bytes``, and ``block_size_bytes``, ``offline_blocks`` (as the guest says: the
        caller bounds them)."""
        return _guest_memory(await self.client.get_guest_memory())

    async def create_container(self, container_id: str, spec: dict[str, Any], *,
                               storages: list[dict[str, Any]] | None = None,
                               devices: list[dict[str, Any]] | None = None) -> None:
        """CreateContainer; ``storages``/``devices`` are kata-shaped dicts (the container's block
        rootfs, data disks, passed-through devices: shim.resources.blockdev.plan)."""
        await self.client.create_container(
            container_id, convert.spec_from_oci(spec),
            storages=[convert.storage_from_dict(d) for d in storages or []],
            devices=[convert.device_from_dict(d) for d in devices or []])

    async def start_container(self, container_id: str) -> None:
        await self.client.start_container(container_id)

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        await self.client.exec_process(container_id, exec_id, convert.process_from_oci(process))

    async def signal_process(self, container_id: str, exec_id: str, signal: int, all_processes: bool = False) -> None:
        await self.client.signal_process(container_id, exec_id, signal)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        return await self.client.wait_process(container_id, exec_id)

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self.client.read_stdout(container_id, exec_id, size)

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self.client.read_stderr(container_id, exec_id, size)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.client.write_stdin(container_id, exec_id, bytes(view))
            view = view[n or len(view):]

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self.client.close_stdin(container_id, exec_id)

    async def resize_tty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        await self.client.tty_win_resize(container_id, exec_id, rows=height, columns=width)

    async def remove_container(self, container_id: str) -> None:
        await self.client.remove_container(container_id)

    async def pause_container(self, container_id: str) -> None:
        await self.client.pause_container(container_id)

    async def resume_container(self, container_id: str) -> None:
        await self.client.resume_container(container_id)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        await self.client.update_container(container_id, convert.resources_from_oci(resources))

    async def stats(self, container_id: str) -> Stats:
        return convert.stats_from_pb(await self.client.stats_container(container_id))

    async def next_oom(self) -> str:
        return await self.client.get_oom_event()
