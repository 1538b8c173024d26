import pytest

from agent_api.client.convert import stats_from_pb
from agent_api.oci_codec import spec_from_oci, to_json
from common.errors import InvalidArgument
from proto.kata import agent_pb2, oci_pb2

SPEC = {
    "ociVersion": "1.0.2-dev",
    "process": {"terminal": True, "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
                "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b"], "cwd": "/",
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": True},
    "root": {"path": "/run/kata-containers/shared/containers/c1/rootfs", "readonly": False},
    "hostname": "pod",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]}],
    "annotations": {"io.kubernetes.cri.sandbox-id": "pod"},
    "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}],
                            "memory": {"limit": 268435456}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}},
              "cgroupsPath": "/kata-colo/c1",
              "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
              "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]},
}


def test_spec_round_trips_through_kata_protobuf():
    pb = spec_from_oci(SPEC)
    assert pb.Process.Args == ["sh", "-c", "echo hi"]
    assert pb.Linux.Resources.Memory.Limit == 268435456
    back = to_json(oci_pb2.Spec.FromString(pb.SerializeToString()))
    assert back["process"]["args"] == SPEC["process"]["args"]
    assert back["process"]["env"] == SPEC["process"]["env"]
    assert back["root"]["path"] == SPEC["root"]["path"]
    assert back["linux"]["namespaces"] == SPEC["linux"]["namespaces"]
    assert back["linux"]["resources"]["cpu"]["quota"] == 50000
    assert back["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert back["annotations"] == SPEC["annotations"]
    assert back["process"]["rlimits"] == SPEC["process"]["rlimits"]


@pytest.mark.parametrize("bad, field", [({"process": "x"}, "process"), ({"process": {"args": "sh"}}, "process.args"),
                                        ({"hostname": 5}, "hostname"),
                                        ({"linux": {"resources": {"memory": {"limit": "lots"}}}}, "limit")])
def test_wrong_types_are_invalid_argument(bad, field):
    with pytest.raises(InvalidArgument, match=field):
        spec_from_oci(bad)


def test_stats_mapping():
    resp = agent_pb2.StatsContainerResponse()
    resp.cgroup_stats.cpu_stats.cpu_usage.total_usage = 123
    resp.cgroup_stats.memory_stats.usage.usage = 4096
    resp.cgroup_stats.memory_stats.stats["anon"] = 1024
    resp.cgroup_stats.memory_stats.stats["inactive_file"] = 7
    resp.cgroup_stats.pids_stats.current = 3
    s = stats_from_pb(resp)
    got = (s.cpu_usage_ns, s.memory_usage, s.memory_rss, s.memory_inactive_file, s.pids_current)
    assert got == (123, 4096, 1024, 7, 3)
