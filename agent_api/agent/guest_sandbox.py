"""Sandbox-wide state: CreateSandbox (hostname, shared storages), DestroySandbox, and the OOM
watcher feeding GetOOMEvent."""
from __future__ import annotations

import asyncio
import logging
import os
import socket

from agent_api.agent.agent_config import SHARED_MOUNT_BASE, AgentConfig
from agent_api.agent.containers import Containers
from agent_api.agent.validate import check_id, path_within
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceError
from common.mount import mount, parse_options, umount
from proto.kata import agent_pb2

log = logging.getLogger(__name__)

DRIVERS = {"9p": "9p", "virtio-fs": "virtiofs", "ephemeral": "tmpfs"}
HOSTNAME_MAX = 64


def storage_args(st: agent_pb2.Storage) -> tuple[str, str, str, int, str]:
    """Validate a Storage → (source, target, fstype, flags, data) for mount(2)."""
    fstype = DRIVERS.get(st.driver)
    if fstype is None:
        raise InvalidArgument(f"unsupported storage driver {st.driver!r}")
    if st.fstype and st.fstype != fstype:
        raise InvalidArgument(f"storage driver {st.driver} needs fstype {fstype}, not {st.fstype}")
    target = path_within(st.mount_point, SHARED_MOUNT_BASE)
    if not st.source or "\x00" in st.source or len(st.source) > 255:
        raise InvalidArgument("storage source is empty or invalid")
    flags, data = parse_options(st.options)
    if fstype == "9p" and "trans=" not in data:
        data = ",".join(filter(None, ["trans=virtio", "version=9p2000.L", data]))
    return st.source, target, fstype, flags, data


def _umount(target: str) -> None:
    try:
        umount(target)
    except ResourceError as exc:
        log.warning("%s", exc)


class Sandbox:
    def __init__(self, cfg: AgentConfig, containers: Containers) -> None:
        self.cfg = cfg
        self.containers = containers
        self.id = ""
        self.mounts: list[str] = []
        self.oom_events: asyncio.Queue[str] = asyncio.Queue(maxsize=1024)
        self._oom_task: asyncio.Task[None] | None = None

    def start_oom_watcher(self) -> None:
        if self._oom_task is None:
            self._oom_task = asyncio.get_running_loop().create_task(self._watch_oom())

    async def stop(self) -> None:
        if self._oom_task is not None:
            self._oom_task.cancel()
            await asyncio.gather(self._oom_task, return_exceptions=True)
            self._oom_task = None

    async def _watch_oom(self) -> None:
        seen: dict[str, int] = {}
        while True:
            current = {}
            for c in self.containers.items():
                kills = c.cgroup.oom_kills()
                current[c.id] = kills
                if kills > seen.get(c.id, 0):
                    log.info("container %s: OOM kill (%d)", c.id, kills)
                    if self.oom_events.full():
                        self.oom_events.get_nowait()
                    self.oom_events.put_nowait(c.id)
            seen = current
            await asyncio.sleep(self.cfg.oom_poll_interval)

    async def create(self, req: agent_pb2.CreateSandboxRequest) -> None:
        if self.id:
            raise AlreadyExists(f"sandbox {self.id} already created")
        if req.sandbox_id:
            check_id(req.sandbox_id, "sandbox_id")
        if req.hostname and (len(req.hostname) > HOSTNAME_MAX or not all(
                ch.isalnum() or ch in "-." for ch in req.hostname)):
            raise InvalidArgument(f"invalid hostname {req.hostname!r}")
        planned = [storage_args(st) for st in req.storages]
        if req.hostname:
            socket.sethostname(req.hostname)
        try:
            for source, target, fstype, flags, data in planned:
                os.makedirs(target, exist_ok=True)
                mount(source, target, fstype, flags, data)
                self.mounts.append(target)
        except BaseException:
            self._unmount_all()
            raise
        self.id = req.sandbox_id or "sandbox"

    def _unmount_all(self) -> None:
        for target in reversed(self.mounts):
            _umount(target)
        self.mounts = []

    async def destroy(self) -> None:
        if not self.id:
            raise FailedPrecondition("no sandbox was created")
        await self.containers.remove_all()
        self._unmount_all()
        self.id = ""
