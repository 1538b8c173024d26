"""CriClient against an in-process gRPC CRI server on a Unix socket: request building (what
kubelet would send), error mapping into common.errors, the sandbox-config round trip, the CLI."""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.errors import InvalidArgument, NotFound, Unavailable
from cri.__main__ import main as cli_main
from cri.client import CriClient, target
from proto.cri.runtime.v1 import api_pb2 as api
from proto.cri.runtime.v1 import api_pb2_grpc as api_grpc


class FakeRuntime(api_grpc.RuntimeServiceServicer):
    def __init__(self) -> None:
        self.requests: list[object] = []

    async def RunPodSandbox(self, request, context):
        self.requests.append(request)
        return api.RunPodSandboxResponse(pod_sandbox_id="pod1")

    async def PodSandboxStatus(self, request, context):
        info = {"config": {"metadata": {"name": "p", "uid": "u", "namespace": "ns"},
                           "log_directory": "/logs/p", "labels": {"a": "b"},
                           "linux": {"security_context": {"namespace_options": {"pid": 1}}}},
                "pid": 42, "someNewField": [1]}
        return api.PodSandboxStatusResponse(
            status=api.PodSandboxStatus(id=request.pod_sandbox_id, state=api.SANDBOX_READY,
                                        network=api.PodSandboxNetworkStatus(ip="10.240.0.2")),
            info={"info": json.dumps(info)} if request.verbose else {})

    async def CreateContainer(self, request, context):
        self.requests.append(request)
        return api.CreateContainerResponse(container_id="ctr1")

    async def ContainerStatus(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND,
                            f"an error occurred when try to find container {request.container_id!r}")

    async def StopContainer(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad timeout")

    async def ExecSync(self, request, context):
        self.requests.append(request)
        return api.ExecSyncResponse(stdout=b"out\n", stderr=b"err\n", exit_code=3)


class FakeImages(api_grpc.ImageServiceServicer):
    async def ImageStatus(self, request, context):
        if request.image.image == "present":
            return api.ImageStatusResponse(image=api.Image(id="sha256:1", repo_tags=["present"]))
        return api.ImageStatusResponse()


@pytest.fixture
async def server():
    d = Path(tempfile.mkdtemp(prefix="kc-cri-", dir="/tmp"))  # Unix socket paths are short
    sock = d / "cri.sock"
    srv = grpc.aio.server()
    runtime = FakeRuntime()
    api_grpc.add_RuntimeServiceServicer_to_server(runtime, srv)
    api_grpc.add_ImageServiceServicer_to_server(FakeImages(), srv)
    srv.add_insecure_port(target(str(sock)))
    await srv.start()
    yield sock, runtime
    await srv.stop(None)
    shutil.rmtree(d, ignore_errors=True)


def test_target_forms():
    assert target("/run/x.sock") == "unix:///run/x.sock"
    assert target("unix:/run/x.sock") == "unix:///run/x.sock"
    assert target("unix:///run/x.sock") == "unix:///run/x.sock"


async def test_run_pod_then_create_container_carries_the_pod_config(server):
    sock, runtime = server
    async with CriClient(str(sock)) as c:
        pod = await c.run_pod_sandbox("web", namespace="prod", uid="u1", log_directory="/logs/web",
                                      runtime_handler="kata-colo", labels={"app": "web"},
                                      annotations={"io.katacontainers.colo.vcpu-priorities": "high:1"})
        cid = await c.create_container(pod, "httpd", "busybox", command=["httpd", "-f"], args=["-p", "80"],
                                       env={"A": "1"}, mounts=[("/h", "/c", True), ("/h2", "/c2")],
                                       log_path="httpd/0.log")
    assert (pod, cid) == ("pod1", "ctr1")
    run, create = runtime.requests
    assert run.runtime_handler == "kata-colo"
    md = run.config.metadata
    assert (md.name, md.namespace, md.uid) == ("web", "prod", "u1")
    assert run.config.log_directory == "/logs/web" and dict(run.config.labels) == {"app": "web"}
    assert run.config.linux.security_context.namespace_options.network == api.POD
    assert create.pod_sandbox_id == "pod1" and create.sandbox_config == run.config
    cfg = create.config
    assert (cfg.metadata.name, cfg.image.image, list(cfg.command), list(cfg.args)) == (
        "httpd", "busybox", ["httpd", "-f"], ["-p", "80"])
    assert [(e.key, e.value) for e in cfg.envs] == [("A", "1")]
    assert [(m.host_path, m.container_path, m.readonly) for m in cfg.mounts] == [("/h", "/c", True),
                                                                                 ("/h2", "/c2", False)]
    assert cfg.log_path == "httpd/0.log"


async def test_sandbox_config_is_rebuilt_from_verbose_status(server):
    sock, runtime = server
    async with CriClient(str(sock)) as c:
        await c.create_container("other-pod", "x", "busybox")
        assert await c.pod_ip("other-pod") == "10.240.0.2"
    cfg = runtime.requests[-1].sandbox_config
    assert (cfg.metadata.name, cfg.log_directory, dict(cfg.labels)) == ("p", "/logs/p", {"a": "b"})
    assert cfg.linux.security_context.namespace_options.pid == api.CONTAINER


async def test_exec_sync_and_images(server):
    sock, runtime = server
    async with CriClient(str(sock)) as c:
        assert await c.exec_sync("ctr1", ["sh", "-c", "x"], timeout=5) == (3, b"out\n", b"err\n")
        assert runtime.requests[-1].timeout == 5
        assert (await c.image_status("present")).repo_tags == ["present"]
        assert await c.image_status("absent") is None


async def test_grpc_errors_map_into_the_hierarchy(server):
    sock, _ = server
    async with CriClient(str(sock)) as c:
        with pytest.raises(NotFound, match="ContainerStatus"):
            await c.container_status("nope")
        with pytest.raises(InvalidArgument, match="bad timeout"):
            await c.stop_container("ctr1", 1)
    async with CriClient(str(sock.parent / "missing.sock"), timeout=5) as c:
        with pytest.raises(Unavailable):
            await c.version()


async def test_cli_exec_passes_rc_and_output(server, capfd):
    sock, runtime = server
    argv = ["--address", str(sock), "exec", "-t", "5", "ctr1", "--", "sh", "-c", "echo hi"]
    assert await asyncio.to_thread(cli_main, argv) == 3
    assert list(runtime.requests[-1].cmd) == ["sh", "-c", "echo hi"]
    out, err = capfd.readouterr()
    assert (out, err) == ("out\n", "err\n")
    assert await asyncio.to_thread(cli_main, ["--address", str(sock), "inspect", "ctr1"]) == 1
    assert capfd.readouterr().err.startswith("error: CRI ContainerStatus: an error occurred")
