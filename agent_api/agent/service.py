"""grpc.AgentService and grpc.Health handlers: validate, delegate, build the response.

Each handler is ``async def Name(request, ctx)`` as ttrpc's register_service expects; errors
are common.errors classes (the ttrpc server turns them into statuses)."""
from __future__ import annotations

import logging

from google.protobuf import empty_pb2

from agent_api.agent import AGENT_VERSION
from agent_api.agent import guest_details as guest
from agent_api.agent.colo import Colo
from agent_api.agent.containers import Containers
from agent_api.agent.guest_sandbox import Sandbox
from agent_api.agent.network import Network
from agent_api.agent.validate import check_id, check_read_len
from common.errors import InvalidArgument
from proto.kata import agent_pb2, health_pb2, types_pb2
from ttrpc import ServerContext

log = logging.getLogger(__name__)
EMPTY = empty_pb2.Empty
GRPC_VERSION = "ttrpc-1.1.1"
MAX_WINSIZE = 65535


class AgentService:
    def __init__(self, containers: Containers, sandbox: Sandbox, network: Network, *,
                 colo: Colo | None = None) -> None:
        self.containers = containers
        self.sandbox = sandbox
        self.network = network
        self.colo = colo

    # -- sandbox ----------------------------------------------------------------------------
    async def CreateSandbox(self, req: agent_pb2.CreateSandboxRequest, ctx: ServerContext) -> EMPTY:
        await self.sandbox.create(req)
        return EMPTY()

    async def DestroySandbox(self, req: agent_pb2.DestroySandboxRequest, ctx: ServerContext) -> EMPTY:
        await self.sandbox.destroy()
        return EMPTY()

    async def OnlineCPUMem(self, req: agent_pb2.OnlineCPUMemRequest, ctx: ServerContext) -> EMPTY:
        await guest.online_cpu_mem(req)
        return EMPTY()

    async def GetGuestDetails(self, req: agent_pb2.GuestDetailsRequest,
                              ctx: ServerContext) -> agent_pb2.GuestDetailsResponse:
        return guest.guest_details(req)

    async def GetMetrics(self, req: agent_pb2.GetMetricsRequest, ctx: ServerContext) -> agent_pb2.Metrics:
        return agent_pb2.Metrics(metrics=guest.metrics_text())

    async def GetOOMEvent(self, req: agent_pb2.GetOOMEventRequest, ctx: ServerContext) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self.sandbox.oom_events.get())

    # -- containers -------------------------------------------------------------------------
    async def CreateContainer(self, req: agent_pb2.CreateContainerRequest, ctx: ServerContext) -> EMPTY:
        check_id(req.container_id)
        if not req.HasField("OCI"):
            raise InvalidArgument("CreateContainer without an OCI spec")
        parent = None
        if self.colo is not None:  # io.katacontainers.colo.container-priority → prio-<name>
            parent = self.colo.cgroup_parent_for(req.OCI.Annotations, self.containers.cfg.cgroup_parent)
        await self.containers.create(req.container_id, req.OCI, cgroup_parent=parent,
                                     storages=list(req.storages), devices=list(req.devices))
        return EMPTY()

    async def StartContainer(self, req: agent_pb2.StartContainerRequest, ctx: ServerContext) -> EMPTY:
        await self.containers.start(req.container_id)
        return EMPTY()

    async def RemoveContainer(self, req: agent_pb2.RemoveContainerRequest, ctx: ServerContext) -> EMPTY:
        await self.containers.remove(req.container_id, float(req.timeout))
        return EMPTY()

    async def PauseContainer(self, req: agent_pb2.PauseContainerRequest, ctx: ServerContext) -> EMPTY:
        await self.containers.pause(req.container_id)
        return EMPTY()

    async def ResumeContainer(self, req: agent_pb2.ResumeContainerRequest, ctx: ServerContext) -> EMPTY:
        await self.containers.resume(req.container_id)
        return EMPTY()

    async def UpdateContainer(self, req: agent_pb2.UpdateContainerRequest, ctx: ServerContext) -> EMPTY:
        await self.containers.update(req.container_id, req.resources)
        return EMPTY()

    async def StatsContainer(self, req: agent_pb2.StatsContainerRequest,
                             ctx: ServerContext) -> agent_pb2.StatsContainerResponse:
        return self.containers.stats(req.container_id)

    # -- processes --------------------------------------------------------------------------
    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest, ctx: ServerContext) -> EMPTY:
        if not req.HasField("process"):
            raise InvalidArgument("ExecProcess without a process")
        await self.containers.exec(req.container_id, req.exec_id, req.process)
        return EMPTY()

    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest, ctx: ServerContext) -> EMPTY:
        await self.containers.signal(req.container_id, req.exec_id, req.signal)
        return EMPTY()

    async def WaitProcess(self, req: agent_pb2.WaitProcessRequest,
                          ctx: ServerContext) -> agent_pb2.WaitProcessResponse:
        return agent_pb2.WaitProcessResponse(status=await self.containers.wait(req.container_id, req.exec_id))

    # -- stdio ------------------------------------------------------------------------------
    async def _read(self, req: agent_pb2.ReadStreamRequest, stderr: bool) -> agent_pb2.ReadStreamResponse:
        check_read_len(req.len)
        proc = self.containers.process(req.container_id, req.exec_id)
        return agent_pb2.ReadStreamResponse(data=await proc.read(stderr, req.len))

    async def ReadStdout(self, req: agent_pb2.ReadStreamRequest, ctx: ServerContext) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, False)

    async def ReadStderr(self, req: agent_pb2.ReadStreamRequest, ctx: ServerContext) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, True)

    async def WriteStdin(self, req: agent_pb2.WriteStreamRequest,
                         ctx: ServerContext) -> agent_pb2.WriteStreamResponse:
        proc = self.containers.process(req.container_id, req.exec_id)
        return agent_pb2.WriteStreamResponse(len=await proc.write_stdin(req.data))

    async def CloseStdin(self, req: agent_pb2.CloseStdinRequest, ctx: ServerContext) -> EMPTY:
        self.containers.process(req.container_id, req.exec_id).close_stdin()
        return EMPTY()

    async def TtyWinResize(self, req: agent_pb2.TtyWinResizeRequest, ctx: ServerContext) -> EMPTY:
        if not (0 < req.row <= MAX_WINSIZE and 0 < req.column <= MAX_WINSIZE):
            raise InvalidArgument(f"invalid window size {req.row}x{req.column}")
        self.containers.process(req.container_id, req.exec_id).resize(req.row, req.column)
        return EMPTY()

    # -- network ----------------------------------------------------------------------------
    async def UpdateInterface(self, req: agent_pb2.UpdateInterfaceRequest, ctx: ServerContext) -> types_pb2.Interface:
        return await self.network.update_interface(req.interface)

    async def UpdateRoutes(self, req: agent_pb2.UpdateRoutesRequest, ctx: ServerContext) -> agent_pb2.Routes:
        return await self.network.update_routes(req.routes)

    async def ListInterfaces(self, req: agent_pb2.ListInterfacesRequest, ctx: ServerContext) -> agent_pb2.Interfaces:
        return await self.network.list_interfaces()

    async def ListRoutes(self, req: agent_pb2.ListRoutesRequest, ctx: ServerContext) -> agent_pb2.Routes:
        return await self.network.list_routes()

    async def AddARPNeighbors(self, req: agent_pb2.AddARPNeighborsRequest, ctx: ServerContext) -> EMPTY:
        await self.network.add_arp_neighbors(req.neighbors)
        return EMPTY()


class HealthService:
    async def Check(self, req: health_pb2.CheckRequest, ctx: ServerContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(self, req: health_pb2.CheckRequest, ctx: ServerContext) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=GRPC_VERSION, agent_version=AGENT_VERSION)
