"""The daemon: load the policy file, detect kernel features, then one loop — every
``interval_ms`` sample the node, let each policy decide, apply (or log, ``--dry-run``), export.

Cgroup writes are applied in the loop; evictions (CRI) and memory resizes (PUT /colo/memory on a
shim) run as background tasks whose outcome is logged, counted and, for resizes, reported back to
the memory policy (:meth:`MemoryPolicy.resized`). With the memory policy on, the sandboxes' memory
views are refreshed in the background every ``[memory] sample_interval_ms``; the node's memory
(/proc/meminfo, PSI) is read every sample.

Start-up fails (PolicyError with file:line) on an invalid policy file, before touching any
cgroup. On SIGTERM/SIGINT every policy's release actions run (offline limits given back) and
the daemon exits 0. A failing action is logged and counted, never fatal: the next sample
decides again from what it reads.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import KataColoError
from resourced import evict
from resourced import features as featmod
from resourced.actuator import Actuator
from resourced.metrics import Metrics
from resourced.policies import REGISTRY, Policy
from resourced.policies.base import Action, EvictPod, NodeSample
from resourced.policies.memory import MemoryPolicy, MemorySample, ResizeMemory
from resourced.policies.memory_sample import SandboxPoller, memory_mount, read_cgroup_node, read_host
from resourced.policyfile import Table, parse
from resourced.resize import resize
from resourced.sampler import CpuSampler, online_limits
from resourced.tiers import Tiers
from shim.resources.qos.detect import detect_driver
from shim.resources.qos.driver import CgroupDriver

log = logging.getLogger("kata-colo-resourced")

DEFAULT_POLICY = "/etc/kata-colo/resourced.toml"
DEFAULT_LISTEN = "127.0.0.1:9301"
DEFAULT_CRI = "/run/containerd/containerd.sock"


@dataclass
class DaemonConfig:
    interval_ms: float = 200.0
    listen: str = DEFAULT_LISTEN
    cri_endpoint: str = DEFAULT_CRI
    node_cgroup: str = ""
    tiers: Tiers = Tiers((), ())
    policies: dict[str, Policy] = field(default_factory=dict)
    source: str = "<defaults>"


def load(text: str, file: str, colo: Any) -> DaemonConfig:
    """Policy file text → DaemonConfig; ``colo`` (shim.config.ColoConfig) supplies the default
    tiers: online = colo.online_cgroups, offline = colo.cgroup_root + colo.offline_cgroups."""
    data, loc = parse(text, file)
    top = Table(data, (), loc)
    d = top.sub("daemon")
    cfg = DaemonConfig(
        interval_ms=float(d.number("interval_ms", 200.0, 20, 60_000)),
        listen=d.string("listen", DEFAULT_LISTEN),
        cri_endpoint=d.string("cri_endpoint", DEFAULT_CRI),
        node_cgroup=d.string("node_cgroup", "").strip("/"),
        source=file)
    if ".." in cfg.node_cgroup.split("/"):
        raise d.error("node_cgroup", f"bad cgroup path {cfg.node_cgroup!r}")
    if cfg.listen and not cfg.listen.rpartition(":")[2].isdigit():
        raise d.error("listen", f"must be host:port or \"\", not {cfg.listen!r}")
    d.done()
    t = top.sub("tiers")
    online = t.strings("online", list(colo.online_cgroups))
    offline = t.strings("offline", [colo.cgroup_root, *colo.offline_cgroups])
    for key, paths in (("online", online), ("offline", offline)):
        for p in paths:
            if not p.strip("/") or ".." in p.split("/"):
                raise t.error(key, f"bad cgroup path {p!r}")
    tiers = Tiers(tuple(online), tuple(offline))
    if tiers.overlap():
        raise t.error("offline", f"{tiers.overlap()[0]!r} is listed as both online and offline")
    t.done()
    cfg.tiers = tiers
    for name, cls in REGISTRY.items():
        cfg.policies[name] = cls.from_table(top.sub(name))
    top.done()
    return cfg


def load_file(path: str | None, colo: Any) -> DaemonConfig:
    """The policy file at ``path`` (must exist), else DEFAULT_POLICY if present, else defaults."""
    candidate = Path(path or DEFAULT_POLICY)
    if not candidate.exists():
        if path:
            from resourced.errors import PolicyError

            raise PolicyError(str(candidate), None, "no such policy file")
        return load("", "<defaults>", colo)
    return load(candidate.read_text(), str(candidate), colo)


class Daemon:
    def __init__(self, cfg: DaemonConfig, dry_run: bool = False, driver: CgroupDriver | None = None) -> None:
        self.cfg = cfg
        self.dry_run = dry_run
        self.driver = driver or detect_driver()
        self.sampler = CpuSampler(self.driver, cfg.tiers, cfg.node_cgroup)
        self.actuator = Actuator(self.driver, dry_run)
        self.metrics = Metrics()
        self.stopping = asyncio.Event()
        self.rounds = 0
        mem = cfg.policies.get("memory")
        self.memory: MemoryPolicy | None = mem if isinstance(mem, MemoryPolicy) and mem.config.enabled else None
        self.poller: SandboxPoller | None = None
        if self.memory is not None:
            self.poller = SandboxPoller(self.memory.config.state_root, lambda: self.sampler.groups()[1],
                                        self.driver.version)

    def _memory_sample(self, now: float) -> MemorySample | None:
        """The node's memory now and the latest sandbox views (None when unreadable: logged)."""
        if self.memory is None or self.poller is None:
            return None
        try:
            host = read_host()
            node = self.memory.config.node_cgroup
            if node:
                found = memory_mount()
                if found is None:
                    raise KataColoError("[memory] node_cgroup is set but no memory cgroup controller is mounted")
                host = read_cgroup_node(os.path.join(found[0], node), found[1], host)
        except (KataColoError, OSError, ValueError) as exc:
            self.metrics.errors.labels("memory", "sample").inc()
            log.warning("memory: cannot read the node's memory: %s", exc)
            return None
        return MemorySample(now, dt.datetime.now().time(), host, tuple(self.poller.latest.values()))

    async def _poll_sandboxes(self) -> None:
        assert self.memory is not None and self.poller is not None
        interval = self.memory.config.sample_interval_ms / 1000.0
        while not self.stopping.is_set():
            try:
                await self.poller.refresh()
            except Exception as exc:  # noqa: BLE001 - logged; the next round asks again
                log.warning("memory: polling the sandboxes failed: %s", exc)
            try:
                await asyncio.wait_for(self.stopping.wait(), interval)
            except TimeoutError:
                pass

    async def _resize(self, policy: str, a: ResizeMemory) -> None:
        try:
            out = await resize(self.memory.config.state_root if self.memory else "", a, self.dry_run)
        except Exception as exc:  # noqa: BLE001 - logged and counted; the daemon goes on
            self.metrics.errors.labels(policy, a.kind).inc()
            log.warning("%s: %s: resize failed: %s", policy, a.reason, exc)
            out = None
        if out is not None:
            self.metrics.resizes.labels(out.result).inc()
            if out.result in ("failed", "refused", "timeout"):
                self.metrics.errors.labels(policy, a.kind).inc()
            level = logging.INFO if out.result in ("ok", "dry_run") else logging.WARNING
            log.log(level, "%s: %s: %s", policy, a.reason, out.message)
        if self.memory is not None:
            self.memory.resized(a.sandbox_id, out.target if out else None, time.monotonic())

    def _apply(self, policy: str, actions: list[Action]) -> list[Action]:
        """Apply cgroup actions now; return the evictions and resizes (async: CRI, shims)."""
        evictions: list[Action] = []
        for a in actions:
            self.metrics.decisions.labels(policy, a.kind).inc()
            if isinstance(a, (EvictPod, ResizeMemory)):
                evictions.append(a)
                continue
            try:
                result = self.actuator.apply(a)
                log.info("%s: %s: %s", policy, a.reason, result)
            except (KataColoError, OSError) as exc:
                self.metrics.errors.labels(policy, a.kind).inc()
                log.warning("%s: %s: failed: %s", policy, a.reason, exc)
        return evictions

    async def _evict(self, policy: str, a: Action) -> None:
        try:
            result = await evict.evict_lowest(self.cfg.cri_endpoint, self.sampler.groups()[1], self.dry_run)
            if result.startswith("stopped"):
                self.metrics.evictions.inc()
            log.warning("%s: %s: %s", policy, a.reason, result)
        except Exception as exc:  # noqa: BLE001 - logged and counted; the daemon goes on
            self.metrics.errors.labels(policy, a.kind).inc()
            log.warning("%s: %s: eviction failed: %s", policy, a.reason, exc)

    def tick(self) -> list[tuple[str, Action]]:
        """One round: sample, decide, apply. Returns the evictions still to run."""
        t0 = time.perf_counter()
        s = self.sampler.sample()
        pending: list[tuple[str, Action]] = []
        if s is not None:
            self.rounds += 1
            m = self.metrics
            m.node_cpus.set(len(s.node_cpus))
            for tier, v in (("node", s.node_used), ("online", s.online_used), ("offline", s.offline_used),
                            ("system", s.system_used)):
                m.usage.labels(tier).set(v)
            log.debug("sample %.3fs: node %.2f online %.2f offline %.2f system %.2f cores; offline cpus %s quota %s "
                      "vcpus %d", s.interval_s, s.node_used, s.online_used, s.offline_used, s.system_used,
                      s.offline_cpus, s.offline_quota_cores, s.offline_vcpus)
            now = time.monotonic()
            extra: dict[str, Any] = {
                "online_limits": online_limits(self.driver, self.sampler.base, list(s.online_groups))}
            mem = self._memory_sample(now)
            if mem is not None:
                extra["memory"] = mem
            sample = NodeSample(now, s, extra)
            for name, policy in self.cfg.policies.items():
                pending += [(name, a) for a in self._apply(name, policy.decide(sample))]
                for g, v in policy.gauges().items():
                    if g in m.gauges:
                        m.gauges[g].set(v)
            if self.memory is not None:
                m.set_sandbox_memory(self.memory.sandbox_gauges())
        self.metrics.sample_seconds.observe(time.perf_counter() - t0)
        return pending

    async def run(self) -> int:
        feats = featmod.detect(self.driver)
        for fname, on in (("cpu_idle", feats.cpu_idle), ("cfs_burst", feats.cfs_burst),
                          ("group_identity", feats.group_identity), ("memory_wmark", feats.memory_wmark)):
            self.metrics.feature.labels(fname).set(1 if on else 0)
        log.info("kata-colo-resourced: policy %s, tiers online=%s offline=%s, interval %g ms, features %s%s",
                 self.cfg.source, list(self.cfg.tiers.online), list(self.cfg.tiers.offline),
                 self.cfg.interval_ms, feats, " (dry run)" if self.dry_run else "")
        if not feats.memory_wmark:
            log.info("memory watermark grading (memory.wmark_*) absent: upstream kernel, nothing to grade")
        self.metrics.dry_run.set(1 if self.dry_run else 0)
        if self.cfg.listen:
            self.metrics.serve(self.cfg.listen)
        online, offline = self.sampler.groups()
        for name, policy in self.cfg.policies.items():
            self._apply(name, policy.setup(feats, online, offline))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        interval = self.cfg.interval_ms / 1000.0
        next_t = loop.time()
        evicting: set[asyncio.Task[None]] = set()
        if self.memory is not None:
            poll = asyncio.create_task(self._poll_sandboxes())
            evicting.add(poll)
            poll.add_done_callback(evicting.discard)
        try:
            while not self.stopping.is_set():
                for name, a in self.tick():
                    task = asyncio.create_task(
                        self._resize(name, a) if isinstance(a, ResizeMemory) else self._evict(name, a))
                    evicting.add(task)
                    task.add_done_callback(evicting.discard)
                next_t += interval
                delay = next_t - loop.time()
                if delay < 0:
                    next_t = loop.time()
                    delay = 0
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            for task in list(evicting):  # a resize in flight goes on in its shim; stop waiting
                task.cancel()
            await asyncio.gather(*list(evicting), return_exceptions=True)
            online, offline = self.sampler.groups()
            for name, policy in self.cfg.policies.items():
                self._apply(name, policy.release(online, offline, self.sampler.node_cpus()))
            log.info("kata-colo-resourced: stopped after %d rounds", self.rounds)
        return 0


def summary(cfg: DaemonConfig) -> Mapping[str, Any]:
    return {"interval_ms": cfg.interval_ms, "listen": cfg.listen, "tiers": cfg.tiers,
            "policies": sorted(cfg.policies)}
