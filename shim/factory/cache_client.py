"""Client of the VM cache daemon (:mod:`shim.factory.cache_server`) over ttrpc.

One short connection per call. A daemon that is not running is ``Unavailable`` (the factory
falls back to a template clone), one without a VM of that key ``NotFound``.
"""
from __future__ import annotations

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from proto.kata_colo import cache_pb2
from ttrpc import Client

SERVICE = "kata_colo.v1.VmCache"
CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 10.0


class CacheClient:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    async def _call(self, method: str, request: Message, response_type: type[Message]) -> Message:
        client = await Client.connect_unix(self.endpoint, timeout=CONNECT_TIMEOUT)
        try:
            return await client.call(SERVICE, method, request, response_type, timeout=CALL_TIMEOUT)
        finally:
            await client.close()

    async def get_base_vm(self, key: str) -> cache_pb2.GrpcVM:
        """A paused clone of the template with ``key``, leased to us until :meth:`confirm_vm`."""
        resp = await self._call("GetBaseVM", cache_pb2.GetBaseVMRequest(key=key), cache_pb2.GrpcVM)
        assert isinstance(resp, cache_pb2.GrpcVM)
        return resp

    async def confirm_vm(self, vm_id: str) -> None:
        await self._call("ConfirmVM", cache_pb2.ConfirmVMRequest(id=vm_id), empty_pb2.Empty)

    async def status(self) -> cache_pb2.GrpcStatus:
        resp = await self._call("Status", empty_pb2.Empty(), cache_pb2.GrpcStatus)
        assert isinstance(resp, cache_pb2.GrpcStatus)
        return resp

    async def quit(self) -> None:
        await self._call("Quit", empty_pb2.Empty(), empty_pb2.Empty)
