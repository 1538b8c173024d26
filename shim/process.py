"""The task service's process table: containers, their init and exec processes, statuses and
exit bookkeeping, and the one table of which operation is legal in which status (containerd's
init_state.go: an illegal transition fails here, with runc's error code). Pure state (no I/O,
no protobuf); the task service drives it."""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

from common.errors import AlreadyExists, FailedPrecondition, NotFound
from shim.backend import ExitInfo, Stdio


class Status(enum.IntEnum):
    """Same numbering as containerd.v1.types.Status."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


class Op(enum.Enum):
    START = "start"
    DELETE = "delete"
    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"
    RESIZE_PTY = "resize the pty of"
    EXEC = "exec in"


_ANY_LIVE = frozenset({Status.CREATED, Status.RUNNING, Status.PAUSING, Status.PAUSED})
#: operation → the statuses it is legal in (for an init process; execs differ only for KILL)
ALLOWED: dict[Op, frozenset[Status]] = {
    Op.START: frozenset({Status.CREATED}),
    Op.DELETE: frozenset({Status.CREATED, Status.STOPPED}),
    Op.KILL: _ANY_LIVE,
    Op.PAUSE: frozenset({Status.RUNNING}),
    Op.RESUME: frozenset({Status.PAUSED}),
    Op.RESIZE_PTY: _ANY_LIVE,
    Op.EXEC: _ANY_LIVE,
}
#: operations that find an exited process gone (runc: "process already finished" is NotFound)
_GONE_WHEN_STOPPED = frozenset({Op.KILL, Op.RESIZE_PTY})


@dataclass
class Process:
    container_id: str
    exec_id: str
    bundle: str
    stdio: Stdio
    pid: int = 0
    status: Status = Status.CREATED
    exit: ExitInfo | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self.status is not Status.CREATED

    @property
    def name(self) -> str:
        return self.exec_id or self.container_id

    def require(self, op: Op) -> None:
        """Raise the runc-compatible error when ``op`` is illegal in the current status."""
        allowed = ALLOWED[op]
        if op is Op.KILL and self.exec_id:
            allowed = allowed - {Status.CREATED}  # an exec that was never started
        if self.status in allowed:
            return
        state = self.status.name.lower()
        if self.status is Status.STOPPED and op in _GONE_WHEN_STOPPED:
            raise NotFound(f"process {self.name} already finished")
        if op is Op.START and self.status is not Status.CREATED:
            raise FailedPrecondition(f"process {self.name} already started")
        if op is Op.DELETE:
            raise FailedPrecondition(f"process {self.name} is {state}: it must be stopped before deletion")
        raise FailedPrecondition(f"cannot {op.value} process {self.name}: it is {state}")

    def set_exited(self, info: ExitInfo) -> bool:
        """Record the exit once; returns False when it was already recorded."""
        if self.exit is not None:
            return False
        self.exit = info
        self.status = Status.STOPPED
        self.exited.set()
        return True


@dataclass
class Container:
    id: str
    bundle: str
    init: Process
    rootfs_mounted: bool = False
    execs: dict[str, Process] = field(default_factory=dict)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"process {exec_id} does not exist in container {self.id}") from None

    def all_processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]


class ProcessTable:
    """Containers of this shim by id."""

    def __init__(self) -> None:
        self._containers: dict[str, Container] = {}

    def __len__(self) -> int:
        return len(self._containers)

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._containers

    def ids(self) -> list[str]:
        return list(self._containers)

    def containers(self) -> list[Container]:
        return list(self._containers.values())

    def container(self, container_id: str) -> Container:
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFound(f"container {container_id} not found") from None

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.container(container_id).process(exec_id)

    def add_container(self, container: Container) -> None:
        if container.id in self._containers:
            raise AlreadyExists(f"container {container.id} already exists")
        self._containers[container.id] = container

    def remove_container(self, container_id: str) -> None:
        self._containers.pop(container_id, None)

    def add_exec(self, container_id: str, proc: Process) -> None:
        c = self.container(container_id)
        if proc.exec_id in c.execs:
            raise AlreadyExists(f"id {proc.exec_id} already exists in container {container_id}")
        c.init.require(Op.EXEC)
        c.execs[proc.exec_id] = proc


def now() -> datetime:
    return datetime.now(UTC)
