"""``kata-colo-device-plugin``: discover vfio-pci NVMe/ENI functions, write their CDI specs,
serve one DevicePlugin per resource, register with kubelet, rescan periodically."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from deviceplugin import cdi, discovery
from deviceplugin.plugin import DevicePlugin
from deviceplugin.registrar import DEVICE_PLUGIN_PATH, Registrar
from hypervisor.host import HostPaths

log = logging.getLogger("kata-colo-device-plugin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kata-colo-device-plugin", description=__doc__)
    p.add_argument("--device-plugin-dir", default=DEVICE_PLUGIN_PATH)
    p.add_argument("--nvme-resource", default="kata-colo.io/nvme", help='"" disables NVMe')
    p.add_argument("--eni-resource", default="kata-colo.io/eni", help='"" disables ENIs')
    p.add_argument("--eni-vendor", action="append", default=[],
                   help="PCI vendor id (hex) of ENI NICs, repeatable; default: every NIC on vfio-pci")
    p.add_argument("--cdi-dir", default="/var/run/cdi")
    p.add_argument("--sysfs-root", default="", help="prefix of /sys and /dev (tests)")
    p.add_argument("--scan-interval", type=float, default=5.0)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    paths = HostPaths(args.sysfs_root)
    vendors = [int(v, 16) for v in args.eni_vendor]
    plugins = {kind: DevicePlugin(res) for kind, res in (("nvme", args.nvme_resource), ("eni", args.eni_resource))
               if res}
    registrars = [Registrar(p, args.device_plugin_dir) for p in plugins.values()]
    tasks = [asyncio.create_task(r.run()) for r in registrars]
    try:
        while True:
            found = await asyncio.to_thread(discovery.scan, paths, vendors)
            for kind, plugin in plugins.items():
                mine = [d for d in found if d.kind == kind]
                if await plugin.update(mine):
                    cdi.write_spec(args.cdi_dir, plugin.resource, mine)
                    log.info("%s: %d device(s)", plugin.resource, len(mine))
            done = [t for t in tasks if t.done()]
            for t in done:
                t.result()  # a registrar that died is fatal: the DaemonSet restarts us
            await asyncio.sleep(args.scan_interval)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = asyncio.new_event_loop()
    task = loop.create_task(run(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()
