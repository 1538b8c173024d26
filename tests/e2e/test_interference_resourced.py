"""kata-colo-resourced with a real offline VM (ctr run through the installed shim, QEMU/TCG, two
busy vCPUs under the offline root with the shipped knobs): an online burst (two busy processes
in the online cgroup) shrinks the offline root's cpuset — the groups of the VM below it follow —
within 1 s, and the CPUs come back once the burst ends. The host is shared with other work,
which the daemon rightly counts as system usage: the test first waits for a quiet moment (the
whole cpuset given to the offline tier) and skips if there is none within a minute."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shim.resources.qos import cgroupfs, detect_driver
from shim.resources.qos.model import format_cpuset
from tests.support.containerd import IMAGE, RUNTIME, NoShim, product_shim_dir, start_containerd, stop_containerd

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")]
BURN = "while True: pass\n"


@pytest.fixture(scope="module")
def colo_containerd(tmp_path_factory):
    """A private containerd whose shim reads the shipped configuration with a private offline root."""
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")
    if not Path("/var/lib/kata-colo/images/current/manifest.json").exists():
        pytest.skip("guest image not built")
    root = f"kc-e2e-offline-{secrets.token_hex(3)}"
    shipped = (REPO / "shim" / "defaults" / "configuration.toml").read_text()
    conf = tmp_path_factory.mktemp("conf") / "configuration.toml"
    conf.write_text(shipped.replace("\n[colo]\n", f'\n[colo]\ncgroup_root = "{root}"\n', 1))
    old = os.environ.get("KATA_COLO_CONFIG")
    os.environ["KATA_COLO_CONFIG"] = str(conf)
    try:
        shim_dir = product_shim_dir()
    except NoShim as exc:
        pytest.skip(str(exc))
    c = start_containerd([shim_dir])
    try:
        c.import_busybox()
        yield c, root, conf
    finally:
        stop_containerd(c)
        shutil.rmtree(shim_dir, ignore_errors=True)
        if old is None:
            os.environ.pop("KATA_COLO_CONFIG", None)
        else:
            os.environ["KATA_COLO_CONFIG"] = old
        detect_driver().remove_tree(root, "")


def wait_for(fn, timeout: float, step: float = 0.01) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def test_online_burst_suppresses_a_real_vm_within_a_second(colo_containerd, tmp_path):
    c, root, conf = colo_containerd
    driver = detect_driver()
    online = f"kc-e2e-online-{secrets.token_hex(3)}"
    driver.create(online)
    name = f"kc-supp-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen] = []
    full = format_cpuset(cgroupfs.online_cpus())
    cpuset = Path(driver.mountpoints["cpuset"]) / root / "cpuset.cpus"  # type: ignore[attr-defined]
    policy = tmp_path / "resourced.toml"
    shipped = (REPO / "deploy" / "resourced.toml").read_text().replace('listen = "127.0.0.1:9301"', 'listen = ""')
    policy.write_text(shipped + f'\n[tiers]\nonline = ["{online}"]\noffline = ["{root}"]\n')
    daemon = None
    try:
        c.ctr("run", "-d", "--runtime", RUNTIME, "--cgroup", "",
              "--annotation", "io.katacontainers.config.hypervisor.default_vcpus=2",
              "--annotation", "io.katacontainers.colo.vcpu-priorities=low:2",
              IMAGE, name, "sh", "-c", "while :; do :; done & while :; do :; done")
        vm_groups = [g for g in driver.children(f"{root}/{name}")]
        assert sorted(g.rsplit("/", 1)[1] for g in vm_groups) == ["vcpu-low", "vmm"]
        daemon = subprocess.Popen([sys.executable, "-m", "resourced", "--policy", str(policy), "--kata-config",
                                   str(conf)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if wait_for(lambda: cpuset.read_text().strip() == full, 60, 0.1) is None:
            pytest.skip("the host never had a quiet second (other load kept the offline tier suppressed)")
        time.sleep(0.5)
        files = driver.attach_files(online)

        def enter() -> None:
            for f in files:
                cgroupfs.write_value(f, os.getpid())

        procs += [subprocess.Popen([sys.executable, "-c", BURN], preexec_fn=enter) for _ in range(2)]
        reaction = wait_for(lambda: cpuset.read_text().strip() != full, 5)
        assert reaction is not None and reaction < 1.0, reaction
        shrunk = cpuset.read_text().strip()
        for g in vm_groups:  # the VM's own groups follow the tier (v1 keeps children within it)
            assert (Path(driver.mountpoints["cpuset"]) / g / "cpuset.cpus").read_text().strip() == shrunk
        for p in procs:
            p.kill()
            p.wait()
        back = wait_for(lambda: cpuset.read_text().strip() == full, 30, 0.05)
        assert back is not None, "the offline tier never got its CPUs back"
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            log = daemon.communicate(timeout=15)[0].decode()
            assert daemon.returncode == 0, log
        c.ctr("task", "kill", "-s", "KILL", name, check=False)
        deadline = time.monotonic() + 30
        while c.ctr("task", "delete", name, check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        c.ctr("container", "rm", name, check=False)
        driver.remove_tree(online, "")
    # the daemon gave the CPUs back on SIGTERM; the last sandbox leaving removed the root it made
    assert not cpuset.exists() or cpuset.read_text().strip() == full
