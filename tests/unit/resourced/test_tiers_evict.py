"""Tier expansion (globs, top-most only) on a directory tree, and the eviction choice."""
from __future__ import annotations

from resourced.evict import Candidate, in_tiers, pick
from resourced.tiers import Tiers, expand, vcpu_groups, walk


def tree(root, *paths):
    for p in paths:
        (root / p).mkdir(parents=True, exist_ok=True)


def test_expand(tmp_path):
    tree(tmp_path, "kubepods/burstable/podA", "kubepods/podG1", "kubepods/podG2/c1", "kubepods/besteffort/podB",
         "kata-colo/sb1/vcpu-low", "kata-colo/sb1/vmm")
    base = str(tmp_path)
    assert expand(base, ["kubepods/burstable", "kubepods/pod*"]) == ["kubepods/burstable", "kubepods/podG1",
                                                                     "kubepods/podG2"]
    assert expand(base, ["kubepods/burstable", "kubepods/burstable/podA"]) == ["kubepods/burstable"]
    assert expand(base, ["missing/*", "kubepods.slice/x"]) == []
    assert expand(base, ["/kata-colo/"]) == ["kata-colo"]
    assert walk(base, "kata-colo") == ["kata-colo", "kata-colo/sb1", "kata-colo/sb1/vcpu-low", "kata-colo/sb1/vmm"]
    assert vcpu_groups(base, ["kata-colo"]) == ["kata-colo/sb1/vcpu-low"]
    assert Tiers(("a", "b"), ("b",)).overlap() == ["b"]


def test_pick():
    assert pick([]) is None
    a = Candidate("a", "ns/a", priority=0, created_at=10)
    b = Candidate("b", "ns/b", priority=-1, created_at=5)
    c = Candidate("c", "ns/c", priority=0, created_at=20)
    assert pick([a, b, c]) is b             # lowest priority first
    assert pick([a, c]) is c                # then the newest


def test_in_tiers():
    tiers = ["kubepods/besteffort", "kata-colo", "kubepods.slice/kubepods-besteffort.slice"]
    assert in_tiers("/kubepods/besteffort/pod1", tiers)
    assert in_tiers("kubepods-besteffort-pod1.slice", tiers)
    assert in_tiers("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice", tiers)
    assert not in_tiers("/kubepods/burstable/pod1", tiers)
    assert not in_tiers("", tiers)
    assert not in_tiers("/a/../b", tiers)
