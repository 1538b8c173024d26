"""The sandbox's view of the guest agent: plain values in, kata protobufs on the wire.

Wraps :class:`agent_api.client.AgentClient` (which owns transports and the per-RPC timeout
table). OCI JSON (as containerd writes it) becomes kata's protobuf ``grpc.Spec`` / ``grpc.Process`` /
``grpc.LinuxResources`` through :mod:`agent_api.ocispec`; kata's StatsContainerResponse becomes
the shim's :class:`Stats`.
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from agent_api.client import AgentClient
from agent_api.ocispec import process_from_oci, resources_from_oci, spec_from_oci
from hypervisor.base import AgentAddress
from proto.kata import agent_pb2, types_pb2
from shim.backend import Stats
from shim.errors import AgentError, InvalidArgument, KataColoError
from shim.rootfs import GUEST_SHARED_DIR

NINEP_OPTIONS = ("trans=virtio", "version=9p2000.L", "cache=mmap", "msize=512000")
M = TypeVar("M", bound=Message)


def stats_from_pb(resp: agent_pb2.StatsContainerResponse) -> Stats:
    cg = resp.cgroup_stats
    cpu, mem, pids = cg.cpu_stats.cpu_usage, cg.memory_stats, cg.pids_stats
    extra = dict(mem.stats)
    return Stats(
        cpu_usage_ns=cpu.total_usage, cpu_user_ns=cpu.usage_in_usermode, cpu_kernel_ns=cpu.usage_in_kernelmode,
        memory_usage=mem.usage.usage, memory_limit=mem.usage.limit, memory_rss=extra.get("anon", extra.get("rss", 0)),
        memory_cache=mem.cache or extra.get("file", 0),
        memory_inactive_file=extra.get("inactive_file", extra.get("total_inactive_file", 0)),
        pg_fault=extra.get("pgfault", 0), pg_maj_fault=extra.get("pgmajfault", 0),
        pids_current=pids.current, pids_limit=pids.limit)


def _from_dict(value: Mapping[str, Any], message: M, what: str) -> M:
    try:
        return json_format.ParseDict(dict(value), message)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"bad {what} {value!r}: {exc}") from None


def interface_from_dict(d: Mapping[str, Any]) -> types_pb2.Interface:
    """A kata-shaped ``Interface`` dict (VethEndpoint.to_agent_interface) → protobuf."""
    return _from_dict(d, types_pb2.Interface(), "interface")


def route_from_dict(d: Mapping[str, Any]) -> types_pb2.Route:
    """A kata-shaped ``Route`` dict (VethEndpoint.to_agent_routes) → protobuf."""
    return _from_dict(d, types_pb2.Route(), "route")


def neighbor_from_dict(d: Mapping[str, Any]) -> types_pb2.ARPNeighbor:
    """A kata-shaped ``ARPNeighbor`` dict (VethEndpoint.to_agent_neighbors) → protobuf."""
    return _from_dict(d, types_pb2.ARPNeighbor(), "ARP neighbor")


def agent_url(addr: AgentAddress) -> str:
    if addr.transport == "virtio-serial":
        return f"unix://{addr.path}"
    if addr.transport == "vsock":
        return f"vsock://{addr.cid}:{addr.port}"
    return f"hvsock://{addr.path}:{addr.port}"


class GuestAgent:
    def __init__(self, address: AgentAddress) -> None:
        self.client = AgentClient(agent_url(address))

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

    async def create_sandbox(self, sandbox_id: str, *, hostname: str, share_tag: str) -> None:
        storage = agent_pb2.Storage(driver="9p", source=share_tag, fstype="9p", options=list(NINEP_OPTIONS),
                                    mount_point=GUEST_SHARED_DIR)
        await self.client.create_sandbox(sandbox_id=sandbox_id, hostname=hostname, storages=[storage])

    async def configure_network(self, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]],
                                neighbors: list[dict[str, Any]]) -> None:
        """Give the guest the pod's network, as kata does: UpdateInterface per interface, then
        UpdateRoutes once with all routes (replacing the guest's), then AddARPNeighbors. The
        dicts are kata-shaped (shim.resources.network.endpoint); all are converted (and a bad
        one rejected with InvalidArgument) before anything is sent."""
        ifaces = [interface_from_dict(d) for d in interfaces]
        route_pbs = [route_from_dict(d) for d in routes]
        neigh_pbs = [neighbor_from_dict(d) for d in neighbors]
        for iface in ifaces:
            await self.client.update_interface(iface)
        await self.client.update_routes(route_pbs)
        if neigh_pbs:
            await self.client.add_arp_neighbors(neigh_pbs)

    async def set_vcpu_priorities(self, mapping: dict[str, list[int]]) -> None:
        await self.client.set_vcpu_priorities(mapping)

    async def create_container(self, container_id: str, spec: dict[str, Any]) -> None:
        await self.client.create_container(container_id, spec_from_oci(spec))

    async def start_container(self, container_id: str) -> None:
        await self.client.start_container(container_id)

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        await self.client.exec_process(container_id, exec_id, process_from_oci(process))

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
        await self.client.update_container(container_id, resources_from_oci(resources))

    async def stats(self, container_id: str) -> Stats:
        return stats_from_pb(await self.client.stats_container(container_id))

    async def next_oom(self) -> str:
        return await self.client.get_oom_event()
