"""``/run/kata-colo/resources.json``: what this VM has, for the jobs running in it.

A batch job agent inside a container reads it (the directory is bind-mounted read-only into
every container at the same path, :mod:`agent_api.agent.spec`) to adapt how many jobs it runs.
Rewritten atomically (temp file + rename in the same directory) whenever the vCPU priorities
change, the host resizes the memory (``SetMemory``) or memory blocks come or go::

    {"version": 1, "updated_at": "2025-01-01T00:00:00+00:00",
     "vcpus": {"online": [0, 1, 2, 3], "priorities": {"high": [0, 1], "low": [2, 3]}},
     "memory": {"total_bytes": ..., "available_bytes": ...,      # the guest now (/proc/meminfo)
                "usable_bytes": ..., "target_bytes": ...,        # the host: reached, aimed for
                "max_bytes": ..., "floor_bytes": ..., "mechanisms": ["virtio-mem", "balloon"]}}

Host-given values are validated (sizes are non-negative integers below 2^50, mechanisms a
short list of known names) before they are written.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from agent_api.agent.colo import parse_cpu_list
from agent_api.agent.memory_hotplug import meminfo
from common.errors import InvalidArgument

log = logging.getLogger(__name__)

RUN_DIR = "/run/kata-colo"
FILE_NAME = "resources.json"
ONLINE_CPUS = "/sys/devices/system/cpu/online"
MAX_BYTES = 1 << 50
MECHANISMS = ("virtio-mem", "dimm", "balloon")
HOST_KEYS = ("usable_bytes", "target_bytes", "max_bytes", "floor_bytes")


def _online(path: str) -> list[int]:
    try:
        with open(path) as f:
            return parse_cpu_list(f.read())
    except (OSError, ValueError):
        return []


def check_memory(state: Mapping[str, Any]) -> dict[str, Any]:
    """The host's memory state, validated (InvalidArgument names the bad field)."""
    out: dict[str, Any] = {}
    for key in HOST_KEYS:
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_BYTES:
            raise InvalidArgument(f"memory {key} must be a size in bytes, not {str(value)[:32]!r}")
        out[key] = value
    mechanisms = list(state.get("mechanisms", []))
    if len(mechanisms) > len(MECHANISMS) or any(m not in MECHANISMS for m in mechanisms):
        raise InvalidArgument(f"memory mechanisms must be among {MECHANISMS}, not {mechanisms[:4]!r}")
    out["mechanisms"] = mechanisms
    return out


class GuestResources:
    """The file's content and its writer (thread-safe: the writer runs in worker threads)."""

    def __init__(self, run_dir: str = RUN_DIR, *, online_path: str = ONLINE_CPUS,
                 meminfo_path: str = "/proc/meminfo") -> None:
        self.path = os.path.join(run_dir, FILE_NAME)
        self.online_path = online_path
        self.meminfo_path = meminfo_path
        self.priorities: dict[str, list[int]] = {}
        self.memory: dict[str, Any] = {}
        self._lock = threading.Lock()

    def set_priorities(self, mapping: Mapping[str, list[int]]) -> None:
        with self._lock:
            self.priorities = {k: sorted(v) for k, v in mapping.items()}
        self.write()

    def set_memory(self, state: Mapping[str, Any]) -> None:
        checked = check_memory(state)
        with self._lock:
            self.memory = checked
        self.write()

    def document(self) -> dict[str, Any]:
        info = meminfo(self.meminfo_path)
        with self._lock:
            memory = {"total_bytes": info.total, "available_bytes": info.available, **self.memory}
            priorities = {k: list(v) for k, v in sorted(self.priorities.items())}
        return {"version": 1, "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "vcpus": {"online": _online(self.online_path), "priorities": priorities},
                "memory": memory}

    def write(self) -> None:
        """Replace the file atomically (never a half-written file for a reader)."""
        text = json.dumps(self.document(), sort_keys=True) + "\n"
        with self._lock:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            tmp = f"{self.path}.tmp.{os.getpid()}.{threading.get_ident()}"
            try:
                with open(tmp, "w") as f:
                    f.write(text)
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def refresh(self) -> None:
        """Rewrite with the guest's current memory (after memory blocks came or went)."""
        self.write()

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
