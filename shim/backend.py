"""The contract between the Task service and whatever actually runs containers.

The task service (:mod:`shim.task_service`) owns the *shim semantics* that containerd relies on
(the process table, status transitions, runc-compatible error codes, exit bookkeeping, event
order, persistence of the shim's own state). A :class:`Backend` owns the *mechanism*: building
the sandbox, creating/starting/signalling processes and reporting how they ended. The product
backend is ``shim.sandbox:SandboxBackend`` (one VM per sandbox); tests plug in
``tests.fakes.host_process_backend:HostProcessBackend`` (plain host processes).

Rules every backend follows:

* No protobuf crosses this boundary: arguments and results are the dataclasses below.
* Errors are raised from :mod:`common.errors` (``NotFound``, ``FailedPrecondition``,
  ``Unavailable``, ``Internal`` ...); the ttrpc server maps them to status codes.
* Calls for *different* processes may run concurrently; the task service never calls
  ``create``/``start``/``delete`` for the same process concurrently.
* ``wait`` is called at most once per process (by the task service's exit watcher) and must
  return the exit even if the process exited before ``wait`` was called.
* The task service mounts ``opts.rootfs`` on ``<bundle>/rootfs`` before ``create`` (as runc's
  shim does) and unmounts it after the init process's ``delete``; the mounts are passed for
  information (a VM backend may prefer to hot-plug the block device instead).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Mount:
    """One containerd mount (containerd.types.Mount)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stdio:
    """containerd's stdio URIs for one process.

    Empty strings mean "no stream". A value without a scheme is a FIFO path; ``file:///p``
    means append to a file; ``binary:///path?k=v`` means a logging binary (fds 3, 4, 5).
    """

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @property
    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


@dataclass(frozen=True)
class CreateOpts:
    """Create the init process of container ``id`` (CreateTaskRequest).

    ``spec`` is the parsed OCI runtime spec read from ``<bundle>/config.json``;
    ``sandbox_id`` is the group the container belongs to (equal to ``id`` for the sandbox
    container itself). ``config_path`` comes from the CRI runtime options (may be empty).
    """

    id: str
    bundle: str
    spec: dict[str, Any]
    stdio: Stdio
    rootfs: tuple[Mount, ...] = ()
    sandbox_id: str = ""
    config_path: str = ""
    checkpoint: str = ""

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.spec.get("annotations") or {})

    @property
    def is_sandbox(self) -> bool:
        """True for the pod's first container (CRI sandbox or a plain ``ctr run`` task)."""
        kind = self.annotations.get("io.kubernetes.cri.container-type", "")
        return kind == "sandbox" or (kind == "" and self.sandbox_id in ("", self.id))


@dataclass(frozen=True)
class ExecOpts:
    """Add exec process ``exec_id`` to container ``id``; ``spec`` is the OCI Process JSON."""

    id: str
    exec_id: str
    spec: dict[str, Any]
    stdio: Stdio


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended. ``status`` is the wait status as containerd expects it:
    the exit code, or 128 + signal number when it was killed by a signal."""

    status: int
    exited_at: datetime


@dataclass(frozen=True)
class ProcessPid:
    """One host-visible pid of a container (PidsResponse entry); ``exec_id`` empty for init."""

    pid: int
    exec_id: str = ""


@dataclass(frozen=True)
class Stats:
    """Container resource usage, converted to io.containerd.cgroups.v1.Metrics.

    All fields are optional (0 = not reported). CPU in nanoseconds, memory in bytes.
    """

    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_kernel_ns: int = 0
    memory_usage: int = 0
    memory_limit: int = 0
    memory_rss: int = 0
    memory_cache: int = 0
    memory_inactive_file: int = 0
    pg_fault: int = 0
    pg_maj_fault: int = 0
    pids_current: int = 0
    pids_limit: int = 0


@dataclass
class BackendContext:
    """What a backend gets at construction (``factory(ctx)``).

    ``state_dir`` is ``/run/kata-colo/sbs/<sandbox_id>`` (created, the backend may keep its own
    files there next to the task service's ``state.json``); ``on_oom(container_id)`` publishes
    /tasks/oom (thread-safe only from the event loop thread).
    """

    namespace: str
    sandbox_id: str
    state_dir: str
    config_path: str = ""
    ttrpc_address: str = ""
    debug: bool = False
    on_oom: Callable[[str], None] = lambda _cid: None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Runs the containers of ONE sandbox (the shim serves exactly one group/sandbox)."""

    async def create(self, opts: CreateOpts) -> int:
        """Create (do not start) the init process of ``opts.id``; return a stable non-zero
        host pid to report (kata reports the hypervisor pid). The first call creates the
        sandbox itself."""
        ...

    async def start(self, container_id: str, exec_id: str) -> int:
        """Start the init process (``exec_id == ""``) or an exec added by :meth:`exec`;
        return its pid."""
        ...

    async def exec(self, opts: ExecOpts) -> None:
        """Register (do not start) an exec process in a running container."""
        ...

    async def wait(self, container_id: str, exec_id: str) -> ExitInfo:
        """Block until the process exits and return how (called once per process)."""
        ...

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        """Send ``signal``; ``all`` signals every process of the container.
        Raise ``NotFound`` if the process is already gone."""
        ...

    async def delete(self, container_id: str, exec_id: str) -> None:
        """Release everything held for the (exited) process; for the init process also the
        container (and the VM/sandbox when it was the last container). Idempotent."""
        ...

    async def pids(self, container_id: str) -> list[ProcessPid]:
        """Host-visible pids of the container's processes."""
        ...

    async def pause(self, container_id: str) -> None:
        ...

    async def resume(self, container_id: str) -> None:
        ...

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        ...

    async def close_io(self, container_id: str, exec_id: str) -> None:
        """Close the process's stdin (after containerd closed its end)."""
        ...

    async def update(self, container_id: str, resources: dict[str, Any],
                     annotations: dict[str, str]) -> None:
        """Apply OCI LinuxResources (parsed JSON) to a running container."""
        ...

    async def stats(self, container_id: str) -> Stats:
        ...

    async def shutdown(self) -> None:
        """The shim is exiting and no container remains: stop the sandbox, release all."""
        ...

    def persist_data(self) -> dict[str, Any]:
        """JSON-able data saved in state.json under ``backend``; handed back to
        :meth:`cleanup_after_crash` by the ``delete`` command after a shim crash."""
        ...

    async def cleanup_after_crash(self, container_id: str, bundle: str,
                                  persisted: dict[str, Any] | None) -> None:
        """Called from the ``delete`` command (a fresh process, the shim is gone or no longer
        knows the id): release what ``persisted`` says belongs to ``container_id`` (and the
        whole sandbox when ``container_id`` is the sandbox). Idempotent; must not raise for
        things already gone; must finish in well under 5 s."""
        ...


BackendFactory = Callable[[BackendContext], Backend]

