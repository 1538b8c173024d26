"""Co-location QoS on the host: priority config, the vCPU-priority annotation, cgroup v1/v2
drivers, the placement hot path and :class:`QosManager` (see manager.py for the layout)."""
from shim.resources.qos.annotation import ANNOTATION, GUEST_PATH, parse_vcpu_priorities, priority_map, render_guest_json
from shim.resources.qos.detect import detect_driver, detect_version
from shim.resources.qos.driver import CgroupDriver
from shim.resources.qos.manager import QosManager, remove_offline_root
from shim.resources.qos.model import (
                                           CpuKnobs,
                                           Priority,
                                           QosConfig,
                                           from_colo_config,
                                           from_tables,
                                           shares_to_weight,
                                           weight_to_shares,
)
from shim.resources.qos.placement import best_placer, place_threads_py

__all__ = [
    "ANNOTATION", "GUEST_PATH", "CgroupDriver", "CpuKnobs", "Priority", "QosConfig", "QosManager",
    "best_placer", "detect_driver", "detect_version", "from_colo_config", "from_tables",
    "parse_vcpu_priorities", "place_threads_py", "priority_map", "remove_offline_root",
    "render_guest_json", "shares_to_weight", "weight_to_shares",
]
