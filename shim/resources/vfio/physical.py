"""PCI NICs in the pod's network namespace passed through to the VM: kata's physical endpoint.

A netdev of the pod netns whose ethtool bus-info is a PCI address (``dddd:bb:dd.f``; kata's
physical_endpoint.go isPhysicalIface) is not bridged with a tap: its PCI function is bound to
vfio-pci (the original driver journaled first, restored at teardown) and cold-plugged into the
VM on its own root port; after boot the agent gets the interface — by MAC, with its netns
addresses and MTU and the guest PCI path — and, when the pod has no veth (then this NIC is the
pod network), its routes. Like kata, when the host driver takes the function back the netdev
reappears in the host's initial namespace, not the pod's. veths and virtual links are left to
the pod network resource.
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.errors import KataColoError
from hypervisor.base import VfioDevice, VmPatch
from hypervisor.host import HOST, HostPaths
from shim.resources.blockdev import claims as claims_mod
from shim.resources.blockdev.resource import VFIO_BALLOON_NOTE, PciPathLookup
from shim.resources.manager import ResourceContext
from shim.resources.network import pod as podnet
from shim.resources.network.netns import run_in_netns
from shim.resources.vfio import sysfs

log = logging.getLogger(__name__)

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_LEN = 196  # struct ethtool_drvinfo
_BDF = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")


def bus_info(name: str) -> str:
    """ethtool's bus-info of netdev ``name`` in the current netns ("" when it has none)."""
    buf = array.array("B", struct.pack("I", ETHTOOL_GDRVINFO) + b"\0" * (_DRVINFO_LEN - 4))
    addr, _ = buf.buffer_info()
    ifreq = struct.pack("16sP", name.encode()[:15], addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError:
            return ""
    raw = buf.tobytes()[4 + 32 * 3: 4 + 32 * 4]
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def pci_address(info: str) -> str:
    return info.lower() if _BDF.fullmatch(info) else ""


@dataclass
class PhysicalNic:
    name: str
    bdf: str
    mac: str
    mtu: int
    addrs: list[tuple[str, int, int]] = field(default_factory=list)  # (address, prefix, family)
    routes: list[dict[str, Any]] = field(default_factory=list)
    original_driver: str = ""
    guest_pci_path: str = ""

    def to_agent_interface(self) -> dict[str, Any]:
        return {"name": self.name, "hwAddr": self.mac, "mtu": self.mtu, "devicePath": self.guest_pci_path,
                "IPAddresses": [{"family": 1 if fam == socket.AF_INET6 else 0, "address": a, "mask": str(p)}
                                for a, p, fam in self.addrs]}


def _scan_here() -> list[PhysicalNic]:
    from pyroute2 import IPRoute

    out = []
    with IPRoute(groups=0) as ipr:
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME")
            if name == "lo" or link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"):
                continue  # veth, bridge, tun, ...: virtual
            bdf = pci_address(bus_info(name))
            if not bdf:
                continue
            idx = int(link["index"])
            addrs = [(m.get("IFA_ADDRESS"), int(m["prefixlen"]), int(m["family"])) for m in ipr.get_addr(index=idx)
                     if m["family"] in (socket.AF_INET, socket.AF_INET6) and m.get("IFA_ADDRESS")
                     and not str(m.get("IFA_ADDRESS")).startswith("fe80:")]
            routes = [{"dest": f"{r.get('RTA_DST')}/{r['dst_len']}" if r.get("RTA_DST") else "",
                       "gateway": r.get("RTA_GATEWAY") or "", "device": name}
                      for r in ipr.get_routes(family=socket.AF_INET) if r.get("RTA_OIF") == idx
                      and (r.get("RTA_TABLE") or r["table"]) == 254]
            out.append(PhysicalNic(name, bdf, str(link.get("IFLA_ADDRESS")), int(link.get("IFLA_MTU")), addrs, routes))
    return out


def scan_netns(netns: str) -> list[PhysicalNic]:
    return run_in_netns(netns, _scan_here)


class PhysicalNicResource:
    kind: ClassVar[str] = "physical-nic"

    def __init__(self, sandbox_id: str, nics: list[PhysicalNic], claims_dir: str, has_veth: bool,
                 host_paths: HostPaths = HOST) -> None:
        self.sandbox_id = sandbox_id
        self.nics = nics
        self.claims_dir = claims_dir
        self.has_veth = has_veth
        self.host_paths = host_paths
        self.bound: list[str] = []
        self.taken: list[str] = []

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> PhysicalNicResource | None:
        netns = podnet.netns_from_spec(dict(ctx.spec))
        if not netns or ctx.config.runtime.internetworking_model == "none":
            return None
        nics = scan_netns(netns)
        if not nics:
            return None
        from shim.resources.network import scan as vethscan

        return cls(ctx.sandbox_id, nics, ctx.config.storage.claims_dir, bool(vethscan.scan_netns(netns)))

    def record(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "claims_dir": self.claims_dir, "claims": list(self.taken),
                "vfio": [{"bdf": n.bdf, "original": n.original_driver} for n in self.nics if n.bdf in self.bound],
                "host_root": self.host_paths.root}

    async def before_boot(self, ctx: ResourceContext) -> VmPatch:
        devs = []
        for i, nic in enumerate(self.nics):
            name = claims_mod.claim_name_for_pci(nic.bdf)
            self.taken.append(name)
            ctx.persist()
            claims_mod.take(self.claims_dir, name, self.sandbox_id, f"PCI NIC {nic.bdf} ({nic.name})")
            nic.original_driver = sysfs.pci_function(nic.bdf, self.host_paths).driver
            if nic.original_driver != sysfs.VFIO_DRIVER:
                self.bound.append(nic.bdf)
                ctx.persist()
                await asyncio.to_thread(sysfs.bind_vfio, nic.bdf, self.host_paths)
            devs.append(VfioDevice(f"kpn{i:02d}", nic.bdf))
            log.warning("sandbox %s: PCI NIC %s (%s) passed through: %s", self.sandbox_id, nic.name, nic.bdf,
                        VFIO_BALLOON_NOTE)
        return VmPatch(vfio=tuple(devs))

    async def after_boot(self, ctx: ResourceContext) -> None:
        hv = ctx.hypervisor
        for i, nic in enumerate(self.nics):
            if isinstance(hv, PciPathLookup):
                nic.guest_pci_path = await hv.guest_pci_path(f"kpn{i:02d}")
        routes = [r for n in self.nics for r in n.routes] if not self.has_veth else []
        await ctx.agent.configure_network([n.to_agent_interface() for n in self.nics], routes, [])

    async def teardown(self) -> None:
        await asyncio.to_thread(_restore, [(n.bdf, n.original_driver) for n in self.nics if n.bdf in self.bound],
                                self.claims_dir, list(self.taken), self.sandbox_id, self.host_paths)
        self.bound, self.taken = [], []

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        vfio = [(str(v.get("bdf")), str(v.get("original", ""))) for v in record.get("vfio") or []]
        await asyncio.to_thread(_restore, vfio, str(record.get("claims_dir") or claims_mod.DEFAULT_DIR),
                                [str(c) for c in record.get("claims") or []], str(record.get("sandbox_id") or ""),
                                HostPaths(str(record.get("host_root") or "")))


def _restore(vfio: list[tuple[str, str]], claims_dir: str, names: list[str], sandbox_id: str,
             paths: HostPaths) -> None:
    errors = []
    for bdf, original in vfio:
        try:
            sysfs.restore(bdf, original, paths)
        except KataColoError as exc:
            errors.append(f"{bdf}: {exc}")
    if errors:
        from common.errors import ResourceError

        raise ResourceError("restoring NIC drivers failed: " + "; ".join(errors))
    for name in names:
        claims_mod.release(claims_dir, name, sandbox_id)
