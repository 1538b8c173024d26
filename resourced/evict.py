"""Eviction of the lowest-priority offline pod through CRI (StopPodSandbox, as kubelet's
eviction would end it; the pod's controller recreates it elsewhere).

Candidates are the ready pods whose cgroup parent lies in an offline tier (cgroupfs or systemd
spelling, resolved like the shim does). :func:`pick` is pure: the lowest
``io.katacontainers.colo.eviction-priority`` (an integer annotation, default 0) goes first, then
the most recently created.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import ConfigError
from shim.resources.podcgroup import path as cgpath

log = logging.getLogger(__name__)
PRIORITY_ANNOTATION = "io.katacontainers.colo.eviction-priority"


@dataclass(frozen=True)
class Candidate:
    pod_id: str
    name: str
    priority: int
    created_at: int


def pick(candidates: Sequence[Candidate]) -> Candidate | None:
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.priority, -c.created_at, c.pod_id))


def _priority(annotations: dict[str, str]) -> int:
    try:
        return int(annotations.get(PRIORITY_ANNOTATION, "0"), 10)
    except ValueError:
        return 0


def in_tiers(cgroup_parent: str, offline_groups: Sequence[str]) -> bool:
    if not cgroup_parent:
        return False
    try:
        if cgpath.is_systemd(cgroup_parent) or cgroup_parent.endswith(".slice"):
            parts = cgpath.expand_slice(cgroup_parent.rsplit("/", 1)[-1])
            group = "/".join(parts)
        else:
            group = cgpath.resolve(cgroup_parent) or ""
    except ConfigError:
        return False
    return any(cgpath.under(group, t) for t in offline_groups)


async def evict_lowest(endpoint: str, offline_groups: Sequence[str], dry_run: bool) -> str:
    """Stop the chosen pod; returns what was done (or would be)."""
    from cri.client import CriClient

    async with CriClient(endpoint, timeout=10.0) as cri:
        found: list[Candidate] = []
        for pod in await cri.list_pod_sandbox(ready=True):
            config = await cri.sandbox_config(pod.id)
            if in_tiers(config.linux.cgroup_parent, offline_groups):
                found.append(Candidate(pod.id, f"{pod.metadata.namespace}/{pod.metadata.name}",
                                       _priority(dict(pod.annotations)), pod.created_at))
        victim = pick(found)
        if victim is None:
            return "no offline pod to evict"
        if not dry_run:
            await cri.stop_pod_sandbox(victim.pod_id)
        verb = "would stop" if dry_run else "stopped"
        return f"{verb} pod {victim.name} ({victim.pod_id[:12]}, priority {victim.priority})"
