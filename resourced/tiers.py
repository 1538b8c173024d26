"""Online and offline tiers: configured cgroup paths (``*``/``?`` globs per component) → the
groups that exist now, in the hierarchy that accounts CPU (v1 cpuacct, v2 unified).

A group listed twice, or lying below another listed group of the same tier, counts once (the
top-most), so usage is never double-counted. Offline vCPU threads are the tasks of every
``vcpu-*`` group below an offline tier (the request the CPU satisfaction is measured against).
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_WALK_DEPTH = 6


@dataclass(frozen=True)
class Tiers:
    online: tuple[str, ...]
    offline: tuple[str, ...]

    def overlap(self) -> list[str]:
        return sorted(set(self.online) & set(self.offline))


def _children(base: str, rel: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(os.path.join(base, rel)) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def expand(base: str, patterns: Iterable[str]) -> list[str]:
    """Existing groups (relative to the hierarchy mount ``base``) matching ``patterns``,
    top-most only, sorted."""
    found: set[str] = set()
    for pattern in patterns:
        parts = [p for p in pattern.strip("/").split("/") if p]
        level = [""]
        for part in parts:
            nxt: list[str] = []
            for rel in level:
                if any(c in part for c in "*?["):
                    nxt.extend(f"{rel}/{c}".strip("/") for c in _children(base, rel) if fnmatch.fnmatchcase(c, part))
                elif os.path.isdir(os.path.join(base, rel, part)):
                    nxt.append(f"{rel}/{part}".strip("/"))
            level = nxt
        found.update(r for r in level if r)
    return sorted(g for g in found if not any(g.startswith(o + "/") for o in found if o != g))


def walk(base: str, rel: str, depth: int = MAX_WALK_DEPTH) -> list[str]:
    """``rel`` and every group below it (pre-order, parents before children)."""
    out = [rel]
    if depth > 0:
        for c in _children(base, rel):
            out.extend(walk(base, f"{rel}/{c}", depth - 1))
    return out


def vcpu_groups(base: str, roots: Sequence[str]) -> list[str]:
    return [g for r in roots for g in walk(base, r) if os.path.basename(g).startswith("vcpu-")]
