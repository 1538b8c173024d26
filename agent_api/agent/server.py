"""Wiring and listeners: one ttrpc Server with both services, served on the virtio-serial port
(one connection at a time, reopened after the host hangs up), on vsock and on Unix sockets."""
from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import socket

from agent_api.agent.agent_config import AgentConfig
from agent_api.agent.cgroups import remove_parent
from agent_api.agent.colo import Colo, ColoService
from agent_api.agent.containers import Containers
from agent_api.agent.debug_exec import DebugService
from agent_api.agent.debug_exec import enabled as debug_enabled
from agent_api.agent.guest_process import StreamEOF
from agent_api.agent.guest_sandbox import Sandbox
from agent_api.agent.memory_hotplug import MemoryHotplug
from agent_api.agent.network import Network
from agent_api.agent.reaper import Reaper
from agent_api.agent.resources_file import GuestResources
from agent_api.agent.runc import Runc
from agent_api.agent.service import AgentService, HealthService
from common.errors import to_status
from proto.kata import agent_pb2, health_pb2
from proto.kata_colo import colo_pb2, debug_pb2
from ttrpc import Server, open_fd_stream

log = logging.getLogger(__name__)
SERIAL_RETRY = 0.5
VPORT_ROOT = "/sys/class/virtio-ports"


def find_serial_port(name: str, root: str = VPORT_ROOT) -> str | None:
    """/dev path of the virtio-serial port called ``name`` (vportNpM varies with devices)."""
    for path in sorted(glob.glob(os.path.join(root, "*", "name"))):
        try:
            with open(path) as f:
                if f.read().strip() == name:
                    return os.path.join("/dev", os.path.basename(os.path.dirname(path)))
        except OSError:
            continue
    return None


def _not_stream_eof(record: logging.LogRecord) -> bool:
    """ttrpc logs INTERNAL failures with a traceback; a stream's EOF is INTERNAL "eof" (kata's
    wire convention) and happens for every process, so keep it out of the log."""
    return not (record.exc_info and isinstance(record.exc_info[1], StreamEOF))


class Agent:
    def __init__(self, cfg: AgentConfig, *, subreaper: bool = True) -> None:
        logging.getLogger("ttrpc.server").addFilter(_not_stream_eof)
        self.cfg = cfg
        self.subreaper = subreaper
        self.reaper = Reaper()
        self.runc = Runc(self.reaper, cfg.runc, os.path.join(cfg.state_dir, "runc"),
                         no_pivot=cfg.no_pivot)
        self.containers = Containers(cfg, self.reaper, self.runc)
        self.sandbox = Sandbox(cfg, self.containers)
        # resources.json beside the agent's state (/run/kata-colo in the guest)
        self.resources = GuestResources(os.path.dirname(cfg.state_dir.rstrip("/")) or "/")
        self.colo = Colo(cfg.cgroup_parent, on_change=self.resources.set_priorities)
        # only the guest's init (PID 1) manages memory hotplug: an agent run on a host (tests)
        # must leave the host's memory blocks alone
        self.memory = MemoryHotplug(on_change=self.resources.refresh) if os.getpid() == 1 else None
        self.server = Server(status_of=to_status)
        self.server.register_service(agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
                                     AgentService(self.containers, self.sandbox, Network(self.reaper),
                                                  colo=self.colo))
        self.server.register_service(colo_pb2.DESCRIPTOR.services_by_name["Colo"],
                                     ColoService(self.colo, self.resources))
        self.server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"], HealthService())
        if debug_enabled():  # agent.debug_console on the kernel command line
            self.server.register_service(debug_pb2.DESCRIPTOR.services_by_name["Debug"], DebugService(self.reaper))
        self._tasks: list[asyncio.Task[None]] = []
        self._vsock_server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.join(self.cfg.state_dir, "runc"), mode=0o700, exist_ok=True)
        self.reaper.install(subreaper=self.subreaper)
        self.sandbox.start_oom_watcher()
        await self._start_memory()
        for addr in self.cfg.listen:
            path = addr.removeprefix("unix:").removeprefix("//")
            await self.server.start_unix(path)
            log.info("listening on unix:%s", path)
        if self.cfg.use_vsock:
            await self._start_vsock()
        if self.cfg.use_serial:
            self._tasks.append(asyncio.create_task(self._serve_serial(), name="virtio-serial"))

    async def _start_memory(self) -> None:
        """Hot-plugged memory onlined by the guest itself; resources.json written before any
        container can bind its directory."""
        if self.memory is not None:
            await asyncio.to_thread(self.memory.configure)
            self.memory.start()
        await asyncio.to_thread(self.resources.write)

    async def _start_vsock(self) -> None:
        if not hasattr(socket, "AF_VSOCK"):
            return
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError as exc:
            log.info("vsock unavailable: %s", exc)
            return
        try:
            sock.bind((socket.VMADDR_CID_ANY, self.cfg.vsock_port))
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.info("vsock port %d unavailable: %s", self.cfg.vsock_port, exc)
            return

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.server.serve_connection(reader, writer)

        self._vsock_server = await asyncio.start_server(accepted, sock=sock, limit=2**20)
        log.info("listening on vsock port %d", self.cfg.vsock_port)

    async def _serve_serial(self) -> None:
        """Serve the virtio-serial port forever; while no host is connected reads hit EOF at
        once, so every round trip is followed by a short sleep (no busy loop)."""
        warned = False
        while True:
            dev = find_serial_port(self.cfg.serial_name)
            if dev is None:
                if not warned:
                    log.info("virtio-serial port %s not present", self.cfg.serial_name)
                    warned = True
                await asyncio.sleep(SERIAL_RETRY * 4)
                continue
            try:
                fd = os.open(dev, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("open %s: %s", dev, exc)
                await asyncio.sleep(SERIAL_RETRY)
                continue
            try:
                reader, writer = await open_fd_stream(fd)
                await self.server.serve_connection(reader, writer)
            except (OSError, ConnectionError) as exc:
                log.info("virtio-serial connection ended: %s", exc)
            finally:
                os.close(fd)
            await asyncio.sleep(SERIAL_RETRY)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._vsock_server is not None:
            self._vsock_server.close()
        await self.server.close()
        if self.memory is not None:
            await self.memory.close()
        await self.sandbox.stop()
        await self.containers.remove_all()
        self.colo.cleanup()
        self.resources.remove()
        remove_parent(self.cfg.cgroup_parent)
        self.reaper.uninstall()
