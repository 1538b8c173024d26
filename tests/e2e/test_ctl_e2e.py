"""``kata-colo-ctl`` on a real sandbox: containerd 1.6 + ctr + the installed shim + QEMU (TCG), a
pod annotated ``vcpu-priorities=high:1,low:1`` with ``default_vcpus=2``.

``set-priority`` moves vCPU 1's host thread from ``vcpu-low`` to ``vcpu-high`` (read back from
/proc/<qemu>/task/<tid>/cgroup) and the guest's priority cpusets follow (read in the guest with
``kata-colo-ctl exec``, which needs ``debug_console_enabled``); ``status`` shows it; ``knobs``
changes the host cgroup; ``metrics`` carries the guest, hypervisor and co-location families.
The configuration is the one in force (``$KATA_COLO_CONFIG`` picks the guest image) plus the
debug console and the priorities.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shim import config as cfgmod
from tests.e2e.test_kata_colo_e2e import assert_nothing_left
from tests.support.containerd import IMAGE, RUNTIME

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow, pytest.mark.qemu]
REPO = Path(__file__).resolve().parents[2]
STATE_ROOT = Path("/run/kata-colo/sbs")
CID = "kc-e2e-ctl"
HOST_GROUP = f"default/{CID}"  # ctr's cgroupsPath /<namespace>/<id>: the sandbox's pod group


def colo_test_config() -> str:
    """The configuration in force with the debug console on and two priorities."""
    hv = cfgmod.load(None).hypervisor
    return (f'[hypervisor.qemu]\nkernel = "{hv.kernel}"\ninitrd = "{hv.initrd}"\n'
            f'enable_annotations = ["default_vcpus", "default_memory"]\n'
            f'[agent.kata]\ndebug_console_enabled = true\n'
            f'[colo.priorities.high]\ncpu_shares = 1024\n[colo.priorities.low]\ncpu_shares = 2\n')


@pytest.fixture(scope="module", autouse=True)
def colo_config():
    """Set before the module's containerd starts: containerd passes its environment to the shim."""
    d = tempfile.mkdtemp(prefix="kc-ctl-e2e-")
    path = Path(d) / "configuration.toml"
    path.write_text(colo_test_config())
    old = os.environ.get(cfgmod.ENV_PATH)
    os.environ[cfgmod.ENV_PATH] = str(path)
    yield str(path)
    if old is None:
        os.environ.pop(cfgmod.ENV_PATH, None)
    else:
        os.environ[cfgmod.ENV_PATH] = old
    shutil.rmtree(d, ignore_errors=True)


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctl", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def thread_cgroup(pid: int, tid: int) -> str:
    text = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
    return next(line.split(":", 2)[2] for line in text.splitlines() if "cpuacct" in line.split(":")[1]
                or line.split(":")[1] == "cpu")


@pytest.fixture(scope="module")
def pod(kata_containerd):
    c = kata_containerd
    c.ctr("run", "-d", "--runtime", RUNTIME,
          "--annotation", "io.katacontainers.config.hypervisor.default_vcpus=2",
          "--annotation", "io.katacontainers.colo.vcpu-priorities=high:1,low:1",
          IMAGE, CID, "sleep", "600")
    try:
        yield c
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", CID, check=False)
        c.ctr("task", "rm", "-f", CID, check=False)
        c.ctr("container", "rm", CID, check=False)
        assert_nothing_left(c, CID)


def status() -> dict:
    r = ctl("status", CID[:9], "--json")  # a unique prefix of the id
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def guest(*argv: str) -> str:
    r = ctl("exec", CID, "--", *argv)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def test_set_priority_moves_the_host_thread_and_the_guest_cpuset(pod):
    doc = status()
    assert doc["state"] == "running" and doc["vmm_pid"]
    vcpus = {v["vcpu"]: v for v in doc["vcpus"]}
    assert vcpus[0]["priority"] == "high" and vcpus[1]["priority"] == "low"
    qemu, tid = doc["vmm_pid"], vcpus[1]["tid"]
    assert thread_cgroup(qemu, tid) == f"/{HOST_GROUP}/vcpu-low"
    assert guest("cat", "/sys/fs/cgroup/kata-colo/prio-low/cpuset.cpus").strip() == "1"

    r = ctl("set-priority", CID, "1", "high")
    assert r.returncode == 0, r.stderr
    assert "vCPU 1 → high (now high:0,1)" in r.stdout
    assert thread_cgroup(qemu, tid) == f"/{HOST_GROUP}/vcpu-high"
    assert guest("cat", "/sys/fs/cgroup/kata-colo/prio-high/cpuset.cpus").strip() == "0-1"
    assert json.loads(guest("cat", "/run/kata-colo/vcpu-priorities.json"))["priorities"] == {"high": [0, 1]}
    doc = status()
    assert [(v["vcpu"], v["priority"], v["cgroup"]) for v in doc["vcpus"]] == [
        (0, "high", f"/{HOST_GROUP}/vcpu-high"), (1, "high", f"/{HOST_GROUP}/vcpu-high")]
    text = ctl("status", CID).stdout
    assert "PRIORITY" in text and f"/{HOST_GROUP}/vcpu-high" in text

    r = ctl("set-priority", CID, "1", "urgent")
    assert r.returncode == 1 and "unknown vCPU priority 'urgent'" in r.stderr and "HTTP 400" in r.stderr
    r = ctl("set-priority", CID, "1", "low")  # and back
    assert r.returncode == 0, r.stderr
    assert thread_cgroup(qemu, tid) == f"/{HOST_GROUP}/vcpu-low"


def test_knobs_metrics_and_exec(pod):
    r = ctl("knobs", CID, "low", "cpu_shares=64")
    assert r.returncode == 0, r.stderr
    assert Path(f"/sys/fs/cgroup/cpu/{HOST_GROUP}/vcpu-low/cpu.shares").read_text().strip() == "64"
    r = ctl("knobs", CID, "low", "cpu_shares=1")
    assert r.returncode == 1 and "HTTP 400" in r.stderr
    assert status()["priorities"]["low"]["in_force"]["cpu_shares"] == 64

    r = ctl("metrics", CID)
    assert r.returncode == 0, r.stderr
    for needle in ('kata_guest_meminfo{item="mem_total"}', "kata_hypervisor_threads", "kata_agent_scrape_count",
                   'kata_colo_priority_knob{priority="low",knob="cpu_shares"} 64',
                   'kata_shim_rpc_durations_histogram_milliseconds_count{action="create"} 1'):
        assert needle in r.stdout, needle

    r = ctl("exec", CID, "--", "sh", "-c", "echo in-guest; exit 4")
    assert r.returncode == 4 and r.stdout == "in-guest\n"
    r = ctl("exec", CID, "--", "no-such-command")
    assert r.returncode == 1 and "command not found" in r.stderr
