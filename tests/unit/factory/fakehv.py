"""A hypervisor double for the factory tests: the Hypervisor core + Snapshot, PauseResume and
DeviceHotplug, recording every call in a shared log. It makes the files a driver would (its state
dir with the driver's marker, the saved ``state``) but starts no process; ``fail`` names calls
that raise HypervisorError."""
from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import replace
from typing import Any, ClassVar

from common.errors import FailedPrecondition, HypervisorError
from hypervisor.base import (
    AgentAddress,
    AttachedDevice,
    Capabilities,
    Device,
    VmConfig,
    vm_config_from_dict,
    vm_config_to_dict,
)
from hypervisor.qemu.options import QemuOptions

_pids = itertools.count(900000)


class FakeHv:
    name: ClassVar[str] = "qemu"

    def __init__(self, log: list[tuple[str, Any]], fail: set[str] | None = None) -> None:
        self.log = log
        self.fail = fail or set()
        self.cfg: VmConfig | None = None
        self.pid: int | None = None
        self.paused = False
        self.released = False
        self.devices: list[Device] = []
        self._exited: asyncio.Future[int] | None = None

    def _call(self, what: str, arg: Any = None) -> None:
        self.log.append((what, arg))
        if what in self.fail:
            raise HypervisorError(f"{what} failed (test)")

    async def prepare(self, cfg: VmConfig) -> None:
        self._call("prepare", cfg)
        os.makedirs(cfg.state_dir, mode=0o700)
        with open(os.path.join(cfg.state_dir, ".kata-colo-vm"), "w") as f:
            f.write(cfg.vm_id)
        self.cfg = cfg

    def _run(self) -> None:
        self.pid = next(_pids)
        self._exited = asyncio.get_running_loop().create_future()

    async def start(self, timeout: float) -> None:
        self._call("start")
        self._run()

    async def restore(self, directory: str, timeout: float, resume: bool = True) -> None:
        self._call("restore", directory)
        if not os.path.exists(os.path.join(directory, "state")):
            raise HypervisorError("no state")
        self._run()
        self.paused = not resume

    async def save(self, directory: str) -> None:
        self._call("save", directory)
        assert self.cfg is not None and self.cfg.memory_shared
        with open(os.path.join(directory, "state"), "wb") as f:
            f.write(b"device state " + self.cfg.vm_id.encode())
        self.paused = True

    async def resume(self) -> None:
        self._call("resume")
        self.paused = False

    async def pause(self) -> None:
        self.paused = True

    async def release(self) -> dict[str, Any]:
        self._call("release")
        self.released = True
        return self.record()

    async def adopt(self, record: dict[str, Any], timeout: float) -> None:
        self._call("adopt", record)
        self.cfg = vm_config_from_dict(record["config"], QemuOptions)
        self._run()
        self.pid = int(record["pid"])

    async def stop(self, force: bool = False, timeout: float = 10.0) -> None:
        self._call("stop")
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(0)

    async def cleanup(self) -> None:
        self._call("cleanup")
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(-9)
        if self.cfg is not None and not self.released:
            import shutil

            shutil.rmtree(self.cfg.state_dir, ignore_errors=True)

    async def wait(self) -> int:
        if self._exited is None:
            raise FailedPrecondition("not started")
        return await asyncio.shield(self._exited)

    def die(self) -> None:
        assert self._exited is not None
        self._exited.set_result(-9)

    def agent_address(self) -> AgentAddress:
        assert self.cfg is not None
        return AgentAddress("virtio-serial", path=os.path.join(self.cfg.state_dir, "agent.sock"))

    async def vcpu_threads(self) -> dict[int, int]:
        return {}

    def vmm_pid(self) -> int | None:
        return self.pid

    def capabilities(self) -> Capabilities:
        ports = self.cfg.options.pcie_root_ports if self.cfg is not None and self.cfg.options else 0
        return Capabilities(shared_fs=("virtio-9p",), hotplug=("net", "block") if ports else (),
                            clone_memory_file=True)

    def record(self) -> dict[str, Any]:
        assert self.cfg is not None
        return {"state_dir": self.cfg.state_dir, "pid": self.pid or 0, "vm_id": self.cfg.vm_id,
                "config": vm_config_to_dict(self.cfg)}

    async def add_device(self, dev: Device) -> AttachedDevice:
        self._call("add_device", dev)
        self.devices.append(dev)
        return AttachedDevice(dev.id, f"{len(self.devices) + 1:02x}/00")

    async def remove_device(self, dev_id: str, timeout: float = 10.0) -> None:
        self._call("remove_device", dev_id)

    @classmethod
    async def recover(cls, record: dict[str, Any], timeout: float = 3.0) -> None:
        import shutil

        shutil.rmtree(str(record.get("state_dir") or "/nonexistent"), ignore_errors=True)


def with_options(cfg: VmConfig, **opts: Any) -> VmConfig:
    return replace(cfg, options=replace(cfg.options or QemuOptions(), **opts))
