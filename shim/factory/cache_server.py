"""``kata-colo-vmcache``: the node's pre-booted VM cache (kata's VMCache server).

Keeps ``[factory] vm_cache_number`` clones of the template restored and **paused**, and hands
one to a shim over ttrpc on ``vm_cache_endpoint`` (0600, peer uid checked by the ttrpc server):

1. ``GetBaseVM(key)`` — the shim names the template key its sandbox needs; a ready VM of that key
   is released (this daemon closes its QMP connection) and leased to the shim with its driver
   record, and the cache is refilled in the background;
2. the shim journals the record in its sandbox, then ``ConfirmVM(id)``: the VM is the shim's
   (it adopts the QEMU: pidfd, QMP, agent socket, console). A lease not confirmed within
   :data:`LEASE_SECONDS` is killed here — the VM always has exactly one owner that cleans it.

QEMU processes stay this daemon's children (it reaps them); a handed-out VM keeps running when
the daemon exits. The daemon's own journal (``<endpoint>.json``) lists every VM it owns before
each VMM starts; a restarted daemon kills and removes what a killed one left. ``Quit`` (or
SIGTERM/SIGINT) destroys the ready and leased VMs. The template is built on start when missing.
Each cached VM exports its 9p share from ``<vm-dir>/shared``; the shim renames it onto the
sandbox's share directory (QEMU holds it by fd).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from common.errors import FailedPrecondition, KataColoError, NotFound
from hypervisor import registry
from hypervisor.base import HandOver, Hypervisor, SharedDir, Snapshot, VmConfig
from proto.kata_colo import cache_pb2
from shim.factory import key as keymod
from shim.factory import vmdir
from shim.factory.factory import node_vm_config, prepare_template
from shim.factory.template import Template, TemplateInfo
from ttrpc import Server, ServerContext

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0
RETRY_SECONDS = 5.0
RESTORE_TIMEOUT = 30.0


@dataclass
class CachedVm:
    id: str
    hv: Hypervisor
    state: str = "ready"
    record: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


class VmCacheServer:
    def __init__(self, cfg: Any, *, hypervisor_factory: Callable[[str], Hypervisor] = registry.create,
                 journal_path: Path | None = None) -> None:
        self.cfg = cfg
        self.number = cfg.factory.vm_cache_number
        self.endpoint = cfg.factory.vm_cache_endpoint
        self.driver = cfg.runtime.hypervisor
        self.template = Template(cfg.factory.template_path)
        self.base: VmConfig = node_vm_config(cfg)
        self.key = keymod.key(keymod.shape(self.base, self.driver))
        self.journal_path = journal_path or Path(self.endpoint).with_suffix(".json")
        self.ready: list[CachedVm] = []
        self.leased: dict[str, CachedVm] = {}
        self.handed = 0
        self.info: TemplateInfo | None = None
        self._owned: dict[str, dict[str, Any]] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hv_factory = hypervisor_factory

    # -- journal ------------------------------------------------------------------------------

    def _persist(self) -> None:
        self.journal_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".vmcache.", dir=self.journal_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"vms": self._owned}, f, sort_keys=True)
        os.replace(tmp, self.journal_path)

    def _own(self, vm_id: str, hv: Hypervisor) -> None:
        self._owned[vm_id] = {"driver": hv.name, "record": hv.record()}
        self._persist()

    def _disown(self, vm_id: str) -> None:
        if self._owned.pop(vm_id, None) is not None:
            self._persist()

    async def recover_leftovers(self) -> int:
        """Kill and remove the VMs a killed daemon's journal lists; how many there were."""
        try:
            data = json.loads(self.journal_path.read_text())
            vms = dict(data.get("vms") or {})
        except FileNotFoundError:
            return 0
        except (ValueError, AttributeError) as exc:
            raise FailedPrecondition(f"{self.journal_path}: unreadable VM cache journal: {exc}") from None
        for vm_id, entry in vms.items():
            log.info("vmcache: removing VM %s left by a previous daemon", vm_id)
            await registry.driver_class(str(entry.get("driver") or "")).recover(dict(entry.get("record") or {}))
        self.journal_path.unlink(missing_ok=True)
        return len(vms)

    # -- filling ------------------------------------------------------------------------------

    async def ensure_template(self) -> TemplateInfo:
        info = await asyncio.to_thread(self._check)
        if info is None:
            info = await self.template.build(self.base, self.driver, boot_timeout=self.cfg.hypervisor.boot_timeout,
                                             ready=prepare_template, hypervisor_factory=self._hv_factory)
        if info.key != self.key:
            diff = ", ".join(keymod.differences(info.shape, keymod.shape(self.base, self.driver)))
            raise FailedPrecondition(f"template {self.template.path} was made for another configuration "
                                     f"({diff}); run `kata-colo-ctl factory destroy` first")
        self.info = info
        return info

    def _check(self) -> TemplateInfo | None:
        with self.template.locked(exclusive=False):
            return self.template.check()

    async def clone(self) -> CachedVm:
        """One more paused clone (journaled before its QEMU starts)."""
        info = self.info or await self.ensure_template()
        vm_id = vmdir.new_vm_id()
        state = vmdir.vm_dir(vm_id)
        shares = tuple(SharedDir(d.tag, str(state / ("shared" if i == 0 else f"shared{i}")), d.readonly)
                       for i, d in enumerate(self.base.shared_dirs))
        cfg = replace(self.base, vm_id=vm_id, state_dir=str(state), shared_dirs=shares,
                      memory_file=info.memory_file, memory_shared=False)
        hv = self._hv_factory(self.driver)
        if not isinstance(hv, Snapshot):
            raise FailedPrecondition(f"hypervisor {self.driver} cannot restore saved VMs")
        lock = self.template.locked(exclusive=False)
        await asyncio.to_thread(lock.__enter__)
        try:
            await hv.prepare(cfg)
            self._own(vm_id, hv)
            for share in shares:
                os.makedirs(share.host_path, mode=0o700, exist_ok=True)
            await hv.restore(str(info.path), timeout=RESTORE_TIMEOUT, resume=False)
            self._own(vm_id, hv)
        except BaseException:
            with contextlib.suppress(Exception):
                await hv.cleanup()
            self._disown(vm_id)
            raise
        finally:
            lock.__exit__(None, None, None)
        return CachedVm(vm_id, hv)

    async def _fill(self) -> None:
        while not self._stop.is_set():
            while len(self.ready) < self.number and not self._stop.is_set():
                try:
                    vm = await self.clone()
                except KataColoError as exc:
                    log.error("vmcache: cloning failed (retrying in %.0fs): %s", RETRY_SECONDS, exc.message)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                self.ready.append(vm)
                log.info("vmcache: VM %s ready (%d/%d)", vm.id, len(self.ready), self.number)
            self._wake.clear()
            await self._wake.wait()

    async def _destroy(self, vm: CachedVm) -> None:
        try:
            if vm.state == "leased":  # released: only its record can stop it
                await registry.driver_class(self.driver).recover(vm.record)
            else:
                await vm.hv.stop(force=True, timeout=2.0)
                await vm.hv.cleanup()
        finally:
            self._disown(vm.id)

    # -- RPCs ---------------------------------------------------------------------------------

    async def GetBaseVM(self, req: cache_pb2.GetBaseVMRequest, ctx: ServerContext) -> cache_pb2.GrpcVM:
        if req.key != self.key:
            raise NotFound(f"this cache holds clones of template {self.key}, not {req.key}")
        while self.ready:
            vm = self.ready.pop(0)
            self._wake.set()
            if not await _alive(vm.hv):
                log.warning("vmcache: VM %s died while cached", vm.id)
                await self._destroy(vm)
                continue
            assert isinstance(vm.hv, HandOver)
            vm.record = await vm.hv.release()
            vm.state = "leased"
            self.leased[vm.id] = vm
            self._spawn(self._expire(vm))
            base = self.base
            return cache_pb2.GrpcVM(id=vm.id, hypervisor=json.dumps(vm.record).encode(), cpu=base.vcpus,
                                    memory=base.memory_mib, driver=self.driver, key=self.key)
        raise NotFound("no pre-booted VM ready (refilling)")

    async def ConfirmVM(self, req: cache_pb2.ConfirmVMRequest, ctx: ServerContext) -> empty_pb2.Empty:
        vm = self.leased.pop(req.id, None)
        if vm is None:
            raise NotFound(f"VM {req.id} is not leased (expired?)")
        self.handed += 1
        self._disown(vm.id)
        log.info("vmcache: VM %s handed over", vm.id)
        return empty_pb2.Empty()

    async def Status(self, req: empty_pb2.Empty, ctx: ServerContext) -> cache_pb2.GrpcStatus:
        vms = [cache_pb2.GrpcVMStatus(pid=vm.hv.vmm_pid() or int(vm.record.get("pid") or 0), cpu=self.base.vcpus,
                                      memory=self.base.memory_mib, id=vm.id, state=vm.state)
               for vm in [*self.ready, *self.leased.values()]]
        return cache_pb2.GrpcStatus(pid=os.getpid(), vmstatus=vms, key=self.key, wanted=self.number,
                                    handed_out=self.handed, template_path=str(self.template.path))

    async def Quit(self, req: empty_pb2.Empty, ctx: ServerContext) -> empty_pb2.Empty:
        asyncio.get_running_loop().call_soon(self._stop.set)
        return empty_pb2.Empty()

    async def _expire(self, vm: CachedVm) -> None:
        await asyncio.sleep(LEASE_SECONDS)
        if self.leased.pop(vm.id, None) is not None:
            log.warning("vmcache: lease of VM %s expired unconfirmed; killing it", vm.id)
            await self._destroy(vm)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, ready: asyncio.Event | None = None) -> None:
        await self.recover_leftovers()
        await self.ensure_template()
        server = Server()
        server.register_service(cache_pb2.DESCRIPTOR.services_by_name["VmCache"], self)
        Path(self.endpoint).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        await server.start_unix(self.endpoint)
        log.info("vmcache: serving %s, keeping %d clone(s) of template %s", self.endpoint, self.number, self.key)
        if ready is not None:
            ready.set()
        self._spawn(self._fill())
        try:
            await self._stop.wait()
        finally:
            await server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for vm in [*self.ready, *self.leased.values()]:
                with contextlib.suppress(Exception):
                    await self._destroy(vm)
            self.ready.clear()
            self.leased.clear()
            if not self._owned:
                self.journal_path.unlink(missing_ok=True)
            log.info("vmcache: stopped")

    def stop(self) -> None:
        self._stop.set()


async def _alive(hv: Hypervisor) -> bool:
    """The VMM process still runs (``wait`` has not resolved)."""
    try:
        await asyncio.wait_for(hv.wait(), timeout=0.001)
    except TimeoutError:
        return True
    except KataColoError:
        return False
    return False


def main(argv: list[str] | None = None) -> int:
    from shim import config as cfgmod

    ap = argparse.ArgumentParser(prog="kata-colo-vmcache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="configuration file (default: $KATA_COLO_CONFIG, /etc/kata-colo/...)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = cfgmod.load(args.config)
        if cfg.factory.vm_cache_number <= 0:
            raise FailedPrecondition(f"{cfg.source}: [factory] vm_cache_number is 0 (the VM cache is off)")
    except KataColoError as exc:
        print(f"kata-colo-vmcache: {exc.message}", file=sys.stderr)
        return 2

    async def serve() -> None:
        server = VmCacheServer(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.run()

    try:
        asyncio.run(serve())
    except KataColoError as exc:
        print(f"kata-colo-vmcache: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
