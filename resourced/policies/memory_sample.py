"""The memory policy's inputs: the node's memory (host /proc/meminfo and /proc/pressure/memory, or
a memory cgroup standing for a node carved out of a host) and each sandbox's memory as its shim
shows it (GET /colo/memory on ``<state_root>/<id>/shim-monitor.sock``, the cheap view: the VMM
and the last guest numbers, the guest is not asked).

:func:`read_host` and :func:`read_cgroup_node` are synchronous file reads (cheap: the daemon calls
them every sample). :class:`SandboxPoller` is async: it asks every shim in parallel, each within
``timeout``, and keeps the latest answers; a shim that does not answer (dead, no memory control,
starting) is left out of the sample until it does. A sandbox is *offline* when its VMM's cgroup
(the hierarchy the tiers are expanded in) lies in an offline tier. Everything read from a shim
is checked and capped (its guest numbers come from an untrusted guest): a malformed document
drops the sandbox, never the daemon.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from common.errors import KataColoError
from resourced.policies.memory import HostMemory, SandboxMemory
from shim.mgmt import client
from shim.resources.podcgroup import path as cgpath
from shim.resources.qos import cgroupfs

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 50  # 1 PiB: anything above is garbage
UNLIMITED = 1 << 60  # cgroup v1 "no limit" is ~2^63


def _meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def parse_psi(text: str) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) of a PSI file (None where absent)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for f in fields:
            name, _, value = f.partition("=")
            if name == "avg10":
                try:
                    found[kind] = float(value)
                except ValueError:
                    pass
    return found.get("some"), found.get("full")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def read_host(proc: str = "/proc") -> HostMemory:
    """MemTotal / MemAvailable and memory PSI (None without CONFIG_PSI or psi=0)."""
    info = _meminfo(_read(f"{proc}/meminfo") or "")
    if "MemTotal" not in info or "MemAvailable" not in info:
        raise KataColoError(f"{proc}/meminfo has no MemTotal/MemAvailable")
    some, full = parse_psi(_read(f"{proc}/pressure/memory") or "")
    return HostMemory(info["MemTotal"], info["MemAvailable"], some, full, f"{proc}/meminfo")


def read_cgroup_node(group_dir: str, version: int, host: HostMemory) -> HostMemory:
    """A memory cgroup as the node: total = its limit (capped by the host's), available = total −
    (usage − inactive file pages), PSI from its memory.pressure on v2 (the host's on v1)."""
    def value(name: str) -> int | None:
        text = _read(os.path.join(group_dir, name))
        if text is None:
            return None
        text = text.strip()
        return UNLIMITED if text == "max" else (int(text) if text.isdigit() else None)

    if version == 2:
        limit, usage = value("memory.max"), value("memory.current")
        stat_key = "inactive_file"
    else:
        limit, usage = value("memory.limit_in_bytes"), value("memory.usage_in_bytes")
        stat_key = "total_inactive_file"
    if limit is None or usage is None:
        raise KataColoError(f"{group_dir}: no memory limit/usage files (memory controller?)")
    stat = {}
    for line in (_read(os.path.join(group_dir, "memory.stat")) or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            stat[k] = int(v)
    total = min(limit, host.total)
    used = max(0, usage - stat.get(stat_key, 0))
    some, full = host.psi_some_avg10, host.psi_full_avg10
    if version == 2:
        some, full = parse_psi(_read(os.path.join(group_dir, "memory.pressure")) or "")
    return HostMemory(total, max(0, min(total, total - used)), some, full, group_dir)


def memory_mount(mounts_file: str = cgroupfs.MOUNTS) -> tuple[str, int] | None:
    """(mount point, cgroup version) of the memory controller: the v1 ``memory`` hierarchy, else
    the unified one when it has the memory controller; None without either."""
    mounts = cgroupfs.cgroup_mounts(mounts_file)
    for m in mounts:
        if m.fstype == "cgroup" and "memory" in m.options:
            return m.path, 1
    for m in mounts:
        if m.fstype == "cgroup2" and "memory" in (_read(os.path.join(m.path, "cgroup.controllers")) or "").split():
            return m.path, 2
    return None


def vmm_cgroup(pid: int, version: int) -> str | None:
    """The VMM's cgroup in the hierarchy that accounts CPU (v1 cpuacct, v2 unified), relative."""
    text = _read(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if (version == 2 and ctrls == "") or (version == 1 and "cpuacct" in ctrls.split(",")):
            return path.strip("/")
    return None


def _int(doc: Any, key: str, lo: int = 0) -> int:
    v = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_BYTES:
        raise ValueError(f"{key}: {v!r}")
    return v


def to_sandbox(sid: str, doc: Any, offline: bool, seen_at: float) -> SandboxMemory:
    """A GET /colo/memory document → SandboxMemory (ValueError when malformed)."""
    if not isinstance(doc, dict):
        raise ValueError(f"not a JSON object: {str(doc)[:40]}")
    target, actual, floor = _int(doc, "target_bytes", 1), _int(doc, "actual_bytes"), _int(doc, "floor_bytes")
    maximum = _int(doc, "max_bytes", 1)
    guest = doc.get("guest")
    available = guest.get("available_bytes") if isinstance(guest, dict) else None
    ok = isinstance(available, int) and not isinstance(available, bool) and 0 <= available <= MAX_BYTES
    return SandboxMemory(sid, target, actual, min(floor, maximum), maximum, available if ok else None,
                         doc.get("resizing_to") is not None, offline, seen_at)


class SandboxPoller:
    """The latest memory view of every sandbox under ``root`` (one background refresh at a time)."""

    def __init__(self, root: str, offline_groups: Callable[[], Sequence[str]], cgroup_version: int,
                 timeout: float = 2.0) -> None:
        self.root = root
        self.offline_groups = offline_groups
        self.version = cgroup_version
        self.timeout = timeout
        self.latest: dict[str, SandboxMemory] = {}
        self.errors: dict[str, str] = {}

    def is_offline(self, pid: Any) -> bool:
        if not isinstance(pid, int) or pid <= 0:
            return False
        group = vmm_cgroup(pid, self.version)
        return group is not None and any(cgpath.under(group, t) for t in self.offline_groups())

    async def refresh(self) -> dict[str, SandboxMemory]:
        ids = client.list_sandboxes(self.root)

        async def one(sid: str) -> tuple[str, Any]:
            async with client.ShimClient(client.socket_of(sid, self.root), timeout=self.timeout,
                                         sandbox_id=sid) as c:
                try:
                    return sid, await c.json("GET", "/colo/memory")
                except KataColoError as exc:
                    return sid, exc

        found: dict[str, SandboxMemory] = {}
        errors: dict[str, str] = {}
        for sid, doc in await asyncio.gather(*(one(s) for s in ids)):
            if isinstance(doc, Exception):
                errors[sid] = str(doc)
                continue
            try:
                offline = self.is_offline(doc.get("vmm_pid") if isinstance(doc, dict) else None)
                found[sid] = to_sandbox(sid, doc, offline, time.monotonic())
            except ValueError as exc:
                errors[sid] = f"malformed memory document: {exc}"
        for sid, why in errors.items():
            if self.errors.get(sid) != why:
                log.debug("memory: sandbox %s left out: %s", sid[:12], why)
        self.latest, self.errors = found, errors
        return found
