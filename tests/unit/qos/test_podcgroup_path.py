"""cgroupsPath spellings → the sandbox group, memory-limit arithmetic, which group a sandbox
gets (pure: no cgroup is touched)."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from shim.config import ColoConfig, Config
from shim.resources.manager import ResourceContext
from shim.resources.podcgroup import host_memory_limit, pod_memory_limit, resolve, sandbox_group
from shim.resources.podcgroup.path import expand_slice, from_spec, under

ID = "0123456789abcdef" * 4


@pytest.mark.parametrize("value, want", [
    (f"/kubepods/besteffort/pod1234/{ID}", f"kubepods/besteffort/pod1234/{ID}"),
    ("/default/my-ctr", "default/my-ctr"),
    ("default/my-ctr", "default/my-ctr"),
    ("//a///b/", "a/b"),
    (f"kubepods-besteffort-pod1234.slice:cri-containerd:{ID}",
     f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-{ID}.scope"),
    ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
    ("-.slice:kata:x", "kata-x.scope"),
    (":prefix:x", "prefix-x.scope"),
    ("machine.slice::x", "machine.slice/x.scope"),
    ("a.slice:p:b.slice", "a.slice/b.slice"),
])
def test_resolve(value, want):
    assert resolve(value) == want


@pytest.mark.parametrize("value", [None, "", "   "])
def test_resolve_empty_is_none(value):
    assert resolve(value) is None


@pytest.mark.parametrize("value", [
    "/", "/a/../b", "/a/./b", "a/b\nc", "kubepods.slice:x", "a:b:c:d", "bad-.slice:p:x", "a--b.slice:p:x",
    "-a.slice:p:x", "noslice:p:x", "x.slice:p:", "/a b/c", "/" + "/".join(["d"] * 17),
])
def test_resolve_rejects(value):
    with pytest.raises(ConfigError):
        resolve(value)


def test_expand_slice():
    assert expand_slice("-.slice") == []
    assert expand_slice("") == []
    assert expand_slice("a-b-c.slice") == ["a.slice", "a-b.slice", "a-b-c.slice"]


def test_from_spec():
    assert from_spec({}) is None
    assert from_spec({"linux": {}}) is None
    assert from_spec({"linux": {"cgroupsPath": "/default/x"}}) == "default/x"
    with pytest.raises(ConfigError):
        from_spec({"linux": {"cgroupsPath": 7}})


def test_under():
    assert under("kata-colo/x", "kata-colo") and under("kata-colo", "kata-colo")
    assert not under("kata-colo-2/x", "kata-colo")


def test_memory_limits():
    spec = {"linux": {"resources": {"memory": {"limit": 2 << 30}}}}
    assert pod_memory_limit(spec, {}) == 2 << 30
    assert pod_memory_limit({}, {}) is None
    assert pod_memory_limit({"linux": {"resources": {"memory": {"limit": -1}}}}, {}) is None
    assert pod_memory_limit({}, {"io.kubernetes.cri.sandbox-memory": "1048576"}) == 1 << 20
    with pytest.raises(ConfigError):
        pod_memory_limit({}, {"io.kubernetes.cri.sandbox-memory": "lots"})
    with pytest.raises(ConfigError):
        pod_memory_limit({"linux": {"resources": {"memory": {"limit": "1G"}}}}, {})
    assert host_memory_limit(None, 512, 256) is None
    assert host_memory_limit(2 << 30, 512, 256) == (2 << 30) + (256 << 20)
    # a pod limit below the guest's RAM: the guest RAM is what the VM can fill
    assert host_memory_limit(256 << 20, 512, 256) == (512 + 256) << 20


def ctx(spec: dict, colo: ColoConfig) -> ResourceContext:
    return ResourceContext(sandbox_id="sb1", state_dir=Path("/nonexistent"), config=Config(colo=colo), spec=spec,
                           hypervisor=None)


def test_sandbox_group():
    colo = ColoConfig()
    assert sandbox_group(ctx({}, colo)) == "kata-colo/sb1"
    assert sandbox_group(ctx({"linux": {"cgroupsPath": "/default/sb1"}}, colo)) == "default/sb1"
    assert sandbox_group(ctx({"linux": {"cgroupsPath": ""}}, colo)) == "kata-colo/sb1"
    assert sandbox_group(ctx({}, ColoConfig(sandbox_cgroup_only=False))) is None
