"""kata-colo-resourced's memory policy with a real offline VM: ``ctr run`` through the installed
shim (QEMU/TCG, a 1 GiB balloon VM whose VMM lives under a private offline root), the daemon
watching the host's MemAvailable with watermarks set relative to what this host has available
right now, and a synthetic host memory pressure: a process in its own host memory cgroup holding
2 GiB (:mod:`tests.support.memory_policy`).

The pressure takes MemAvailable 1 GiB under the low watermark; the daemon shrinks the VM (256 MiB
steps, down to the policy's 512 MiB minimum) within a few seconds. Once the process exits the
node is 768 MiB above the high watermark again and the VM grows back to its 1 GiB. The
watermarks keep a 512 MiB margin on each side (the VM giving back at most 512 MiB; a growth step
of 256 MiB must fit over the high watermark), so other work on the host moving a few hundred MiB
does not change the outcome. The allocating process and its cgroup are removed whatever happens.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.support.containerd import NoShim
from tests.support.memory_policy import GIB, MIB, Hog, Resourced, meminfo, offline_vm, policy_text, wait_for, watermarks

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]
HOG = 2 * GIB


@pytest.fixture
def vm():
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    try:
        with offline_vm(1024) as v:
            yield v
    except NoShim as exc:
        pytest.skip(str(exc))


def test_host_memory_pressure_shrinks_the_offline_vm_and_its_end_grows_it_back(vm, tmp_path):
    assert vm.memory() == (GIB, GIB)
    total, available = meminfo()
    if available < HOG + 2 * GIB:
        pytest.skip(f"only {available // MIB} MiB available: no room for a {HOG // MIB} MiB pressure")
    policy = tmp_path / "resourced.toml"
    policy.write_text(policy_text(vm.root, *watermarks(total, available, HOG)))
    hog = Hog(HOG)
    daemon = Resourced(policy, vm.conf, tmp_path / "resourced.log")
    try:
        time.sleep(2)  # rounds without pressure: nothing moves
        assert daemon.proc.poll() is None, daemon.text()
        assert vm.memory() == (GIB, GIB), daemon.text()

        hog.start(wait=False)  # allocating takes it a second or two: the clock runs from its start
        shrunk = wait_for(lambda: vm.memory()[1] <= 768 * MIB, 15)
        assert shrunk is not None, daemon.text()
        floor = wait_for(lambda: vm.memory() == (512 * MIB, 512 * MIB), 20)
        assert floor is not None, daemon.text()
        hog.wait_ready()
        print(f"pressure on: first step reached {shrunk:.2f}s after the hog started, the policy's 512 MiB "
              f"after {shrunk + floor:.2f}s")
        time.sleep(1.5)  # still under pressure: the policy's minimum holds
        assert vm.memory() == (512 * MIB, 512 * MIB)

        hog.stop()
        back = wait_for(lambda: vm.memory() == (GIB, GIB), 30)
        assert back is not None, daemon.text()
        print(f"pressure off: back to 1024 MiB in {back:.2f}s")
        text = daemon.text()
        assert "memory: pressure: available" in text and "memory: relaxed: available" in text, text
        assert "→ 768 MiB" in text and "baseline 1024 MiB" in text, text
    finally:
        hog.stop()
        assert daemon.stop() == 0, daemon.text()
    assert not hog.group.exists()
