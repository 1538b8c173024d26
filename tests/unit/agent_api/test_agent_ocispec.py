"""Host-side OCI JSON ↔ grpc.Spec conversion (agent_api.oci_codec)."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from agent_api.agent.spec import adapt_for_guest
from agent_api.oci_codec import process_from_oci, resources_from_oci, spec_from_oci, spec_to_oci
from common.errors import InvalidArgument
from proto.kata import oci_pb2

CONFIG: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": True, "consoleSize": {"height": 24, "width": 80},
        "user": {"uid": 0, "gid": 0, "additionalGids": [10, 11]},
        "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin"], "cwd": "/",
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True, "oomScoreAdj": -998,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "pod",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc",
                "options": ["nosuid", "noexec"]}],
    "annotations": {"io.kubernetes.cri.container-type": "container"},
    "linux": {
        "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 10}],
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "resources": {
            "devices": [{"allow": False, "access": "rwm"},
                        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}],
            "memory": {"limit": 268435456, "swap": -1, "disableOOMKiller": True},
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1"},
            "pids": {"limit": 100},
            "blockIO": {"weight": 100, "throttleReadIOPSDevice": [{"major": 8, "minor": 16, "rate": 5}]},
        },
        "cgroupsPath": "/kubepods/pod1/c1",
        "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}],
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438,
                     "uid": 5, "gid": 6}],
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                                 {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                                  "args": [{"index": 0, "value": 16, "valueTwo": 2, "op": "SCMP_CMP_EQ"}]}]},
        "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
        "rootfsPropagation": "rprivate",
    },
}


def test_fields_land_on_kata_names() -> None:
    spec = spec_from_oci(CONFIG)
    assert spec.Version == "1.0.2-dev"
    assert list(spec.Process.Args) == ["sh", "-c", "echo hi"]
    assert spec.Process.ConsoleSize.Height == 24 and spec.Process.OOMScoreAdj == -998
    assert list(spec.Process.User.AdditionalGids) == [10, 11]
    assert spec.Root.Path == "rootfs" and spec.Root.Readonly
    assert spec.Linux.Resources.Memory.Limit == 268435456 and spec.Linux.Resources.Memory.Swap == -1
    assert spec.Linux.Resources.CPU.Cpus == "0-1"
    assert spec.Linux.Resources.BlockIO.ThrottleReadIOPSDevice[0].Rate == 5
    assert spec.Linux.UIDMappings[0].HostID == 1000
    assert spec.Linux.Sysctl["net.ipv4.ip_forward"] == "1"
    assert spec.Linux.Seccomp.Syscalls[1].errnoret == 1
    assert not spec.Linux.Seccomp.Syscalls[0].HasField("errnoret")
    assert spec.Linux.Devices[0].FileMode == 438
    # a device rule without major/minor means "any": -1 (Go nil) on the wire
    any_rule = spec.Linux.Resources.Devices[0]
    assert (any_rule.Major, any_rule.Minor, any_rule.Allow) == (-1, -1, False)
    # survives the wire
    again = oci_pb2.Spec.FromString(spec.SerializeToString())
    assert again == spec


def test_round_trip_is_identity_for_kata_fields() -> None:
    assert spec_to_oci(spec_from_oci(CONFIG)) == CONFIG


def test_unknown_keys_are_reported_not_fatal() -> None:
    cfg = copy.deepcopy(CONFIG)
    cfg["process"]["ioPriority"] = {"class": "IOPRIO_CLASS_IDLE"}
    cfg["linux"]["personality"] = {"domain": "LINUX"}
    cfg["domainname"] = "x"
    dropped: list[str] = []
    spec = spec_from_oci(cfg, dropped)
    assert sorted(dropped) == ["domainname", "linux.personality", "process.ioPriority"]
    assert spec_to_oci(spec) == CONFIG


@pytest.mark.parametrize("path,value", [
    (("process", "args"), "sh"),               # array expected
    (("process", "terminal"), "yes"),          # bool expected
    (("process", "user", "uid"), "0"),         # int expected
    (("process", "user", "uid"), True),        # bool is not an int
    (("linux", "sysctl"), ["a"]),              # object expected
    (("hostname",), 5),                        # string expected
    (("linux", "resources"), [1]),             # object expected
])
def test_wrong_types_are_invalid_argument(path: tuple[str, ...], value: Any) -> None:
    cfg = copy.deepcopy(CONFIG)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(InvalidArgument, match=path[-1]):
        spec_from_oci(cfg)


def test_process_and_resources_helpers() -> None:
    proc = process_from_oci({"args": ["ls"], "cwd": "/tmp", "terminal": False,
                             "user": {"uid": 5, "gid": 6}, "env": ["A=1"]})
    assert (list(proc.Args), proc.Cwd, proc.User.UID, proc.User.GID) == (["ls"], "/tmp", 5, 6)
    res = resources_from_oci({"memory": {"limit": 1 << 20}, "cpu": {"quota": 1000, "period": 10000}})
    assert res.Memory.Limit == 1 << 20 and res.CPU.Quota == 1000
    assert spec_to_oci(res) == {"memory": {"limit": 1 << 20}, "cpu": {"quota": 1000, "period": 10000}}


def test_agent_accepts_converted_spec() -> None:
    cfg = copy.deepcopy(CONFIG)
    cfg["root"]["path"] = "/run/kata-containers/shared/containers/c1/rootfs"
    out = adapt_for_guest(spec_from_oci(cfg), container_id="c1",
                          shared_dir="/run/kata-containers/shared/containers",
                          cgroup_parent="/kata-colo")
    assert out["process"]["args"] == ["sh", "-c", "echo hi"]
    assert out["linux"]["cgroupsPath"] == "/kata-colo/c1"
    # the host netns path is dropped in the guest; the pid namespace stays
    assert out["linux"]["namespaces"] == [{"type": "pid"}]
    assert out["linux"]["resources"]["devices"][0] == {"allow": False, "access": "rwm"}


def test_zero_values_come_back_omitted() -> None:
    """proto3 has no presence: zero optional values come back absent, which Go's JSON decoding
    in runc reads as the same zero (the required OCI fields are kept by the agent's _ALWAYS)."""
    dev = {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "uid": 0, "gid": 0}
    spec = spec_from_oci({"linux": {"devices": [dev], "resources": {"memory": {"disableOOMKiller": False}}}})
    out = spec_to_oci(spec)
    assert out["linux"]["devices"] == [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}]
    assert "memory" not in out["linux"]["resources"] or out["linux"]["resources"]["memory"] == {}


def test_host_pid_and_mount_namespace_paths_become_new_namespaces() -> None:
    """CRI hands containers /proc/<sandbox pid>/ns/* paths; in the guest those must not turn
    into the agent's own pid/mount namespaces."""
    cfg = copy.deepcopy(CONFIG)
    cfg["root"]["path"] = "/run/kata-containers/shared/containers/c2/rootfs"
    cfg["linux"]["namespaces"] = [
        {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "mount", "path": "/proc/42/ns/mnt"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "network", "path": "/var/run/netns/cni-1"}]
    out = adapt_for_guest(spec_from_oci(cfg), container_id="c2",
                          shared_dir="/run/kata-containers/shared/containers", cgroup_parent="/kc")
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
