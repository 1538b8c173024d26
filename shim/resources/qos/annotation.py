"""The vCPU priority annotation and the mapping handed to the guest.

``io.katacontainers.colo.vcpu-priorities = "high:2,low:2"`` assigns vCPUs in order: 0–1 high,
2–3 low. :func:`parse_vcpu_priorities` turns it into one priority name per vCPU index.

Guest file ``/run/kata-colo/vcpu-priorities.json`` (rendered by :func:`render_guest_json`)::

    {"version": 1,
     "priorities": {"high": [0, 1], "low": [2, 3]},   # priority → guest vCPU indices (sorted)
     "vcpus": ["high", "high", "low", "low"],         # vCPU index → priority
     "order": ["low", "high"]}                        # priority names, most best-effort first

The in-guest agent creates one cpuset group per key of "priorities" holding exactly those
CPUs and places containers by ``io.katacontainers.colo.container-priority``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence

from common.errors import ConfigError

ANNOTATION = "io.katacontainers.colo.vcpu-priorities"
GUEST_PATH = "/run/kata-colo/vcpu-priorities.json"
_ITEM = re.compile(r"([a-z0-9][a-z0-9-]{0,31}):(-?\d+)")


def parse_vcpu_priorities(value: str | None, vcpus: int, known: Iterable[str],
                          default: str | None = None) -> list[str]:
    """"high:2,low:2" → ["high", "high", "low", "low"].

    ``known`` are the configured priority names, ``vcpus`` the sandbox's vCPU count. An absent or
    empty annotation puts every vCPU in ``default`` (ConfigError when no default is given).
    """
    known_set = set(known)
    if vcpus < 1:
        raise ConfigError(f"{ANNOTATION}: sandbox has {vcpus} vCPUs")
    if value is None or not value.strip():
        if default is None:
            raise ConfigError(f"{ANNOTATION} is empty and no default priority is configured")
        if default not in known_set:
            raise ConfigError(f"{ANNOTATION}: default priority {default!r} is not configured")
        return [default] * vcpus
    result: list[str] = []
    seen: set[str] = set()
    for raw in value.split(","):
        item = raw.strip()
        m = _ITEM.fullmatch(item)
        if not m:
            raise ConfigError(f"{ANNOTATION}={value!r}: bad item {item!r}, expected "
                              f"'<priority>:<count>' items separated by commas (e.g. 'high:2,low:2')")
        name, count = m.group(1), int(m.group(2))
        if name not in known_set:
            raise ConfigError(f"{ANNOTATION}={value!r}: unknown priority {name!r}; "
                              f"configured priorities: {sorted(known_set)}")
        if name in seen:
            raise ConfigError(f"{ANNOTATION}={value!r}: priority {name!r} listed twice")
        if count < 1:
            raise ConfigError(f"{ANNOTATION}={value!r}: count for {name!r} must be >= 1, not {count}")
        seen.add(name)
        result.extend([name] * count)
    if len(result) != vcpus:
        raise ConfigError(f"{ANNOTATION}={value!r} names {len(result)} vCPUs but the sandbox has {vcpus}")
    return result


def priority_map(assignment: Mapping[int, str] | Sequence[str]) -> dict[str, list[int]]:
    """vCPU → priority (dict or list by index) → {priority: sorted vCPU indices}."""
    items = assignment.items() if isinstance(assignment, Mapping) else enumerate(assignment)
    out: dict[str, list[int]] = {}
    for vcpu, prio in sorted(items):
        out.setdefault(prio, []).append(vcpu)
    return out


def render_guest_json(assignment: Mapping[int, str] | Sequence[str],
                      order: Sequence[str] = ()) -> str:
    """Content of /run/kata-colo/vcpu-priorities.json (see module docstring)."""
    items = dict(assignment.items() if isinstance(assignment, Mapping) else enumerate(assignment))
    pmap = priority_map(items)
    n = max(items) + 1 if items else 0
    doc = {
        "version": 1,
        "priorities": pmap,
        "vcpus": [items.get(i) for i in range(n)],
        "order": [p for p in order if p in pmap] or sorted(pmap),
    }
    return json.dumps(doc, sort_keys=True)
