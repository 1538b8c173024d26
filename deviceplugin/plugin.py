"""The DevicePlugin gRPC service of one resource (``/v1beta1.DevicePlugin/*``).

``ListAndWatch`` sends the full device list at once and again on every change :meth:`update`
reports (a device that disappears is sent as ``Unhealthy``, one that comes back ``Healthy``);
``Allocate`` answers, per container, the ``/dev/vfio/<group>`` DeviceSpec (``rw``: the VMM opens
it, never the container) of each device and its CDI name; ``GetPreferredAllocation`` keeps the
must-include devices and fills up from their NUMA node first; ``PreStartContainer`` is not needed.
Unknown device IDs are an INVALID_ARGUMENT.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from deviceplugin import cdi
from deviceplugin.discovery import VfioDevice
from proto.deviceplugin.v1beta1 import api_pb2 as api
from proto.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
ANNOTATION_DEVICES = "io.katacontainers.colo.vfio-devices"


class DevicePlugin(api_grpc.DevicePluginServicer):
    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.devices: dict[str, VfioDevice] = {}
        self.health: dict[str, str] = {}
        self._changed = asyncio.Condition()
        self._version = 0

    # -- state ----------------------------------------------------------------------------------

    async def update(self, present: Sequence[VfioDevice]) -> bool:
        """Merge a scan: new devices join Healthy, missing ones turn Unhealthy; True = changed."""
        now = {d.id: d for d in present}
        changed = False
        for dev_id, dev in now.items():
            if self.devices.get(dev_id) != dev or self.health.get(dev_id) != HEALTHY:
                self.devices[dev_id], self.health[dev_id] = dev, HEALTHY
                changed = True
        for dev_id in self.devices:
            if dev_id not in now and self.health[dev_id] != UNHEALTHY:
                self.health[dev_id] = UNHEALTHY
                log.warning("%s: device %s disappeared: Unhealthy", self.resource, dev_id)
                changed = True
        if changed:
            async with self._changed:
                self._version += 1
                self._changed.notify_all()
        return changed

    def response(self) -> api.ListAndWatchResponse:
        return api.ListAndWatchResponse(devices=[
            api.Device(ID=dev_id, health=self.health[dev_id],
                       topology=api.TopologyInfo(nodes=[api.NUMANode(ID=d.numa_node)]) if d.numa_node >= 0 else None)
            for dev_id, d in sorted(self.devices.items())])

    # -- RPCs -----------------------------------------------------------------------------------

    async def GetDevicePluginOptions(self, request: api.Empty, context: grpc.aio.ServicerContext
                                     ) -> api.DevicePluginOptions:
        return api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    async def ListAndWatch(self, request: api.Empty, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[api.ListAndWatchResponse]:
        seen = -1

        def changed_since(last: int) -> Callable[[], bool]:
            return lambda: self._version != last

        while True:
            async with self._changed:
                await self._changed.wait_for(changed_since(seen))
                seen = self._version
                resp = self.response()
            yield resp

    async def Allocate(self, request: api.AllocateRequest, context: grpc.aio.ServicerContext) -> api.AllocateResponse:
        out = api.AllocateResponse()
        for creq in request.container_requests:
            unknown = [i for i in creq.devices_ids if i not in self.devices]
            if unknown:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.resource}: unknown devices {unknown}")
            resp = out.container_responses.add()
            nodes = sorted({self.devices[i].vfio_node for i in creq.devices_ids})
            resp.devices.extend(api.DeviceSpec(container_path=n, host_path=n, permissions="rw") for n in nodes)
            resp.cdi_devices.extend(api.CDIDevice(name=f"{self.resource}={cdi.device_name(i)}")
                                    for i in creq.devices_ids)
            resp.annotations[ANNOTATION_DEVICES] = ",".join(creq.devices_ids)
        return out

    async def GetPreferredAllocation(self, request: api.PreferredAllocationRequest,
                                     context: grpc.aio.ServicerContext) -> api.PreferredAllocationResponse:
        out = api.PreferredAllocationResponse()
        for creq in request.container_requests:
            chosen = list(creq.must_include_deviceIDs)
            numa = {self.devices[i].numa_node for i in chosen if i in self.devices}
            rest = [i for i in creq.available_deviceIDs if i not in chosen and self.health.get(i) == HEALTHY]
            rest.sort(key=lambda i: (self.devices[i].numa_node not in numa if i in self.devices else True, i))
            chosen += rest[:max(0, creq.allocation_size - len(chosen))]
            out.container_responses.add(deviceIDs=chosen[:creq.allocation_size])
        return out

    async def PreStartContainer(self, request: api.PreStartContainerRequest,
                                context: grpc.aio.ServicerContext) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()
