"""The device plugin against a real gRPC Registration server playing kubelet: registration,
ListAndWatch updates when a device disappears (and comes back), Allocate (DeviceSpec + CDI name),
and registering again when kubelet.sock is recreated (a kubelet restart)."""
import asyncio
import json
import os

import grpc
import pytest

from deviceplugin import cdi, discovery
from deviceplugin.plugin import HEALTHY, UNHEALTHY, DevicePlugin
from deviceplugin.registrar import Registrar
from proto.deviceplugin.v1beta1 import api_pb2 as api
from proto.deviceplugin.v1beta1 import api_pb2_grpc as api_grpc
from shim.resources.blockdev import requests
from tests.unit.vfio.fakesys import FakePci

NVME, NIC = 0x010802, 0x020000


class FakeKubelet(api_grpc.RegistrationServicer):
    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[api.RegisterRequest] = []
        self.got = asyncio.Event()
        self.server: grpc.aio.Server | None = None

    async def Register(self, request, context):
        self.requests.append(request)
        self.got.set()
        return api.Empty()

    async def start(self):
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = grpc.aio.server()
        api_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.path}")
        await self.server.start()

    async def stop(self):
        await self.server.stop(grace=0)
        if os.path.exists(self.path):  # grpc may have removed it
            os.unlink(self.path)


@pytest.fixture
def pci(tmp_path):
    fake = FakePci(tmp_path / "root")
    fake.add("0000:3b:00.0", "12", NVME, "vfio-pci")
    fake.add("0000:3c:00.0", "14", NVME, "nvme")       # not on vfio-pci: not offered
    fake.add("0000:5e:00.1", "13", NIC, "vfio-pci", vendor=0x1d0f)
    (tmp_path / "root/dev/vfio").mkdir(parents=True)
    for g in ("12", "13", "14"):
        (tmp_path / "root/dev/vfio" / g).touch()
    return fake


def test_discovery_finds_vfio_nvme_and_enis(pci):
    found = discovery.scan(pci.paths)
    assert [(d.id, d.kind, d.group) for d in found] == [("0000:3b:00.0", "nvme", "12"), ("0000:5e:00.1", "eni", "13")]
    assert [d.id for d in discovery.scan(pci.paths, eni_vendors=[0x15b3])] == ["0000:3b:00.0"]


async def _until(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_register_list_and_watch_allocate_and_reregister(pci, tmp_path):
    d = tmp_path / "dp"
    d.mkdir()
    kubelet = FakeKubelet(str(d / "kubelet.sock"))
    await kubelet.start()
    plugin = DevicePlugin("kata-colo.io/nvme")
    await plugin.update([x for x in discovery.scan(pci.paths) if x.kind == "nvme"])
    reg = Registrar(plugin, str(d))
    task = asyncio.create_task(reg.run(interval=0.05))
    try:
        await asyncio.wait_for(kubelet.got.wait(), 5)
        r = kubelet.requests[0]
        assert (r.version, r.endpoint, r.resource_name) == ("v1beta1", "kata-colo-nvme.sock", "kata-colo.io/nvme")
        assert r.options.get_preferred_allocation_available
        async with grpc.aio.insecure_channel(f"unix://{d / r.endpoint}") as ch:
            stub = api_grpc.DevicePluginStub(ch)
            stream = stub.ListAndWatch(api.Empty())
            first = await stream.read()
            assert [(x.ID, x.health) for x in first.devices] == [("0000:3b:00.0", HEALTHY)]
            assert first.devices[0].topology.nodes[0].ID == 0
            # the NVMe leaves vfio-pci (or the node goes): kubelet hears Unhealthy
            os.unlink(pci.root / "dev/vfio/12")
            await plugin.update([x for x in discovery.scan(pci.paths) if x.kind == "nvme"])
            second = await asyncio.wait_for(stream.read(), 5)
            assert [(x.ID, x.health) for x in second.devices] == [("0000:3b:00.0", UNHEALTHY)]
            (pci.root / "dev/vfio/12").touch()
            await plugin.update([x for x in discovery.scan(pci.paths) if x.kind == "nvme"])
            third = await asyncio.wait_for(stream.read(), 5)
            assert third.devices[0].health == HEALTHY
            stream.cancel()
            resp = await stub.Allocate(api.AllocateRequest(container_requests=[
                api.ContainerAllocateRequest(devices_ids=["0000:3b:00.0"])]))
            c = resp.container_responses[0]
            assert [(s.container_path, s.host_path, s.permissions) for s in c.devices] == \
                [("/dev/vfio/12", "/dev/vfio/12", "rw")]
            assert [x.name for x in c.cdi_devices] == ["kata-colo.io/nvme=0000:3b:00.0"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(api.AllocateRequest(container_requests=[
                    api.ContainerAllocateRequest(devices_ids=["0000:99:00.0"])]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            pref = await stub.GetPreferredAllocation(api.PreferredAllocationRequest(container_requests=[
                api.ContainerPreferredAllocationRequest(available_deviceIDs=["0000:3b:00.0"], allocation_size=1)]))
            assert list(pref.container_responses[0].deviceIDs) == ["0000:3b:00.0"]
        # kubelet restarts: a new kubelet.sock, and it wiped the plugin sockets
        await kubelet.stop()
        os.unlink(reg.socket)
        kubelet2 = FakeKubelet(str(d / "kubelet.sock"))
        await kubelet2.start()
        await asyncio.wait_for(kubelet2.got.wait(), 5)
        await _until(lambda: os.path.exists(reg.socket) and reg.registrations == 2)
        assert reg.registrations == 2 and kubelet2.requests[0].endpoint == "kata-colo-nvme.sock"
        async with grpc.aio.insecure_channel(f"unix://{reg.socket}") as ch:
            opts = await api_grpc.DevicePluginStub(ch).GetDevicePluginOptions(api.Empty())
            assert opts.get_preferred_allocation_available
        await kubelet2.stop()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not os.path.exists(reg.socket)


def test_cdi_spec_is_what_the_shim_resolves(pci, tmp_path):
    devs = [x for x in discovery.scan(pci.paths) if x.kind == "nvme"]
    path = cdi.write_spec(str(tmp_path / "cdi"), "kata-colo.io/nvme", devs)
    assert json.loads(path.read_text())["kind"] == "kata-colo.io/nvme"
    assert requests.cdi_device_nodes("kata-colo.io/nvme=0000:3b:00.0", (str(tmp_path / "cdi"),)) == ["/dev/vfio/12"]
    cdi.write_spec(str(tmp_path / "cdi"), "kata-colo.io/nvme", [])
    assert not path.exists()
