"""`containerd-shim-kata-colo-v2`: the containerd runtime v2 shim binary (docs/protocols.md §1).

    <shim> -namespace NS -address A -publish-binary B -id ID [-debug] [-bundle B] start|delete

``start`` binds the group's socket (or finds the group's live shim), forks the serving daemon
(its own session, stdio on /dev/null, the listening socket as fd 3: the child of a fork
needs no second interpreter start-up and imports what serving needs while containerd reads the
address), writes ``address`` and prints it. Only ``start`` runs on containerd's critical path
before the socket answers, so this module imports nothing heavy at the top (asyncio, protobuf
and the task service load inside ``serve``/``delete``). ``delete``
releases what persisted state and the sandbox's resource journal say belongs to one id and
prints a DeleteResponse. ``serve`` is the daemon (internal) and the composition root: it builds
the one backend (the product's :class:`shim.sandbox.containers.ContainerOps` around its
:class:`~shim.sandbox.sandbox.Sandbox`) that the Task service and the management server share.
Tests inject their backend by calling :func:`main` with ``backend_factory`` from a wrapper in
tests/fakes/.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim import bootstrap

if TYPE_CHECKING:
    import socket

    from shim.backend import Backend, BackendContext, BackendFactory

log = logging.getLogger("shim")
DEFAULT_BACKEND = "shim.sandbox.containers:ContainerOps"
LISTEN_FD = 3
_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "config-path",
                "group"}
_BOOL_FLAGS = {"debug", "v"}


@dataclass
class Args:
    action: str = ""
    namespace: str = "default"
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    config_path: str = ""
    group: str = ""
    debug: bool = False
    exec_time: float = 0.0  # when `start` was exec'd (wall clock): logged by serve
    version: bool = False
    extra: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Args:
    """Go `flag` style: -name value, -name=value, --name value; bool flags take no value."""
    a = Args()
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-") and tok != "-":
            name, eq, value = tok.lstrip("-").partition("=")
            if name in _BOOL_FLAGS:
                on = value.lower() not in ("false", "0") if eq else True
                if name == "debug":
                    a.debug = on
                else:
                    a.version = on
            elif name in _VALUE_FLAGS:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise SystemExit(f"flag needs an argument: -{name}")
                    value = argv[i]
                setattr(a, name.replace("-", "_"), value)
            else:
                raise SystemExit(f"flag provided but not defined: -{name}")
        elif not a.action:
            a.action = tok
        else:
            a.extra.append(tok)
        i += 1
    return a


def _load_factory(backend_factory: BackendFactory | None) -> BackendFactory:
    if backend_factory is not None:
        return backend_factory

    def product(ctx: BackendContext) -> Backend:
        import importlib

        from common.errors import Unavailable

        module, _, attr = DEFAULT_BACKEND.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"VM sandbox backend not available: {exc}") from exc
        return cls.from_context(ctx)

    return product


# --- start -----------------------------------------------------------------------------------

def cmd_start(args: Args, factory: BackendFactory) -> int:
    bundle = args.bundle or os.getcwd()
    spec = bootstrap.read_bundle_spec(bundle)
    group = bootstrap.group_id(spec, args.id)
    path = args.socket.removeprefix("unix://") or bootstrap.socket_path(args.address, args.namespace, group)
    address = f"unix://{path}"
    sock = bootstrap.bind_or_reuse(path)
    if sock is None:  # the group's shim is already serving
        bootstrap.write_address(bundle, address)
        print(address, end="")
        return 0
    raw_opts = b""
    with contextlib.suppress(OSError, ValueError):
        if not sys.stdin.isatty():
            raw_opts = sys.stdin.buffer.read()
    config_path = ""
    if raw_opts:
        from shim import convert

        try:
            config_path = convert.runtime_config_path(raw_opts)
        except Exception:  # noqa: BLE001 - garbage options: default config (stdout/stderr carry only the address)
            config_path = ""
    serve_args = Args(action="serve", namespace=args.namespace, address=args.address,
                      publish_binary=args.publish_binary, id=args.id, bundle=bundle, group=group,
                      config_path=config_path, debug=args.debug, exec_time=_exec_time())
    sys.stdout.flush()
    try:
        pid = os.fork()
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    if pid == 0:  # the serving daemon
        code = 1
        try:
            _become_daemon(sock, bundle)
            code = cmd_serve(serve_args, factory)
        except BaseException:  # noqa: BLE001 - the daemon's last word goes to its log
            log.exception("shim daemon failed")
        finally:
            os._exit(code)
    sock.close()
    try:
        bootstrap.write_pid(bundle, pid)
        bootstrap.write_address(bundle, address)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        raise
    print(address, end="")
    return 0


def _exec_time() -> float:
    """When this process was exec'd, on the wall clock (10 ms resolution; 0 if unknown)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    import time

    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _become_daemon(sock: socket.socket, bundle: str) -> None:
    """In the forked child: own session, stdio on /dev/null (containerd reads start's stdout
    until every writer closed it), the listening socket as fd 3, cwd the bundle."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    fd = sock.detach()
    if fd != LISTEN_FD:
        os.dup2(fd, LISTEN_FD)
        os.close(fd)
    os.set_inheritable(LISTEN_FD, False)
    os.chdir(bundle)


# --- delete ----------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    """A running (not zombie) process. A killed shim re-parented to a pid 1 that reaps late
    stays a zombie for a while: it serves nothing and must count as dead here."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _cleanup(args: Args, factory: BackendFactory, bundle: str) -> None:
    import asyncio
    import shutil

    from shim import persist
    from shim.backend import BackendContext

    spec = bootstrap.read_bundle_spec(bundle)
    group = bootstrap.group_id(spec, args.id)
    sdir = persist.state_dir(group)
    state = persist.load(sdir)
    if state is not None and _pid_alive(state.shim_pid) and state.shim_pid != os.getpid() \
            and args.id in state.containers:
        log.info("delete %s: shim %d is alive and owns it; nothing to do", args.id, state.shim_pid)
        return
    ctx = BackendContext(namespace=args.namespace, sandbox_id=group, state_dir=str(sdir),
                         config_path=args.config_path, debug=args.debug)
    backend = factory(ctx)
    await asyncio.wait_for(backend.cleanup_after_crash(args.id, bundle, state.backend if state else None), 4.5)
    if state is not None and args.id in state.containers:
        del state.containers[args.id]
        if state.containers:
            persist.save(sdir, state)
            return
    if state is None or not state.containers:
        # No shim serves this group any more (it removes state.json only when it exits with
        # no container left): the group's state dir (logs, sockets) goes too, and so does the
        # listening socket a killed shim could not remove.
        shutil.rmtree(sdir, ignore_errors=True)
        sock = bootstrap.socket_path(args.address, args.namespace, group)
        if os.path.exists(sock) and not bootstrap.is_serving(sock, timeout=0.5):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)


def cmd_delete(args: Args, factory: BackendFactory) -> int:
    import asyncio
    import signal
    from datetime import UTC, datetime

    from proto.containerd.task.v2 import shim_pb2
    from shim import convert

    bundle = args.bundle or os.getcwd()
    try:
        from shim import rootfs

        rootfs.unmount_all(Path(bundle) / "rootfs")
        asyncio.run(_cleanup(args, factory, bundle))
    except Exception:  # noqa: BLE001 - delete must answer; what failed is logged
        log.exception("delete %s: cleanup failed", args.id)
    resp = shim_pb2.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL)
    convert.datetime_to_ts(datetime.now(UTC), resp.exited_at)
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


# --- serve -----------------------------------------------------------------------------------

async def serve(args: Args, factory: BackendFactory, sock: socket.socket) -> None:
    import asyncio
    import importlib
    import signal
    import time

    from proto.containerd.task.v2 import shim_pb2
    from shim.events import EventPublisher
    from shim.mgmt.metrics import timed_service
    from shim.task_service import TaskService
    from ttrpc import Server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGPIPE, lambda: None)
    publisher = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
    publisher.start()
    service = TaskService(namespace=args.namespace, sandbox_id=args.group or args.id,
                          backend_factory=factory, publisher=publisher, config_path=args.config_path,
                          ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""), debug=args.debug,
                          on_shutdown=stop.set)
    rpc_times = _late_histogram()
    server = Server()
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], timed_service(service, rpc_times))
    await server.start_unix(sock=sock)
    path = sock.getsockname()
    since = f", {(time.time() - args.exec_time) * 1e3:.0f} ms after `start` was exec'd" if args.exec_time else ""
    log.info("serving sandbox %s on %s (pid %d%s)", service.sandbox_id, path, os.getpid(), since)
    mgmt: list[Any] = []

    async def start_mgmt() -> None:
        # aiohttp costs ~0.2 s to import: off the event loop, while containerd's first Create is
        # served (the management socket is not on containerd's critical path)
        await asyncio.to_thread(importlib.import_module, "shim.mgmt.server")
        from shim.mgmt.server import write_monitor_address

        server_ = _mgmt_server(args, service)
        mgmt.append(server_)
        rpc_times.attach(server_.task_rpc)
        try:
            await server_.start()
            write_monitor_address(args.bundle or os.getcwd(), server_.address)
        except Exception:  # noqa: BLE001 - the Task API serves without the management socket
            log.exception("management socket %s not started", server_.path)

    mgmt_task = asyncio.create_task(start_mgmt(), name="mgmt-start")
    try:
        await stop.wait()
    finally:
        mgmt_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await mgmt_task
        for m in mgmt:
            await m.close()
        await server.close()
        await service.close()
        await publisher.close()
        if isinstance(path, str) and path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.info("shim exiting")


def _late_histogram() -> Any:
    from shim.mgmt.metrics import Histogram

    class LateHistogram(Histogram):
        """The Task RPC duration histogram until the management server (which owns the real
        one) exists: observations are kept and handed over on :meth:`attach`."""

        def __init__(self) -> None:
            super().__init__("early", "")
            self._target: Any = None
            self._early: list[tuple[str, float]] = []

        def observe(self, label: str, milliseconds: float) -> None:
            if self._target is None:
                self._early.append((label, milliseconds))
            else:
                self._target.observe(label, milliseconds)

        def attach(self, target: Any) -> None:
            self._target = target
            for label, ms in self._early:
                target.observe(label, ms)
            self._early = []

    return LateHistogram()


def _mgmt_server(args: Args, service: Any) -> Any:
    """The management server (shim.mgmt) over the Task service's sandbox handle and table."""
    from shim import config
    from shim.mgmt.server import MgmtServer

    try:
        cfg = config.load(args.config_path or None)
        admin_gid, debug_console = cfg.runtime.admin_gid, cfg.agent.debug_console_enabled
    except Exception:  # noqa: BLE001 - reported by Create; management stays root-only meanwhile
        admin_gid, debug_console = 0, False
    return MgmtServer(sandbox_id=service.sandbox_id, state_dir=str(service.state_dir),
                      sandbox=getattr(service.backend, "sandbox", None), table=service.table,
                      admin_gid=admin_gid, debug_console_enabled=debug_console)


def _config_debug(config_path: str) -> bool:
    """``[runtime] enable_debug`` of the configuration this shim will use (False when it does
    not read: the first Create validates the file and reports why). Only the TOML is read here,
    on the daemon's start path."""
    import tomllib

    from shim import config

    try:
        path = config.resolve_path(config_path or None)
        raw = tomllib.loads(path.read_text()) if path is not None else {}
        return raw.get("runtime", {}).get("enable_debug") is True
    except Exception:  # noqa: BLE001 - reported by Create, not here
        return False


def cmd_serve(args: Args, factory: BackendFactory) -> int:
    import asyncio
    import socket

    from shim import log as shim_log
    from shim import persist

    sock = socket.socket(fileno=LISTEN_FD)
    group = args.group or args.id
    args.debug = args.debug or _config_debug(args.config_path)
    shim_log.setup(debug=args.debug, bundle_log=str(Path(args.bundle or ".") / "log"),
                   log_file=persist.state_dir(group) / "shim.log")
    asyncio.run(serve(args, factory, sock))
    return 0


def main(argv: list[str] | None = None, backend_factory: BackendFactory | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from common.version import VERSION

        print(f"containerd-shim-kata-colo-v2 (kata-colo) {VERSION}")
        return 0
    factory = _load_factory(backend_factory)
    if args.action == "start":
        return cmd_start(args, factory)
    if args.action == "delete":
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
        return cmd_delete(args, factory)
    if args.action == "serve":
        return cmd_serve(args, factory)
    print(f"usage: {sys.argv[0]} [flags] start|delete", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
