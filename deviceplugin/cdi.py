"""CDI specs for the devices the plugin hands out (``<cdi dir>/kata-colo.io-<class>.json``).

Allocate answers with a CDI name ``<resource>=<device id>`` (kubelet's DevicePluginCDIDevices,
KEP-4009) and the shim resolves ``cdi.k8s.io/*`` annotations through these specs
(shim.resources.blockdev.requests.cdi_device_nodes), so a pod gets the ``/dev/vfio/<group>`` node
however the device reached it. Written atomically; a spec whose devices are all gone is removed.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deviceplugin.discovery import VfioDevice

CDI_VERSION = "0.6.0"


def device_name(device_id: str) -> str:
    return device_id


def spec_path(cdi_dir: str, resource: str) -> Path:
    return Path(cdi_dir) / (resource.replace("/", "-") + ".json")


def write_spec(cdi_dir: str, resource: str, devices: Sequence[VfioDevice]) -> Path:
    path = spec_path(cdi_dir, resource)
    if not devices:
        path.unlink(missing_ok=True)
        return path
    doc = {"cdiVersion": CDI_VERSION, "kind": resource,
           "devices": [{"name": device_name(d.id),
                        "containerEdits": {"deviceNodes": [{"path": d.vfio_node, "type": "c"}]}}
                       for d in devices]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cdi-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
