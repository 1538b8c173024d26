"""Serve one resource's DevicePlugin on ``<dir>/<endpoint>`` and register it with kubelet.

The plugin must serve before it registers. It registers again whenever kubelet.sock is
recreated (kubelet restarted: its inode changes) — and restarts its own server first if kubelet
removed the plugin's socket (kubelet cleans the directory when it starts).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import grpc

from deviceplugin.plugin import DevicePlugin
from proto.deviceplugin.v1beta1 import api_pb2 as api
from proto.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

VERSION = "v1beta1"
DEVICE_PLUGIN_PATH = "/var/lib/kubelet/device-plugins/"
KUBELET_SOCKET = "kubelet.sock"
REGISTER_TIMEOUT = 10.0


def _inode(path: str) -> tuple[int, int]:
    """The socket file's identity (inode + ctime: a recreated socket may reuse the inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_ino, st.st_ctime_ns)


class Registrar:
    def __init__(self, plugin: DevicePlugin, plugin_dir: str = DEVICE_PLUGIN_PATH, endpoint: str = "") -> None:
        self.plugin = plugin
        self.dir = plugin_dir
        self.endpoint = endpoint or "kata-colo-" + plugin.resource.rsplit("/", 1)[-1] + ".sock"
        self._server: grpc.aio.Server | None = None
        self.registrations = 0
        self.registered_inode: tuple[int, int] = (0, 0)

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, self.endpoint)

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.dir, KUBELET_SOCKET)

    async def serve(self) -> None:
        await self.stop_server()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        server = grpc.aio.server()
        api_grpc.add_DevicePluginServicer_to_server(self.plugin, server)
        server.add_insecure_port(f"unix://{self.socket}")
        await server.start()
        self._server = server
        log.info("%s: serving on %s", self.plugin.resource, self.socket)

    async def stop_server(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    async def register(self) -> None:
        inode = _inode(self.kubelet_socket)
        async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            stub = api_grpc.RegistrationStub(channel)
            await stub.Register(api.RegisterRequest(
                version=VERSION, endpoint=self.endpoint, resource_name=self.plugin.resource,
                options=api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)),
                timeout=REGISTER_TIMEOUT)
        self.registrations += 1
        self.registered_inode = inode
        log.info("%s: registered with kubelet (%d)", self.plugin.resource, self.registrations)

    async def run(self, interval: float = 1.0) -> None:
        """Serve, register, and keep registered across kubelet restarts (until cancelled)."""
        await self.serve()
        try:
            while True:
                inode = _inode(self.kubelet_socket)
                if inode[0] and inode != self.registered_inode:
                    if not os.path.exists(self.socket):
                        await self.serve()
                    try:
                        await self.register()
                    except grpc.aio.AioRpcError as exc:
                        log.warning("%s: Register failed: %s (retrying)", self.plugin.resource, exc.details())
                elif inode[0] and not os.path.exists(self.socket):
                    await self.serve()
                    self.registered_inode = (0, 0)  # register this new server
                    continue
                await asyncio.sleep(interval)
        finally:
            await self.stop_server()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)
