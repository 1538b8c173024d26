"""AgentClient: typed async calls to the guest agent (kata's grpc.AgentService + grpc.Health,
plus kata-colo's kata_colo.v1.Colo extension).

Grouped like kata's agent interface: sandbox, network, containers, processes, io, health. Every
RPC's deadline comes from the one table :data:`TIMEOUTS` (None = wait as long as it takes: the
process/stream/OOM calls block by design). Errors are :mod:`common.errors` classes; a read at end
of stream returns b"" (kata's agent signals EOF as an INTERNAL "eof" error).
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable
from typing import ClassVar, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from agent_api.client import transport
from common.errors import AgentError, DeadlineExceeded, Internal, Unavailable
from proto.kata import agent_pb2, health_pb2, oci_pb2, types_pb2
from proto.kata_colo import colo_pb2, debug_pb2
from ttrpc import Client, framing

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
COLO_SERVICE = "kata_colo.v1.Colo"
DEBUG_SERVICE = "kata_colo.v1.Debug"
EOF_MESSAGES = ("eof", "read meet eof")
DEFAULT_READ = 32 << 10
M = TypeVar("M", bound=Message)

TIMEOUTS: dict[str, float | None] = {
    # sandbox
    "CreateSandbox": 60.0, "DestroySandbox": 30.0, "OnlineCPUMem": 30.0,
    "GetGuestDetails": 10.0, "GetMetrics": 10.0, "GetOOMEvent": None,
    "ReseedRandomDev": 10.0, "SetGuestDateTime": 10.0,
    # network
    "UpdateInterface": 30.0, "UpdateRoutes": 30.0, "ListInterfaces": 10.0, "ListRoutes": 10.0,
    "AddARPNeighbors": 30.0,
    # containers
    "CreateContainer": 120.0, "StartContainer": 30.0, "RemoveContainer": 30.0,
    "PauseContainer": 30.0, "ResumeContainer": 30.0, "UpdateContainer": 30.0,
    "StatsContainer": 10.0,
    # processes
    "ExecProcess": 30.0, "SignalProcess": 10.0, "WaitProcess": None,
    # io
    "ReadStdout": None, "ReadStderr": None, "WriteStdin": 30.0, "CloseStdin": 10.0,
    "TtyWinResize": 10.0,
    # health
    "Check": 5.0, "Version": 5.0,
    # kata-colo extension
    "SetVcpuPriorities": 30.0, "SetMemory": 10.0, "GetGuestMemory": 5.0,
    "Exec": 35.0,  # debug_exec passes the command's own timeout + EXEC_GRACE
}
EXEC_GRACE = 5.0


def _is_eof(exc: Internal) -> bool:
    return exc.message.strip().lower() in EOF_MESSAGES


class AgentClient:
    #: Observer of every bounded RPC (method, seconds), the blocking ones (TIMEOUTS None) left
    #: out: process-wide, installed by the shim's composition root for its latency metrics.
    call_observer: ClassVar[Callable[[str, float], None] | None] = None

    def __init__(self, address: str, *, connect_timeout: float = 30.0) -> None:
        self.address = transport.parse_address(address)
        self.connect_timeout = connect_timeout
        self._client: Client | None = None
        self._connect_lock = asyncio.Lock()

    async def __aenter__(self) -> AgentClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.closed

    async def connect(self, timeout: float | None = None) -> None:
        async with self._connect_lock:
            if self.connected:
                return
            reader, writer = await transport.connect(self.address, timeout or self.connect_timeout)
            # random odd start: see Client(first_stream_id=) (virtio-serial reconnects)
            self._client = Client(reader, writer,
                                  first_stream_id=secrets.randbelow(framing.MAX_STREAM_ID // 2) * 2 + 1)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _call(self, service: str, method: str, request: Message, response_type: type[M], *,
                    timeout: float | None = None) -> M:
        if not self.connected:
            await self.connect()
        assert self._client is not None
        limit = TIMEOUTS[method] if timeout is None else timeout
        observer = AgentClient.call_observer if TIMEOUTS[method] is not None else None
        if observer is None:
            return await self._client.call(service, method, request, response_type, timeout=limit)
        started = time.perf_counter()
        try:
            return await self._client.call(service, method, request, response_type, timeout=limit)
        finally:
            observer(method, time.perf_counter() - started)

    async def _agent(self, method: str, request: Message, response_type: type[M] = empty_pb2.Empty,
                     **kw: float | None) -> M:
        return await self._call(AGENT_SERVICE, method, request, response_type, **kw)

    # -- sandbox ----------------------------------------------------------------------------
    async def create_sandbox(self, *, sandbox_id: str = "", hostname: str = "",
                             storages: Iterable[agent_pb2.Storage] = (), dns: Iterable[str] = ()) -> None:
        await self._agent("CreateSandbox", agent_pb2.CreateSandboxRequest(
            sandbox_id=sandbox_id, hostname=hostname, storages=list(storages), dns=list(dns)))

    async def destroy_sandbox(self) -> None:
        await self._agent("DestroySandbox", agent_pb2.DestroySandboxRequest())

    async def online_cpu_mem(self, *, nb_cpus: int = 0, wait: bool = True, cpu_only: bool = False) -> None:
        await self._agent("OnlineCPUMem", agent_pb2.OnlineCPUMemRequest(
            nb_cpus=nb_cpus, wait=wait, cpu_only=cpu_only))

    async def get_guest_details(self, *, mem_block_size: bool = True,
                                mem_hotplug_probe: bool = True) -> agent_pb2.GuestDetailsResponse:
        return await self._agent("GetGuestDetails", agent_pb2.GuestDetailsRequest(
            mem_block_size=mem_block_size, mem_hotplug_probe=mem_hotplug_probe),
            agent_pb2.GuestDetailsResponse)

    async def reseed_random_dev(self, data: bytes) -> None:
        """Mix ``data`` into the guest kernel's RNG and reseed it (a restored clone)."""
        await self._agent("ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=data))

    async def set_guest_date_time(self, sec: int, usec: int) -> None:
        await self._agent("SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(Sec=sec, Usec=usec))

    async def get_metrics(self) -> str:
        resp = await self._agent("GetMetrics", agent_pb2.GetMetricsRequest(), agent_pb2.Metrics)
        return resp.metrics

    async def get_oom_event(self) -> str:
        """Block until a container is OOM-killed; return its id."""
        resp = await self._agent("GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent)
        return resp.container_id

    # -- network ----------------------------------------------------------------------------
    async def update_interface(self, interface: types_pb2.Interface) -> types_pb2.Interface:
        return await self._agent("UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=interface),
                                 types_pb2.Interface)

    async def update_routes(self, routes: Iterable[types_pb2.Route]) -> list[types_pb2.Route]:
        resp = await self._agent("UpdateRoutes", agent_pb2.UpdateRoutesRequest(
            routes=agent_pb2.Routes(Routes=list(routes))), agent_pb2.Routes)
        return list(resp.Routes)

    async def list_interfaces(self) -> list[types_pb2.Interface]:
        resp = await self._agent("ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces)
        return list(resp.Interfaces)

    async def list_routes(self) -> list[types_pb2.Route]:
        resp = await self._agent("ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
        return list(resp.Routes)

    async def add_arp_neighbors(self, neighbors: Iterable[types_pb2.ARPNeighbor]) -> None:
        """Create or replace static neighbours (ARP / NDP entries) in the guest."""
        await self._agent("AddARPNeighbors", agent_pb2.AddARPNeighborsRequest(
            neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=list(neighbors))))

    # -- containers -------------------------------------------------------------------------
    async def create_container(self, container_id: str, spec: oci_pb2.Spec, *,
                               storages: Iterable[agent_pb2.Storage] = (),
                               devices: Iterable[agent_pb2.Device] = (),
                               sandbox_pidns: bool = False) -> None:
        await self._agent("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id=container_id, OCI=spec, storages=list(storages), devices=list(devices),
            sandbox_pidns=sandbox_pidns))

    async def start_container(self, container_id: str) -> None:
        await self._agent("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id))

    async def remove_container(self, container_id: str, timeout: int = 0) -> None:
        """Kill and remove; ``timeout`` (s) bounds the agent's wait for the processes."""
        limit = TIMEOUTS["RemoveContainer"]
        await self._agent("RemoveContainer", agent_pb2.RemoveContainerRequest(
            container_id=container_id, timeout=timeout),
            timeout=max(limit or 0.0, timeout + 5.0) if timeout else None)

    async def pause_container(self, container_id: str) -> None:
        await self._agent("PauseContainer", agent_pb2.PauseContainerRequest(container_id=container_id))

    async def resume_container(self, container_id: str) -> None:
        await self._agent("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=container_id))

    async def update_container(self, container_id: str, resources: oci_pb2.LinuxResources) -> None:
        await self._agent("UpdateContainer", agent_pb2.UpdateContainerRequest(
            container_id=container_id, resources=resources))

    async def stats_container(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        return await self._agent("StatsContainer", agent_pb2.StatsContainerRequest(container_id=container_id),
                                 agent_pb2.StatsContainerResponse)

    # -- processes --------------------------------------------------------------------------
    async def exec_process(self, container_id: str, exec_id: str, process: oci_pb2.Process) -> None:
        await self._agent("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=process))

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        await self._agent("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal))

    async def wait_process(self, container_id: str, exec_id: str = "") -> int:
        resp = await self._agent("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=container_id, exec_id=exec_id), agent_pb2.WaitProcessResponse)
        return resp.status

    # -- io ---------------------------------------------------------------------------------
    async def _read(self, method: str, container_id: str, exec_id: str, size: int) -> bytes:
        try:
            resp = await self._agent(method, agent_pb2.ReadStreamRequest(
                container_id=container_id, exec_id=exec_id, len=size), agent_pb2.ReadStreamResponse)
        except Internal as exc:
            if _is_eof(exc):
                return b""
            raise
        return resp.data

    async def read_stdout(self, container_id: str, exec_id: str = "", size: int = DEFAULT_READ) -> bytes:
        """Up to ``size`` bytes once available; b"" at end of stream."""
        return await self._read("ReadStdout", container_id, exec_id, size)

    async def read_stderr(self, container_id: str, exec_id: str = "", size: int = DEFAULT_READ) -> bytes:
        return await self._read("ReadStderr", container_id, exec_id, size)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        resp = await self._agent("WriteStdin", agent_pb2.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data), agent_pb2.WriteStreamResponse)
        return resp.len

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._agent("CloseStdin", agent_pb2.CloseStdinRequest(container_id=container_id, exec_id=exec_id))

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        await self._agent("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=columns))

    # -- kata-colo --------------------------------------------------------------------------
    async def set_vcpu_priorities(self, mapping: dict[str, list[int]]) -> None:
        """{priority: [vCPU indices]}: the agent makes one cpuset group per priority."""
        req = colo_pb2.SetVcpuPrioritiesRequest()
        for name, vcpus in mapping.items():
            req.priorities[name].vcpus.extend(vcpus)
        await self._call(COLO_SERVICE, "SetVcpuPriorities", req, empty_pb2.Empty)

    async def set_memory(self, state: colo_pb2.MemoryState) -> colo_pb2.GuestMemory:
        """Tell the guest its memory (resources.json); answers with the guest's memory now."""
        return await self._call(COLO_SERVICE, "SetMemory", colo_pb2.SetMemoryRequest(memory=state),
                                colo_pb2.GuestMemory)

    async def get_guest_memory(self) -> colo_pb2.GuestMemory:
        return await self._call(COLO_SERVICE, "GetGuestMemory", empty_pb2.Empty(), colo_pb2.GuestMemory)

    async def debug_exec(self, argv: Iterable[str], *, stdin: bytes = b"", timeout: int = 30,
                         env: Iterable[str] = ()) -> debug_pb2.ExecResponse:
        """Run ``argv`` in the guest outside any container (kata_colo.v1.Debug/Exec; the guest
        serves it only with agent.debug_console on its kernel command line)."""
        req = debug_pb2.ExecRequest(argv=list(argv), stdin=stdin, timeout_seconds=timeout, env=list(env))
        return await self._call(DEBUG_SERVICE, "Exec", req, debug_pb2.ExecResponse,
                                timeout=(timeout or 30) + EXEC_GRACE)

    # -- health -----------------------------------------------------------------------------
    async def check(self) -> bool:
        resp = await self._call(HEALTH_SERVICE, "Check", health_pb2.CheckRequest(),
                                health_pb2.HealthCheckResponse)
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def version(self) -> health_pb2.VersionCheckResponse:
        return await self._call(HEALTH_SERVICE, "Version", health_pb2.CheckRequest(),
                                health_pb2.VersionCheckResponse)

    async def wait_ready(self, timeout: float, *, interval: float = 0.1,
                         attempt_timeout: float = 1.0) -> None:
        """Poll Health.Check until the agent answers SERVING or ``timeout`` passes. A call that
        times out keeps the connection (a virtio-serial socket accepts before the guest reads);
        a broken connection is re-established."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while (remaining := deadline - loop.time()) > 0:
            try:
                if not self.connected:
                    await self.connect(timeout=remaining)
                resp = await self._call(HEALTH_SERVICE, "Check", health_pb2.CheckRequest(),
                                        health_pb2.HealthCheckResponse,
                                        timeout=max(0.01, min(attempt_timeout, deadline - loop.time())))
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = AgentError(f"agent status {resp.status}")
            except DeadlineExceeded as exc:
                last = exc
            except Unavailable as exc:  # includes ConnectionClosed and AgentError
                last = exc
                await self.close()
            await asyncio.sleep(max(0.0, min(interval, deadline - loop.time())))
        raise DeadlineExceeded(f"agent at {self.address} not ready after {timeout}s: {last}")
