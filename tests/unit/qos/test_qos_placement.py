"""The placement hot path: pure Python and Cython give the same writes and the same failures;
v1 hierarchy de-duplication for co-mounted controllers."""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from shim.resources.qos import placement
from shim.resources.qos.cgroup_v1 import V1Driver
from shim.resources.qos.cgroupfs import cgroup_mounts, v1_mountpoints

IMPLS = ["python", pytest.param("cython", marks=pytest.mark.skipif(
    placement.cython_placer() is None, reason="shim._speedups.pinning not built"))]


def _placer(name: str) -> placement.Placer:
    return placement.available_placers()[name]


@pytest.mark.parametrize("impl", IMPLS)
def test_writes_each_tid_once_per_file_and_reports_failures(impl: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("")
    b.write_text("")
    missing = str(tmp_path / "missing")
    ops = [(11, (str(a), str(b)), None), (22, (str(a),), None), (33, (missing,), None)]
    failures = _placer(impl)(ops)
    # one open per file, one write() per tid, in op order (a regular file concatenates them)
    assert a.read_text() == "1122" and b.read_text() == "11"
    assert failures == [(33, missing, errno.ENOENT)]


@pytest.mark.parametrize("impl", IMPLS)
def test_affinity_of_a_real_thread(impl: str) -> None:
    stop = threading.Event()
    ready = threading.Event()
    tid: list[int] = []

    def body() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        stop.wait()

    t = threading.Thread(target=body)
    t.start()
    try:
        ready.wait()
        cpu = min(os.sched_getaffinity(0))
        assert _placer(impl)([(tid[0], (), (cpu,))]) == []
        assert os.sched_getaffinity(tid[0]) == {cpu}
        everything = tuple(sorted(os.sched_getaffinity(0)))
        assert _placer(impl)([(tid[0], (), everything)]) == []
        assert os.sched_getaffinity(tid[0]) == set(everything)
    finally:
        stop.set()
        t.join()
    # a thread id that cannot exist (ids are < pid_max): ESRCH, reported, not raised
    gone = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert _placer(impl)([(gone, (), (0,))]) == [(gone, placement.AFFINITY, errno.ESRCH)]


def test_best_placer_prefers_the_extension() -> None:
    fast = placement.cython_placer()
    assert placement.best_placer() is (fast or placement.place_threads_py)


def test_v1_co_mounted_hierarchies_are_deduplicated(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {tmp_path}/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
                      f"cgroup {tmp_path}/cpuset cgroup rw,cpuset 0 0\n")
    mp = v1_mountpoints(cgroup_mounts(str(mounts)))
    assert mp == {"cpu": f"{tmp_path}/cpu,cpuacct", "cpuacct": f"{tmp_path}/cpu,cpuacct",
                  "cpuset": f"{tmp_path}/cpuset"}
    d = V1Driver(mp)
    assert d.hierarchies == [f"{tmp_path}/cpu,cpuacct", f"{tmp_path}/cpuset"]
    assert d.attach_files("r/sb/vmm") == (f"{tmp_path}/cpu,cpuacct/r/sb/vmm/tasks", f"{tmp_path}/cpuset/r/sb/vmm/tasks")
