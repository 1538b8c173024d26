"""Guest side of co-location QoS: the kata_colo.v1.Colo service.

SetVcpuPriorities gives {priority: [vCPUs]} (the host placed those vCPU threads in its
``vcpu-<priority>`` groups). The agent then keeps one cgroup v2 cpuset group per priority,
``<cgroup parent>/prio-<name>`` with ``cpuset.cpus`` = that priority's vCPUs, writes
``/run/kata-colo/vcpu-priorities.json`` (the host's ``QosManager.guest_json()`` format) and
places each container annotated ``io.katacontainers.colo.container-priority=<name>`` under
its priority's group (runc cgroupsPath ``<parent>/prio-<name>/<cid>``); ``on_change`` passes the
mapping on to ``resources.json``. SetMemory records the VM's memory as the host sized it in
``resources.json`` (:mod:`agent_api.agent.resources_file`); it and GetGuestMemory answer with
the guest's /proc/meminfo.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2

from agent_api.agent import memory_hotplug
from agent_api.agent.cgroups import CGROUP_ROOT
from common.errors import FailedPrecondition, InvalidArgument, ResourceError
from proto.kata_colo import colo_pb2
from ttrpc import ServerContext

if TYPE_CHECKING:
    from agent_api.agent.resources_file import GuestResources

log = logging.getLogger(__name__)

ANNOTATION_CONTAINER_PRIORITY = "io.katacontainers.colo.container-priority"
PRIORITY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
GROUP_PREFIX = "prio-"
RUN_DIR = "/run/kata-colo"
JSON_NAME = "vcpu-priorities.json"
ONLINE_CPUS = "/sys/devices/system/cpu/online"
MAX_PRIORITIES = 64


def parse_cpu_list(text: str) -> list[int]:
    """``0-2,5`` → [0, 1, 2, 5] (kernel cpu list format)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad cpu list {text!r}") from None
        if last < first:
            raise ValueError(f"bad cpu list {text!r}")
        out.update(range(first, last + 1))
    return sorted(out)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 5] → ``0-2,5``."""
    ranges: list[list[int]] = []
    for c in sorted(set(cpus)):
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def online_cpus(path: str = ONLINE_CPUS) -> list[int]:
    try:
        with open(path) as f:
            return parse_cpu_list(f.read())
    except (OSError, ValueError) as exc:
        raise ResourceError(f"cannot read online CPUs from {path}: {exc}") from None


def check_priorities(mapping: Mapping[str, Iterable[int]], online: Iterable[int]) -> dict[str, list[int]]:
    """Validate {name: vCPUs}: names match PRIORITY_RE, each set non-empty, every vCPU online
    and in at most one priority. Returns {name: sorted vCPUs}; raises InvalidArgument."""
    if not mapping:
        raise InvalidArgument("no vCPU priorities given")
    if len(mapping) > MAX_PRIORITIES:
        raise InvalidArgument(f"too many priorities ({len(mapping)} > {MAX_PRIORITIES})")
    up = set(online)
    owner: dict[int, str] = {}
    out: dict[str, list[int]] = {}
    for name in sorted(mapping):
        if not isinstance(name, str) or not PRIORITY_RE.match(name):
            raise InvalidArgument(f"invalid priority name {str(name)[:64]!r}")
        vcpus = list(mapping[name])
        if not vcpus:
            raise InvalidArgument(f"priority {name!r} has no vCPUs")
        for v in vcpus:
            if v not in up:
                raise InvalidArgument(f"priority {name!r}: vCPU {v} is not online "
                                      f"(online: {format_cpu_list(up) or 'none'})")
            if v in owner:
                raise InvalidArgument(f"vCPU {v} is in both {owner[v]!r} and {name!r}"
                                      if owner[v] != name else f"vCPU {v} listed twice in {name!r}")
            owner[v] = name
        out[name] = sorted(vcpus)
    return out


def render_json(mapping: Mapping[str, list[int]]) -> str:
    """Same document as the host's QosManager.guest_json(): version, priorities, per-vCPU
    priority (null for a vCPU without one) and order (by name: the guest has no ranks)."""
    owner = {v: name for name, vcpus in mapping.items() for v in vcpus}
    n = max(owner) + 1 if owner else 0
    doc = {
        "version": 1,
        "priorities": {name: sorted(v) for name, v in sorted(mapping.items())},
        "vcpus": [owner.get(i) for i in range(n)],
        "order": sorted(mapping),
    }
    return json.dumps(doc, sort_keys=True)


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


class Colo:
    """The agent's vCPU-priority state and its cgroups (cgroup v2 only: the guest's)."""

    def __init__(self, cgroup_parent: str, *, cgroup_root: str = CGROUP_ROOT, run_dir: str = RUN_DIR,
                 online_path: str = ONLINE_CPUS,
                 on_change: Callable[[dict[str, list[int]]], None] | None = None) -> None:
        self.cgroup_parent = "/" + cgroup_parent.strip("/")
        self.cgroup_root = cgroup_root
        self.json_path = os.path.join(run_dir, JSON_NAME)
        self.online_path = online_path
        self.priorities: dict[str, list[int]] = {}
        self.rmdir = os.rmdir  # cgroupfs dirs hold only interface files: rmdir removes them
        self.on_change = on_change  # resources.json follows the priorities

    # -- names -------------------------------------------------------------------------------
    def group(self, name: str) -> str:
        """cgroup path (relative to the hierarchy, as runc wants it) of priority ``name``."""
        return f"{self.cgroup_parent.rstrip('/')}/{GROUP_PREFIX}{name}"

    def _dir(self, rel: str) -> str:
        return os.path.join(self.cgroup_root, rel.strip("/"))

    def cgroup_parent_for(self, annotations: Mapping[str, str], default: str) -> str:
        """The cgroup parent of a container with OCI ``annotations``."""
        name = annotations.get(ANNOTATION_CONTAINER_PRIORITY, "")
        if not name:
            return default
        if name not in self.priorities:
            known = ", ".join(sorted(self.priorities)) or "none set"
            raise InvalidArgument(f"unknown container priority {name[:64]!r} (known: {known})")
        return self.group(name)

    # -- apply -------------------------------------------------------------------------------
    def set(self, mapping: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
        wanted = check_priorities(mapping, online_cpus(self.online_path))
        self._enable_cpuset()
        for name, vcpus in wanted.items():
            d = self._dir(self.group(name))
            try:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "cpuset.cpus"), "w") as f:
                    f.write(format_cpu_list(vcpus))
            except OSError as exc:
                raise ResourceError(f"priority {name}: cannot set cpuset.cpus of {d}: {exc}") from None
        for name in set(self.priorities) - set(wanted):
            self._remove_group(name)
        self.priorities = wanted
        _write_atomic(self.json_path, render_json(wanted))
        if self.on_change is not None:
            self.on_change(wanted)
        log.info("vCPU priorities: %s", {n: format_cpu_list(v) for n, v in wanted.items()})
        return wanted

    def _enable_cpuset(self) -> None:
        """+cpuset in subtree_control of the hierarchy root and every ancestor of the groups."""
        parts = [p for p in self.cgroup_parent.split("/") if p]
        rel = ""
        for part in [None, *parts]:
            if part is not None:
                rel = f"{rel}/{part}"
                os.makedirs(self._dir(rel), exist_ok=True)
            d = self._dir(rel) if rel else self.cgroup_root
            try:
                with open(os.path.join(d, "cgroup.controllers")) as f:
                    available = f.read().split()
            except FileNotFoundError:
                available = None  # not a cgroup v2 mount (unit tests): just write the file
            if available is not None and "cpuset" not in available:
                raise FailedPrecondition(f"cpuset controller not available in {d}")
            ctl = os.path.join(d, "cgroup.subtree_control")
            try:
                with open(ctl) as f:
                    enabled = f.read().split()
            except FileNotFoundError:
                enabled = []
            if "cpuset" in enabled:
                continue
            try:
                with open(ctl, "w") as f:
                    f.write("+cpuset")
            except OSError as exc:
                raise ResourceError(f"cannot enable cpuset in {ctl}: {exc}") from None

    def _remove_group(self, name: str) -> None:
        try:
            self.rmdir(self._dir(self.group(name)))
        except FileNotFoundError:
            pass
        except OSError as exc:  # still has containers: keep it, it is harmless
            log.warning("priority group %s kept: %s", name, exc)

    def cleanup(self) -> None:
        """Remove what :meth:`set` created (nothing if it never ran)."""
        if not self.priorities:
            return
        for name in list(self.priorities):
            self._remove_group(name)
        self.priorities = {}
        try:
            os.unlink(self.json_path)
        except FileNotFoundError:
            pass


def guest_memory(sys_mem: str = memory_hotplug.SYS_MEM, proc_meminfo: str = memory_hotplug.PROC_MEMINFO
                 ) -> colo_pb2.GuestMemory:
    info = memory_hotplug.meminfo(proc_meminfo)
    return colo_pb2.GuestMemory(total_bytes=info.total, free_bytes=info.free, available_bytes=info.available,
                                cached_bytes=info.cached, block_size_bytes=memory_hotplug.block_size(sys_mem),
                                offline_blocks=len(memory_hotplug.offline_blocks(sys_mem)))


class ColoService:
    """kata_colo.v1.Colo handlers. ``resources`` is the resources.json writer
    (:class:`agent_api.agent.resources_file.GuestResources`); None = SetMemory unimplemented."""

    def __init__(self, colo: Colo, resources: GuestResources | None = None) -> None:
        self.colo = colo
        self.resources = resources

    async def SetVcpuPriorities(self, req: colo_pb2.SetVcpuPrioritiesRequest,
                                ctx: ServerContext) -> empty_pb2.Empty:
        self.colo.set({name: list(s.vcpus) for name, s in req.priorities.items()})
        return empty_pb2.Empty()

    async def SetMemory(self, req: colo_pb2.SetMemoryRequest, ctx: ServerContext) -> colo_pb2.GuestMemory:
        if self.resources is None:
            raise FailedPrecondition("this agent keeps no resources.json")
        m = req.memory
        state = {"usable_bytes": m.usable_bytes, "target_bytes": m.target_bytes, "max_bytes": m.max_bytes,
                 "floor_bytes": m.floor_bytes, "mechanisms": list(m.mechanisms)}
        await asyncio.to_thread(self.resources.set_memory, state)
        return await asyncio.to_thread(guest_memory)

    async def GetGuestMemory(self, req: empty_pb2.Empty, ctx: ServerContext) -> colo_pb2.GuestMemory:
        return await asyncio.to_thread(guest_memory)
