"""Containers in the guest: bundle + runc lifecycle, exec processes, signals, waits, stdio.

One :class:`Container` per CreateContainer; its init process and exec processes are
:class:`Process` objects whose exit futures come from the reaper. State lives in memory; the
bundle (config.json, pid files, runc log) in ``<state>/bundles/<id>``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from agent_api.agent import storage as storage_mod
from agent_api.agent.agent_config import AgentConfig
from agent_api.agent.cgroups import Cgroup, network_stats, remove_parent
from agent_api.agent.guest_process import Process, StdioSetup
from agent_api.agent.reaper import Reaper
from agent_api.agent.runc import Runc
from agent_api.agent.spec import adapt_for_guest, process_to_json, resources_to_json
from agent_api.agent.validate import check_exec_id, check_id, check_signal
from common.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, NotFound
from proto.kata import agent_pb2, oci_pb2

log = logging.getLogger(__name__)
REMOVE_WAIT = 10.0


def handles_signal(pid: int, sig: int) -> bool:
    """Whether ``pid`` installed a handler for ``sig`` (SigCgt in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except (OSError, ValueError):
        pass
    return False


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


@dataclass
class Container:
    id: str
    bundle: str
    cgroup: Cgroup
    init: Process
    status: str = "created"  # created | running | paused | stopped
    execs: dict[str, Process] = field(default_factory=dict)
    mounts: storage_mod.ContainerMounts | None = None

    def process(self, exec_id: str) -> Process:
        if exec_id == "":
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"process {self.id}/{exec_id} not found")
        return proc


class Containers:
    def __init__(self, cfg: AgentConfig, reaper: Reaper, runc: Runc) -> None:
        self.cfg = cfg
        self.reaper = reaper
        self.runc = runc
        self.bundles = os.path.join(cfg.state_dir, "bundles")
        self._containers: dict[str, Container] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, cid: str) -> Container:
        c = self._containers.get(check_id(cid))
        if c is None:
            raise NotFound(f"container {cid} not found")
        return c

    def ids(self) -> list[str]:
        return list(self._containers)

    def items(self) -> list[Container]:
        return list(self._containers.values())

    def _lock(self, cid: str) -> asyncio.Lock:
        return self._locks.setdefault(cid, asyncio.Lock())

    # -- lifecycle --------------------------------------------------------------------------
    async def create(self, cid: str, spec: oci_pb2.Spec, *, cgroup_parent: str | None = None,
                     storages: list[agent_pb2.Storage] | None = None,
                     devices: list[agent_pb2.Device] | None = None) -> Container:
        """``cgroup_parent`` overrides the configured parent (a co-location priority group);
        ``storages``/``devices`` are the container's own (block rootfs, data disks, passed-through
        devices: :mod:`agent_api.agent.storage`), mounted first and unmounted on failure."""
        check_id(cid)
        async with self._lock(cid):
            if cid in self._containers:
                raise AlreadyExists(f"container {cid} already exists")
            storage_mod.plan(cid, storages or [])  # validate before anything is mounted
            mounts = await storage_mod.mount_all(cid, storages or [])
            try:
                return await self._create(cid, spec, cgroup_parent, mounts, devices or [])
            except BaseException:
                mounts.unmount()
                raise

    async def _create(self, cid: str, spec: oci_pb2.Spec, cgroup_parent: str | None,
                      mounts: storage_mod.ContainerMounts, devices: list[agent_pb2.Device]) -> Container:
        config = adapt_for_guest(spec, container_id=cid, shared_dir=self.cfg.shared_dir,
                                 cgroup_parent=cgroup_parent or self.cfg.cgroup_parent,
                                 block_rootfs=mounts.root_path)
        await storage_mod.apply_devices(cid, devices, config)
        if not os.path.isdir(config["root"]["path"]):
            raise NotFound(f"rootfs {config['root']['path']} does not exist")
        bundle = os.path.join(self.bundles, cid)
        os.makedirs(self.bundles, mode=0o700, exist_ok=True)
        try:
            os.mkdir(bundle, 0o700)
        except FileExistsError:
            raise AlreadyExists(f"bundle of {cid} exists (removal in progress?)") from None
        stdio: StdioSetup | None = None
        try:
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
            stdio = StdioSetup(bool(config["process"].get("terminal")))
            pid_file = os.path.join(bundle, "init.pid")
            # both ends of runc create are logged: when the host's CreateContainer times out,
            # the console tail it logs shows whether runc ran and where it stopped
            log.info("creating container %s: runc create", cid)
            started = time.monotonic()
            try:
                await stdio.run(self.runc.create(cid, bundle, pid_file, stdio.runc_stdio,
                                                 console_socket=stdio.console_path))
            except DeadlineExceeded as exc:  # a hung runc (seen under TCG): once more
                log.warning("container %s: %s; retrying runc create once", cid, exc)
                await self._force_delete(cid)
                await stdio.run(self.runc.create(cid, bundle, pid_file, stdio.runc_stdio,
                                                 console_socket=stdio.console_path))
            pid = _read_pid(pid_file)
            proc = Process(cid, "", pid, self.reaper.watch(pid))
            stdio.attach(proc)
            self._apply_console_size(proc, config["process"])
        except BaseException:
            if stdio is not None:
                stdio.close()
            await self._force_delete(cid)
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        container = Container(cid, bundle, Cgroup(config["linux"]["cgroupsPath"]), proc, mounts=mounts)
        self._containers[cid] = container
        log.info("created container %s (init pid %d) in %.1fs", cid, pid, time.monotonic() - started)
        return container

    @staticmethod
    def _apply_console_size(proc: Process, process: dict[str, Any]) -> None:
        size = process.get("consoleSize")
        if proc.terminal and size and size.get("height") and size.get("width"):
            proc.resize(size["height"], size["width"])

    async def _force_delete(self, cid: str) -> None:
        try:
            await self.runc.delete(cid, force=True)
        except NotFound:
            pass
        except Exception as exc:
            log.warning("runc delete %s: %s", cid, exc)

    async def start(self, cid: str) -> None:
        c = self.get(cid)
        async with self._lock(cid):
            if c.status != "created":
                raise FailedPrecondition(f"container {cid} is {c.status}, not created")
            await self.runc.start(cid)
            c.status = "running"

    async def remove(self, cid: str, timeout: float = 0) -> None:
        c = self.get(cid)
        async with self._lock(cid):
            await self._force_delete(cid)
            procs = [c.init, *c.execs.values()]
            try:
                async with asyncio.timeout(timeout or REMOVE_WAIT):
                    await asyncio.gather(*(asyncio.shield(p.exited) for p in procs))
            except TimeoutError:
                raise DeadlineExceeded(f"processes of {cid} did not exit") from None
            for p in procs:
                p.close_io()
            shutil.rmtree(c.bundle, ignore_errors=True)
            self._containers.pop(cid, None)
            if c.mounts is not None:
                c.mounts.unmount()  # the host unplugs the disks next
        self._locks.pop(cid, None)
        log.info("removed container %s", cid)

    async def remove_all(self) -> None:
        for cid in self.ids():
            try:
                await self.remove(cid)
            except Exception as exc:
                log.warning("removing %s: %s", cid, exc)
        remove_parent(self.cfg.cgroup_parent)

    # -- processes --------------------------------------------------------------------------
    async def exec(self, cid: str, exec_id: str, process: oci_pb2.Process) -> Process:
        check_exec_id(exec_id, allow_empty=False)
        c = self.get(cid)
        async with self._lock(cid):
            old = c.execs.get(exec_id)
            if old is not None and old.running:
                raise AlreadyExists(f"exec {cid}/{exec_id} already exists")
            if c.status not in ("running", "paused") or not c.init.running:
                raise FailedPrecondition(f"container {cid} is not running")
            pj = process_to_json(process)
            base = os.path.join(c.bundle, f"exec-{exec_id}")
            with open(base + ".json", "w") as f:
                json.dump(pj, f)
            stdio = StdioSetup(bool(pj.get("terminal")))
            try:
                await stdio.run(self.runc.exec(cid, base + ".json", base + ".pid",
                                               stdio.runc_stdio, log=base + ".log",
                                               console_socket=stdio.console_path))
                pid = _read_pid(base + ".pid")
                proc = Process(cid, exec_id, pid, self.reaper.watch(pid))
                stdio.attach(proc)
                self._apply_console_size(proc, pj)
            except BaseException:
                stdio.close()
                raise
            if old is not None:
                old.close_io()
            c.execs[exec_id] = proc
            return proc

    def process(self, cid: str, exec_id: str) -> Process:
        return self.get(cid).process(check_exec_id(exec_id))

    async def signal(self, cid: str, exec_id: str, sig: int) -> None:
        """kata semantics: exec_id "" is the init process, SIGTERM to an init that does not
        handle it becomes SIGKILL, and then every process of the container gets the signal."""
        check_signal(sig)
        c = self.get(cid)
        proc = c.process(check_exec_id(exec_id))
        if proc.init and sig == signal.SIGTERM and not handles_signal(proc.pid, sig):
            sig = signal.SIGKILL
        if proc.running:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
        elif exec_id:
            raise NotFound(f"process {cid}/{exec_id} already exited")
        if exec_id == "":
            for pid in c.cgroup.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    async def wait(self, cid: str, exec_id: str) -> int:
        proc = self.process(cid, exec_id)
        code = await asyncio.shield(proc.exited)
        c = self._containers.get(cid)
        if proc.init and c is not None:
            c.status = "stopped"
        return code

    # -- resources --------------------------------------------------------------------------
    async def update(self, cid: str, resources: oci_pb2.LinuxResources) -> None:
        self.get(cid)
        await self.runc.update(cid, resources_to_json(resources))

    async def pause(self, cid: str) -> None:
        c = self.get(cid)
        await self.runc.pause(cid)
        c.status = "paused"

    async def resume(self, cid: str) -> None:
        c = self.get(cid)
        await self.runc.resume(cid)
        c.status = "running"

    def stats(self, cid: str) -> agent_pb2.StatsContainerResponse:
        c = self.get(cid)
        resp = agent_pb2.StatsContainerResponse(cgroup_stats=c.cgroup.stats())
        if c.init.running:
            resp.network_stats.extend(network_stats(c.init.pid))
        return resp
