"""The shim's state.json: what the ``delete`` command needs after the serving shim died.

Lives in ``<root>/<sandbox-id>/state.json`` (root ``/run/kata-colo/sbs``), written atomically
(temp file + fsync + rename) after every change of the container set. The backend's own
JSON-able data rides along under ``backend``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.ids import check_id

STATE_ROOT = "/run/kata-colo/sbs"
STATE_FILE = "state.json"
VERSION = 1


@dataclass
class ContainerRecord:
    id: str
    bundle: str
    pid: int = 0
    status: str = "created"


@dataclass
class ShimState:
    sandbox_id: str
    namespace: str
    shim_pid: int
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShimState:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise ValueError(f"unsupported state.json version {raw.get('version')!r}")
        containers = {k: ContainerRecord(**v) for k, v in (raw.get("containers") or {}).items()}
        return cls(sandbox_id=raw["sandbox_id"], namespace=raw["namespace"],
                   shim_pid=int(raw["shim_pid"]), containers=containers,
                   backend=dict(raw.get("backend") or {}))


def state_dir(sandbox_id: str, root: str | os.PathLike[str] = STATE_ROOT) -> Path:
    return Path(root) / check_id(sandbox_id, "sandbox id")


def save(directory: Path, state: ShimState) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load(directory: Path) -> ShimState | None:
    """The saved state, or None when there is none (or it is unreadable)."""
    try:
        return ShimState.from_json((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def remove(directory: Path) -> None:
    try:
        (directory / STATE_FILE).unlink()
    except FileNotFoundError:
        pass
