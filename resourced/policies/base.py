"""What every policy shares: the node sample it decides on, the actions it may return, and
the :class:`Policy` protocol the daemon drives (one sampling loop for all policies).

A policy is pure in its decisions: :meth:`Policy.decide` maps a sample (plus the policy's own
remembered state) to actions; it performs no I/O. The daemon's actuator carries actions out
(or, with ``--dry-run``, only logs them). A new policy (as memory did) adds a module with a class
implementing the protocol and one line in :data:`resourced.policies.REGISTRY`; it reads its own
``[<name>]`` table of the policy file and, when it needs more than CPU numbers, a field of
:class:`NodeSample` filled by its sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from resourced.policyfile import Table
from resourced.sampler import CpuSample


@dataclass(frozen=True)
class Features:
    """Kernel features detected at start (resourced.features)."""

    cpu_idle: bool = False
    cfs_burst: bool = False
    group_identity: bool = False          # Alibaba Cloud Linux cpu.bvt_warp_ns
    memory_wmark: bool = False            # Alibaba Cloud Linux memory.wmark_ratio & co
    cgroup_version: int = 1


@dataclass(frozen=True)
class NodeSample:
    t: float
    cpu: CpuSample
    extra: Any = None  # room for other samplers (memory)


@dataclass(frozen=True)
class Action:
    """Base of every knob change; ``reason`` is logged with it."""

    reason: str

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class SetCpuset(Action):
    groups: tuple[str, ...]
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class SetQuota(Action):
    groups: tuple[str, ...]
    quota_us: int          # -1 = unlimited
    period_us: int


@dataclass(frozen=True)
class SetBurst(Action):
    group: str
    burst_us: int


@dataclass(frozen=True)
class WriteKnob(Action):
    group: str
    filename: str
    value: str


@dataclass(frozen=True)
class EvictPod(Action):
    """Stop the lowest-priority offline pod (the daemon picks it through CRI)."""


class Policy(Protocol):
    name: ClassVar[str]

    @classmethod
    def from_table(cls, table: Table) -> Policy:
        """Parse and validate ``[<name>]`` (raise table.error(key, reason) on bad input)."""

    def setup(self, features: Features, online: list[str], offline: list[str]) -> list[Action]:
        """Actions once at start (e.g. group identity on the tiers)."""

    def decide(self, sample: NodeSample) -> list[Action]:
        """Actions for this sample (pure: no I/O)."""

    def release(self, online: list[str], offline: list[str], node_cpus: tuple[int, ...]) -> list[Action]:
        """Actions that give everything back when the daemon stops."""

    def gauges(self) -> dict[str, float]:
        """The policy's current numbers, exported as metrics."""
