"""[colo] keys of the configuration file: sandbox_cgroup_only, overhead, tiers, [colo.vmm],
priority flags; the shipped defaults parse and isolate (cpu.idle on the root and low)."""
from __future__ import annotations

import pytest

from common.errors import ConfigError
from shim import config
from shim.resources.qos.model import from_colo_config


def test_shipped_defaults():
    cfg = config.load(str(config.PACKAGED_DEFAULT))
    q = from_colo_config(cfg.colo)
    assert cfg.colo.sandbox_cgroup_only is True
    assert q.root.cpu_idle is True and q.priority("low").knobs.cpu_idle is True
    assert q.priority("high").knobs.cpu_idle is None
    assert q.vmm.cpu_shares == 1024
    assert q.lowest == "low"


def test_new_keys_parse():
    cfg = config.parse('[colo]\nsandbox_cgroup_only = false\nmemory_overhead_mib = 64\n'
                       'online_cgroups = ["online/*"]\noffline_cgroups = ["batch"]\n'
                       '[colo.vmm]\ncpu_idle = true\n[colo.priorities.low]\nsched_idle = true\npin = true\n')
    assert cfg.colo.sandbox_cgroup_only is False and cfg.colo.memory_overhead_mib == 64
    assert cfg.colo.online_cgroups == ("online/*",) and cfg.colo.offline_cgroups == ("batch",)
    q = from_colo_config(cfg.colo)
    assert q.vmm.cpu_idle is True
    low = q.priority("low")
    assert low.sched_idle and low.pin and q.lowest == "low"


@pytest.mark.parametrize("text, needle", [
    ('[colo]\nmemory_overhead_mib = -1\n', "memory_overhead_mib"),
    ('[colo]\nonline_cgroups = ["../etc"]\n', "tier"),
    ('[colo]\noffline_cgroups = ["a b"]\n', "tier"),
    ('[colo]\nsandbox_cgroup_only = "yes"\n', "sandbox_cgroup_only"),
    ('[colo]\nvmm = 3\n', "vmm"),
])
def test_bad_colo(text, needle):
    with pytest.raises(ConfigError, match=needle):
        config.parse(text)


def test_bad_vmm_and_flags():
    cfg = config.parse('[colo.vmm]\npin = true\n[colo.priorities.low]\n')
    with pytest.raises(ConfigError, match="colo.vmm"):
        from_colo_config(cfg.colo)
    cfg = config.parse('[colo.priorities.low]\nsched_idle = 1\n')
    with pytest.raises(ConfigError, match="sched_idle"):
        from_colo_config(cfg.colo)
