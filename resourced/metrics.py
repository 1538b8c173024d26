"""The daemon's own Prometheus metrics (names are stable: dashboards and alerts use them).

======================================================= ===================================
kata_colo_resourced_cpu_usage_cores{tier}               node | online | offline | system
kata_colo_resourced_node_cpus                           online CPUs of the node
kata_colo_resourced_offline_capacity_cores              the suppression formula's result
kata_colo_resourced_offline_cpuset_cpus                 CPUs the offline tier was given
kata_colo_resourced_offline_quota_cores                 CFS quota given (−1: unlimited)
kata_colo_resourced_cpu_satisfaction_ratio              offline limit / offline request
kata_colo_resourced_decisions_total{policy,action}      actions decided (applied or not)
kata_colo_resourced_apply_errors_total{policy,action}   actions that failed
kata_colo_resourced_evictions_total                     pods stopped
kata_colo_resourced_memory_node_bytes{item}             total | available (the memory policy's node)
kata_colo_resourced_memory_node_psi_some_avg10          memory PSI "some" avg10 (0 without PSI)
kata_colo_resourced_memory_pressure                     1 while the node is under memory pressure
kata_colo_resourced_memory_sandboxes_managed            sandboxes the memory policy manages
kata_colo_resourced_memory_sandbox_bytes{sandbox,item}  target | actual | floor | baseline
kata_colo_resourced_memory_resizes_total{result}        ok | timeout | refused | failed | dry_run
kata_colo_resourced_sample_seconds                      histogram: sample+decide+apply time
kata_colo_resourced_feature{feature}                    1 when the kernel feature is in use
kata_colo_resourced_dry_run                             1 with --dry-run
======================================================= ===================================
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "kata_colo_resourced"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.usage = Gauge(f"{PREFIX}_cpu_usage_cores", "CPU usage by tier, in cores", ["tier"], registry=r)
        self.node_cpus = Gauge(f"{PREFIX}_node_cpus", "Online CPUs of the node", registry=r)
        self.gauges: dict[str, Any] = {name: Gauge(f"{PREFIX}_{name}", help_, registry=r) for name, help_ in (
            ("offline_capacity_cores", "Offline CPU capacity from the suppression formula"),
            ("offline_cpuset_cpus", "CPUs in the offline tier's cpuset"),
            ("offline_quota_cores", "Offline CFS quota in cores (-1 = unlimited)"),
            ("cpu_satisfaction_ratio", "Offline CPU limit / offline CPU request"),
            ("memory_node_psi_some_avg10", "Node memory PSI some avg10 (0 without PSI)"),
            ("memory_pressure", "1 while the node is under memory pressure"),
            ("memory_sandboxes_managed", "Sandboxes the memory policy manages"))}
        node = Gauge(f"{PREFIX}_memory_node_bytes", "The memory policy's node memory", ["item"], registry=r)
        self.gauges["memory_node_total_bytes"] = node.labels("total")
        self.gauges["memory_node_available_bytes"] = node.labels("available")
        self.sandbox_memory = Gauge(f"{PREFIX}_memory_sandbox_bytes", "Memory of the sandboxes the memory "
                                    "policy sees: target, actual, floor, baseline", ["sandbox", "item"], registry=r)
        self.resizes = Counter(f"{PREFIX}_memory_resizes_total", "Memory resizes by result", ["result"], registry=r)
        self.decisions = Counter(f"{PREFIX}_decisions_total", "Actions decided", ["policy", "action"], registry=r)
        self.errors = Counter(f"{PREFIX}_apply_errors_total", "Actions that failed", ["policy", "action"], registry=r)
        self.evictions = Counter(f"{PREFIX}_evictions_total", "Offline pods stopped", registry=r)
        self.sample_seconds = Histogram(f"{PREFIX}_sample_seconds", "Sample + decide + apply time",
                                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
                                        registry=r)
        self.feature = Gauge(f"{PREFIX}_feature", "Kernel feature in use (1) or absent (0)", ["feature"], registry=r)
        self.dry_run = Gauge(f"{PREFIX}_dry_run", "1 when actions are only logged", registry=r)

    def set_sandbox_memory(self, values: dict[str, dict[str, float]]) -> None:
        """Replace the per-sandbox series (a sandbox that left drops out)."""
        self.sandbox_memory.clear()
        for sid, items in values.items():
            for item, v in items.items():
                self.sandbox_memory.labels(sid, item).set(v)

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
