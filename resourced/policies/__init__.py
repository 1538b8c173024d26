"""Policy registry: name (= the policy file's table) → class. One line per policy."""
from __future__ import annotations

from resourced.policies.base import Policy
from resourced.policies.cpu import CpuPolicy
from resourced.policies.memory import MemoryPolicy

REGISTRY: dict[str, type[Policy]] = {CpuPolicy.name: CpuPolicy, MemoryPolicy.name: MemoryPolicy}

__all__ = ["REGISTRY", "Policy"]
