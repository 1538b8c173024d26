"""VFIO on a fake sysfs: group traversal (bridges skipped), vfio-pci binding in the kernel's
order, restore of the host driver, and the ContainerStorage lifecycle (journaled before the
device changes driver; recovery from the record alone)."""
import pytest

from common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceError
from hypervisor.base import VfioDevice
from shim.resources.blockdev.resource import ContainerStorage, VfioFunction
from shim.resources.manager import ResourceContext
from shim.resources.vfio import sysfs
from tests.unit.vfio.fakesys import FakePci

NVME = 0x010802
NIC = 0x020000
BRIDGE = 0x060400


@pytest.fixture
def pci(tmp_path, monkeypatch):
    fake = FakePci(tmp_path / "root")
    fake.original = {}
    fake.add("0000:3b:00.0", "12", NVME, "nvme")
    fake.add("0000:3a:00.0", "12", BRIDGE, "pcieport")
    fake.add("0000:5e:00.1", "13", NIC, "vfio-pci")
    fake.original = {"0000:3b:00.0": "nvme"}
    monkeypatch.setattr(sysfs, "_write", fake.write)
    return fake


def test_group_functions_skip_bridges(pci):
    funcs = sysfs.group_functions("12", pci.paths)
    assert [(f.bdf, f.kind, f.driver, f.iommu_group) for f in funcs] == [("0000:3b:00.0", "nvme", "nvme", "12")]
    group, funcs = sysfs.group_of_device_path("/dev/vfio/13", pci.paths)
    assert group == "13" and funcs[0].kind == "net" and funcs[0].driver == "vfio-pci"
    with pytest.raises(NotFound, match="VFIO group 99 does not exist"):
        sysfs.group_of_device_path("/dev/vfio/99", pci.paths)
    with pytest.raises(InvalidArgument):
        sysfs.group_of_device_path("/dev/vfio/../sda", pci.paths)
    with pytest.raises(FailedPrecondition, match="not bound to vfio-pci: 0000:3b:00.0 \\(nvme\\)"):
        sysfs.require_vfio_bound(sysfs.group_functions("12", pci.paths), "12")


def test_bind_and_restore_in_kernel_order(pci):
    assert sysfs.bind_vfio("0000:3b:00.0", pci.paths) == "nvme"
    assert pci.driver("0000:3b:00.0") == "vfio-pci"
    dev = "sys/bus/pci/devices/0000:3b:00.0"
    assert pci.writes == [(f"{dev}/driver_override", "vfio-pci"), (f"{dev}/driver/unbind", "0000:3b:00.0"),
                          ("sys/bus/pci/drivers_probe", "0000:3b:00.0")]
    sysfs.restore("0000:3b:00.0", "nvme", pci.paths)
    assert pci.driver("0000:3b:00.0") == "nvme"
    sysfs.restore("0000:5e:00.1", "vfio-pci", pci.paths)  # it was on vfio-pci before: left alone
    assert pci.driver("0000:5e:00.1") == "vfio-pci"


def test_bind_fails_clearly_without_the_vfio_module(pci):
    pci.vfio_loaded = False
    with pytest.raises(ResourceError, match="did not bind to vfio-pci"):
        sysfs.bind_vfio("0000:3b:00.0", pci.paths)


def _storage(pci, tmp_path, bind=True):
    return ContainerStorage("sb1", "c1", vfio=[VfioFunction(VfioDevice("kf0", "0000:3b:00.0"), "nvme", "12", "nvme")],
                            claims=[("pci-0000:3b:00.0", "PCI device 0000:3b:00.0")],
                            claims_dir=str(tmp_path / "claims"), bind_vfio=bind, cold=True, host_paths=pci.paths)


def _ctx(tmp_path, journal):
    return ResourceContext("sb1", tmp_path, None, {}, None, persist=journal)


async def test_resource_journals_the_driver_before_binding_and_restores_it(pci, tmp_path):
    res = _storage(pci, tmp_path)
    seen = []
    patch = await res.before_boot(_ctx(tmp_path, lambda: seen.append((res.record(), pci.driver("0000:3b:00.0")))))
    assert patch.vfio == (VfioDevice("kf0", "0000:3b:00.0"),)
    rec, driver_then = seen[0]
    assert rec["vfio"] == [{"bdf": "0000:3b:00.0", "original": "nvme"}] and driver_then == "nvme"
    assert (tmp_path / "claims" / "pci-0000:3b:00.0").read_text().strip() == "sb1"
    await ContainerStorage.recover(res.record())  # the shim died: a fresh process undoes it
    assert pci.driver("0000:3b:00.0") == "nvme" and not (tmp_path / "claims" / "pci-0000:3b:00.0").exists()


async def test_unbound_group_without_vfio_bind_is_refused_and_leaves_nothing(pci, tmp_path):
    res = _storage(pci, tmp_path, bind=False)
    with pytest.raises(FailedPrecondition, match="not bound to vfio-pci"):
        await res.before_boot(_ctx(tmp_path, lambda: None))
    await res.teardown()
    assert pci.driver("0000:3b:00.0") == "nvme" and not (tmp_path / "claims" / "pci-0000:3b:00.0").exists()


async def test_a_device_of_another_sandbox_is_refused(pci, tmp_path):
    other = _storage(pci, tmp_path)
    other.sandbox_id = "sb0"
    await other.before_boot(_ctx(tmp_path, lambda: None))
    res = _storage(pci, tmp_path)
    with pytest.raises(FailedPrecondition, match="already given to sandbox sb0"):
        await res.before_boot(_ctx(tmp_path, lambda: None))
    await res.teardown()
    assert (tmp_path / "claims" / "pci-0000:3b:00.0").read_text().strip() == "sb0"
    await other.teardown()
    assert pci.driver("0000:3b:00.0") == "nvme"
