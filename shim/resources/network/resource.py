"""The pod network as a sandbox resource (kata's tcfilter model, see :mod:`.pod`).

Before boot: every veth in the sandbox spec's network namespace gets a tap with tc mirred
redirects (journaled before each is made), and the taps become the VM's virtio-net NICs. After
boot: when the VM did not get them at boot (a template clone: ``ctx.plugged_at_boot`` False)
the VM factory hot-plugged them, each with its veth's MAC, and the guest is told their PCI paths
(``ctx.attached``) so it waits for them; the shim's copies of the tap fds are closed (QEMU holds
its own) and the guest gets the interfaces, routes and neighbours. Teardown and recovery remove
exactly what was added (hot-plugged NICs go with the VM).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from common.errors import FailedPrecondition, ResourceError
from hypervisor.base import VmPatch
from shim.resources.manager import ResourceContext
from shim.resources.network import pod as podnet
from shim.resources.network.tcfilter import TcFilterNetwork

log = logging.getLogger(__name__)


class NetworkResource:
    kind: ClassVar[str] = "network"

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.net: TcFilterNetwork | None = None
        self.pod: podnet.PodNetwork | None = None

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> NetworkResource | None:
        netns = podnet.netns_from_spec(dict(ctx.spec))
        if not netns or ctx.config.runtime.internetworking_model == "none":
            return None
        return cls(netns)

    def record(self) -> dict[str, Any]:
        return {"netns": self.netns, "net": self.net.to_json() if self.net is not None else ""}

    async def before_boot(self, ctx: ResourceContext) -> VmPatch:
        queues = podnet.queues_for(ctx.vcpus)
        self.net = TcFilterNetwork(self.netns, on_change=ctx.persist)
        self.pod = await asyncio.to_thread(podnet.PodNetwork.wire, self.net, queues)
        nics = self.pod.nics()  # vhost-net is the driver's choice (it knows the accelerator)
        log.info("sandbox %s: %d NIC(s) from %s (%d queue(s))", ctx.sandbox_id, len(nics), self.netns, queues)
        return VmPatch(nics=nics)

    async def after_boot(self, ctx: ResourceContext) -> None:
        if self.pod is None:
            return
        interfaces, routes, neighbors = self.pod.guest_config()
        if not ctx.plugged_at_boot:
            paths = self._hot_plugged_paths(ctx)
            interfaces = [dict(i, devicePath=paths[str(i.get("hwAddr", "")).lower()]) for i in interfaces]
        self.pod.close_fds()  # QEMU holds its own copies now
        await ctx.agent.configure_network(interfaces, routes, neighbors)

    def _hot_plugged_paths(self, ctx: ResourceContext) -> dict[str, str]:
        """{MAC: guest PCI path} of this pod's NICs the VM factory hot-plugged into a clone."""
        assert self.pod is not None
        paths = {}
        for nic in self.pod.nics():
            attached = ctx.attached.get(nic.id)
            if attached is None:
                raise FailedPrecondition(f"sandbox {ctx.sandbox_id}: NIC {nic.id} was not plugged into the clone")
            paths[nic.mac.lower()] = attached.guest_pci_path or nic.id
        return paths

    async def teardown(self) -> None:
        if self.pod is not None:
            self.pod.close_fds()
        if self.net is not None:
            await asyncio.to_thread(self.net.detach)
        self.pod = None

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        text = str(record.get("net") or "")
        if not text:
            return
        try:
            await asyncio.to_thread(TcFilterNetwork.from_json(text).detach)
        except OSError as exc:
            raise ResourceError(f"pod network cleanup: {exc}") from None
