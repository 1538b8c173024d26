"""CriClient: async Kubernetes CRI v1 calls (runtime.v1 RuntimeService + ImageService) over
gRPC on a Unix socket, the way kubelet drives containerd's CRI plugin.

Arguments are plain Python (names, dicts, lists); results are the generated messages of
``proto/cri/runtime/v1/api.proto`` except where a plain value is the natural answer (ids,
``exec_sync``'s ``(rc, stdout, stderr)``). gRPC failures become :mod:`common.errors` classes via
:func:`common.errors.from_status` (the one status → exception mapping).

CreateContainer carries the pod's PodSandboxConfig again (containerd takes the log directory,
labels and DNS from it); the client remembers the config of every pod it started and otherwise
rebuilds it from PodSandboxStatus(verbose)'s ``info`` (containerd 1.6 stores it there).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message

from common.errors import KataColoError, from_status
from proto.cri.runtime.v1 import api_pb2 as api
from proto.cri.runtime.v1 import api_pb2_grpc as api_grpc

DEFAULT_TIMEOUT = 120.0  # a cold VM under TCG takes ~10 s; RunPodSandbox also pulls/unpacks
MAX_MESSAGE = 64 << 20  # ExecSync output is capped at 16 MiB per stream by the runtime
M = TypeVar("M", bound=Message)
# A mount as (host_path, container_path) or (host_path, container_path, readonly).
MountSpec = tuple[str, str] | tuple[str, str, bool]

RUNNING = api.CONTAINER_RUNNING
EXITED = api.CONTAINER_EXITED
SANDBOX_READY = api.SANDBOX_READY


def target(address: str) -> str:
    """``/run/x.sock``, ``unix:/run/x.sock`` or ``unix:///run/x.sock`` → a gRPC target."""
    if address.startswith("unix://"):
        return address
    if address.startswith("unix:"):
        address = address[len("unix:"):]
    return "unix://" + address


def pod_config(name: str, namespace: str = "default", uid: str = "", *, attempt: int = 0,
               hostname: str = "", log_directory: str = "", labels: Mapping[str, str] | None = None,
               annotations: Mapping[str, str] | None = None, dns_servers: Sequence[str] = (),
               dns_searches: Sequence[str] = (), cgroup_parent: str = "",
               host_network: bool = False) -> api.PodSandboxConfig:
    """A PodSandboxConfig like kubelet builds it (pod network and IPC namespaces, container
    PID namespaces); ``uid`` defaults to ``<namespace>-<name>``."""
    ns = api.NamespaceOption(network=api.NODE if host_network else api.POD, pid=api.CONTAINER,
                             ipc=api.POD)
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=uid or f"{namespace}-{name}",
                                        namespace=namespace, attempt=attempt),
        hostname=hostname or name,
        log_directory=log_directory,
        dns_config=api.DNSConfig(servers=list(dns_servers), searches=list(dns_searches))
        if dns_servers or dns_searches else None,
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        linux=api.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=api.LinuxSandboxSecurityContext(namespace_options=ns)),
    )


def container_config(name: str, image: str, *, command: Sequence[str] = (), args: Sequence[str] = (),
                     working_dir: str = "", env: Mapping[str, str] | None = None,
                     mounts: Iterable[MountSpec] = (), labels: Mapping[str, str] | None = None,
                     annotations: Mapping[str, str] | None = None, log_path: str = "",
                     tty: bool = False, stdin: bool = False, attempt: int = 0) -> api.ContainerConfig:
    """A ContainerConfig; ``log_path`` is relative to the pod's log directory (kubelet uses
    ``<name>/<attempt>.log``)."""
    cmounts = []
    for m in mounts:
        host, ctr, *rest = m
        cmounts.append(api.Mount(host_path=host, container_path=ctr, readonly=bool(rest and rest[0])))
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=attempt),
        image=api.ImageSpec(image=image),
        command=list(command), args=list(args), working_dir=working_dir,
        envs=[api.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        mounts=cmounts, labels=dict(labels or {}), annotations=dict(annotations or {}),
        log_path=log_path, tty=tty, stdin=stdin,
    )


def error_from_rpc(exc: grpc.aio.AioRpcError, method: str) -> KataColoError:
    code = exc.code()
    return from_status(code.value[0] if code is not None else 2, f"CRI {method}: {exc.details() or code}")


class CriClient:
    """One gRPC channel to a CRI endpoint. Use as ``async with CriClient(sock) as c: ...``."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.address = target(address)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._runtime: api_grpc.RuntimeServiceStub | None = None
        self._images: api_grpc.ImageServiceStub | None = None
        self._pod_configs: dict[str, api.PodSandboxConfig] = {}

    async def __aenter__(self) -> CriClient:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def connect(self) -> None:
        if self._channel is None:
            opts = [("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE)]
            self._channel = grpc.aio.insecure_channel(self.address, options=opts)
            self._runtime = api_grpc.RuntimeServiceStub(self._channel)
            self._images = api_grpc.ImageServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._runtime = self._images = None

    async def _call(self, service: str, method: str, request: Message, timeout: float | None = None) -> Any:
        self.connect()
        stub = self._runtime if service == "runtime" else self._images
        try:
            return await getattr(stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, method) from exc

    # ---- runtime ----

    async def version(self) -> api.VersionResponse:
        return await self._call("runtime", "Version", api.VersionRequest(version="v1"))

    async def run_pod_sandbox(self, config: api.PodSandboxConfig | str, *, runtime_handler: str = "",
                              **kwargs: Any) -> str:
        """Start a pod; ``config`` is a PodSandboxConfig or the pod name (then ``kwargs`` go to
        :func:`pod_config`). Returns the pod sandbox id."""
        if isinstance(config, str):
            config = pod_config(config, **kwargs)
        resp = await self._call("runtime", "RunPodSandbox",
                                api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler))
        self._pod_configs[resp.pod_sandbox_id] = config
        return resp.pod_sandbox_id

    async def stop_pod_sandbox(self, pod_id: str) -> None:
        await self._call("runtime", "StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    async def remove_pod_sandbox(self, pod_id: str) -> None:
        await self._call("runtime", "RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        self._pod_configs.pop(pod_id, None)

    async def pod_sandbox_status(self, pod_id: str, *, verbose: bool = False) -> api.PodSandboxStatusResponse:
        return await self._call("runtime", "PodSandboxStatus",
                                api.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose))

    async def pod_ip(self, pod_id: str) -> str:
        return (await self.pod_sandbox_status(pod_id)).status.network.ip

    async def list_pod_sandbox(self, *, pod_id: str = "", ready: bool | None = None,
                               labels: Mapping[str, str] | None = None) -> list[api.PodSandbox]:
        flt = api.PodSandboxFilter(id=pod_id, label_selector=dict(labels or {}))
        if ready is not None:
            flt.state.state = api.SANDBOX_READY if ready else api.SANDBOX_NOTREADY
        resp = await self._call("runtime", "ListPodSandbox", api.ListPodSandboxRequest(filter=flt))
        return list(resp.items)

    async def sandbox_config(self, pod_id: str) -> api.PodSandboxConfig:
        """The PodSandboxConfig a pod was started with (cached, else from containerd's verbose
        status info, else rebuilt from the status' metadata, labels and annotations)."""
        if pod_id in self._pod_configs:
            return self._pod_configs[pod_id]
        resp = await self.pod_sandbox_status(pod_id, verbose=True)
        config = _config_from_info(resp.info.get("info", ""))
        if config is None:
            st = resp.status
            config = api.PodSandboxConfig(metadata=st.metadata, labels=dict(st.labels),
                                          annotations=dict(st.annotations))
        self._pod_configs[pod_id] = config
        return config

    async def create_container(self, pod_id: str, config: api.ContainerConfig | str, image: str = "", *,
                               sandbox_config: api.PodSandboxConfig | None = None, **kwargs: Any) -> str:
        """Create a container in pod ``pod_id``; ``config`` is a ContainerConfig or the container
        name (then ``image`` and ``kwargs`` go to :func:`container_config`). Returns its id."""
        if isinstance(config, str):
            config = container_config(config, image, **kwargs)
        if sandbox_config is None:
            sandbox_config = await self.sandbox_config(pod_id)
        resp = await self._call("runtime", "CreateContainer", api.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config))
        return resp.container_id

    async def start_container(self, container_id: str) -> None:
        await self._call("runtime", "StartContainer", api.StartContainerRequest(container_id=container_id))

    async def stop_container(self, container_id: str, timeout: int = 0) -> None:
        await self._call("runtime", "StopContainer",
                         api.StopContainerRequest(container_id=container_id, timeout=timeout),
                         timeout=self.timeout + timeout)

    async def remove_container(self, container_id: str) -> None:
        await self._call("runtime", "RemoveContainer", api.RemoveContainerRequest(container_id=container_id))

    async def container_status(self, container_id: str, *, verbose: bool = False) -> api.ContainerStatusResponse:
        return await self._call("runtime", "ContainerStatus",
                                api.ContainerStatusRequest(container_id=container_id, verbose=verbose))

    async def list_containers(self, *, pod_id: str = "", container_id: str = "", state: int | None = None,
                              labels: Mapping[str, str] | None = None) -> list[api.Container]:
        flt = api.ContainerFilter(id=container_id, pod_sandbox_id=pod_id, label_selector=dict(labels or {}))
        if state is not None:
            flt.state.state = state  # type: ignore[assignment]  # the enum value is the wire int
        resp = await self._call("runtime", "ListContainers", api.ListContainersRequest(filter=flt))
        return list(resp.containers)

    async def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 0) -> tuple[int, bytes, bytes]:
        """Run ``cmd`` in the container and wait; ``timeout`` seconds (0 = no limit on the
        runtime side). Returns (exit code, stdout, stderr)."""
        resp = await self._call("runtime", "ExecSync",
                                api.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout),
                                timeout=self.timeout + timeout)
        return resp.exit_code, resp.stdout, resp.stderr

    # ---- images ----

    async def list_images(self, image: str = "") -> list[api.Image]:
        flt = api.ImageFilter(image=api.ImageSpec(image=image)) if image else None
        resp = await self._call("image", "ListImages", api.ListImagesRequest(filter=flt))
        return list(resp.images)

    async def image_status(self, image: str) -> api.Image | None:
        """The image, or None when the runtime does not have it."""
        resp = await self._call("image", "ImageStatus", api.ImageStatusRequest(image=api.ImageSpec(image=image)))
        return resp.image if resp.HasField("image") and resp.image.id else None

    async def pull_image(self, image: str) -> str:
        resp = await self._call("image", "PullImage", api.PullImageRequest(image=api.ImageSpec(image=image)))
        return resp.image_ref


def _config_from_info(info: str) -> api.PodSandboxConfig | None:
    """containerd's PodSandboxStatus verbose ``info`` JSON holds the sandbox config (Go field
    names = the proto names)."""
    if not info:
        return None
    try:
        raw = json.loads(info).get("config")
        if not isinstance(raw, dict):
            return None
        return json_format.ParseDict(raw, api.PodSandboxConfig(), ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError):
        return None


def to_dict(msg: Message) -> dict[str, Any]:
    """A message as JSON-ready dict with the proto field names (for the CLI and logs)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)
