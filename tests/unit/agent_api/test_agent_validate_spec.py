"""Agent input validation and kata grpc.Spec → OCI config.json conversion."""
from __future__ import annotations

import pytest

from agent_api.agent import agent_config as config
from agent_api.agent.spec import adapt_for_guest, process_to_json, resources_to_json
from agent_api.agent.validate import check_exec_id, check_id, check_read_len, check_signal, path_within
from agent_api.oci_codec import json_name
from common.errors import ConfigError, InvalidArgument
from proto.kata import oci_pb2

SHARED = "/run/kata-containers/shared/containers"


@pytest.mark.parametrize("good", ["a", "abc-1.2_3", "A" * 128, "0cid"])
def test_valid_ids(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ["", "-a", ".a", "_a", "a/b", "..", "a b", "A" * 129, "a\x00", "ü"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_id(bad)


def test_exec_id_empty_only_when_allowed() -> None:
    assert check_exec_id("") == ""
    with pytest.raises(InvalidArgument):
        check_exec_id("", allow_empty=False)


@pytest.mark.parametrize("path,ok", [
    (f"{SHARED}/c1/rootfs", True), (SHARED, True), (f"{SHARED}/../x", False), ("/etc", False),
    (f"{SHARED}x/y", False), ("relative/p", False), (f"{SHARED}/a/../../../../etc", False), ("", False)])
def test_path_within(path: str, ok: bool) -> None:
    if ok:
        assert path_within(path, SHARED).startswith(SHARED)
    else:
        with pytest.raises(InvalidArgument):
            path_within(path, SHARED)


def test_sizes_and_signals_bounded() -> None:
    assert check_read_len(1) == 1
    for bad in (0, (1 << 20) + 1):
        with pytest.raises(InvalidArgument):
            check_read_len(bad)
    assert check_signal(9) == 9
    for bad in (0, 65):
        with pytest.raises(InvalidArgument):
            check_signal(bad)


def full_spec() -> oci_pb2.Spec:
    return oci_pb2.Spec(
        Version="1.0.2", Hostname="h",
        Process=oci_pb2.Process(
            Terminal=True, ConsoleSize=oci_pb2.Box(Height=24, Width=80), Args=["sh", "-c", "x"],
            Env=["A=1"], Cwd="/w", User=oci_pb2.User(UID=0, GID=0, AdditionalGids=[5]),
            Capabilities=oci_pb2.LinuxCapabilities(Bounding=["CAP_KILL"]),
            Rlimits=[oci_pb2.POSIXRlimit(Type="RLIMIT_NOFILE", Hard=10, Soft=0)],
            NoNewPrivileges=True, ApparmorProfile="docker-default", OOMScoreAdj=-5),
        Root=oci_pb2.Root(Path=f"{SHARED}/c1/rootfs", Readonly=True),
        Mounts=[oci_pb2.Mount(destination="/proc", type="proc", source="proc"),
                oci_pb2.Mount(destination="/data", type="bind", source=f"{SHARED}/c1-vol",
                              options=["rbind", "ro"])],
        Hooks=oci_pb2.Hooks(Prestart=[oci_pb2.Hook(Path="/usr/bin/host-hook")]),
        Annotations={"k": "v"},
        Linux=oci_pb2.Linux(
            UIDMappings=[oci_pb2.LinuxIDMapping(HostID=1000, ContainerID=0, Size=1)],
            Sysctl={"net.ipv4.ip_forward": "1"},
            Resources=oci_pb2.LinuxResources(
                Devices=[oci_pb2.LinuxDeviceCgroup(Allow=False, Access="rwm", Major=-1, Minor=-1),
                         oci_pb2.LinuxDeviceCgroup(Allow=True, Type="c", Major=1, Minor=3, Access="rw")],
                Memory=oci_pb2.LinuxMemory(Limit=1 << 30, DisableOOMKiller=True),
                CPU=oci_pb2.LinuxCPU(Shares=512, Quota=50000, Period=100000, Cpus="0-1"),
                Pids=oci_pb2.LinuxPids(Limit=100),
                HugepageLimits=[oci_pb2.LinuxHugepageLimit(Pagesize="2MB", Limit=0)]),
            CgroupsPath="kubepods-besteffort.slice:cri-containerd:c1",
            Namespaces=[oci_pb2.LinuxNamespace(Type="pid"),
                        oci_pb2.LinuxNamespace(Type="network", Path="/var/run/netns/cni-1"),
                        oci_pb2.LinuxNamespace(Type="ipc", Path="/proc/1/ns/ipc"),
                        oci_pb2.LinuxNamespace(Type="network"),
                        oci_pb2.LinuxNamespace(Type="mount")],
            Devices=[oci_pb2.LinuxDevice(Path="/dev/null", Type="c", Major=1, Minor=3, FileMode=0o666)],
            Seccomp=oci_pb2.LinuxSeccomp(DefaultAction="SCMP_ACT_ERRNO", Syscalls=[
                oci_pb2.LinuxSyscall(Names=["read"], Action="SCMP_ACT_ALLOW", errnoret=1,
                                     Args=[oci_pb2.LinuxSeccompArg(Index=0, Value=0, Op="SCMP_CMP_EQ")])]),
            MaskedPaths=["/proc/kcore"], ReadonlyPaths=["/proc/sys"], MountLabel="lbl"))


def test_spec_to_config_json() -> None:
    cfg = adapt_for_guest(full_spec(), container_id="c1", shared_dir=SHARED, cgroup_parent="/kata-colo")
    assert cfg["ociVersion"] == "1.0.2"
    assert cfg["hostname"] == "h"
    assert "hooks" not in cfg and "solaris" not in cfg and "windows" not in cfg
    p = cfg["process"]
    assert p["terminal"] is True and p["consoleSize"] == {"height": 24, "width": 80}
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [5]}
    assert p["args"] == ["sh", "-c", "x"] and p["cwd"] == "/w" and p["oomScoreAdj"] == -5
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 0}]
    assert p["noNewPrivileges"] is True and "apparmorProfile" not in p
    assert cfg["root"] == {"path": f"{SHARED}/c1/rootfs", "readonly": True}
    assert cfg["mounts"][1] == {"destination": "/data", "type": "bind", "source": f"{SHARED}/c1-vol",
                                "options": ["rbind", "ro"]}
    assert cfg["annotations"] == {"k": "v"}
    lx = cfg["linux"]
    assert lx["uidMappings"] == [{"hostID": 1000, "containerID": 0, "size": 1}]
    assert lx["sysctl"] == {"net.ipv4.ip_forward": "1"}
    r = lx["resources"]
    assert r["devices"] == [{"allow": False, "access": "rwm"},
                            {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}]
    assert r["memory"] == {"limit": 1 << 30, "disableOOMKiller": True}
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1"}
    assert r["pids"] == {"limit": 100}
    assert r["hugepageLimits"] == [{"pageSize": "2MB"}]
    assert lx["cgroupsPath"] == "/kata-colo/c1"
    assert lx["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert lx["devices"] == [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666}]
    sc = lx["seccomp"]
    assert sc["defaultAction"] == "SCMP_ACT_ERRNO"
    assert sc["syscalls"] == [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1,
                               "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}]
    assert lx["maskedPaths"] == ["/proc/kcore"] and lx["readonlyPaths"] == ["/proc/sys"]
    assert "mountLabel" not in lx


def test_relative_or_empty_root_becomes_shared_rootfs() -> None:
    spec = full_spec()
    for path in ("rootfs", ""):
        spec.Root.Path = path
        cfg = adapt_for_guest(spec, container_id="c9", shared_dir=SHARED, cgroup_parent="/p")
        assert cfg["root"]["path"] == f"{SHARED}/c9/rootfs"


@pytest.mark.parametrize("mutate", [
    lambda s: setattr(s.Root, "Path", "/etc"),
    lambda s: setattr(s.Root, "Path", f"{SHARED}/../../etc"),
    lambda s: setattr(s.Mounts[1], "source", "/etc"),
    lambda s: setattr(s.Mounts[0], "destination", "proc"),
    lambda s: s.Process.ClearField("Args"),
    lambda s: setattr(s.Process, "Cwd", "relative"),
    lambda s: s.Linux.Namespaces.add(Type="bogus", Path="/x"),
    lambda s: s.ClearField("Process"),
])
def test_spec_rejections(mutate) -> None:  # type: ignore[no-untyped-def]
    spec = full_spec()
    mutate(spec)
    with pytest.raises(InvalidArgument):
        adapt_for_guest(spec, container_id="c1", shared_dir=SHARED, cgroup_parent="/p")


def test_process_defaults_and_resources() -> None:
    p = process_to_json(oci_pb2.Process(Args=["true"]))
    assert p == {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    res = resources_to_json(oci_pb2.LinuxResources(Memory=oci_pb2.LinuxMemory(Limit=5)))
    assert res == {"memory": {"limit": 5}}
    assert json_name("Version") == "ociVersion" and json_name("BlockIO") == "blockIO"


def test_cmdline_and_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    opts = config.parse_cmdline("quiet agent.log=debug agent.runc_no_pivot=1 agent.server_port=2048 x=y")
    assert opts == {"log": "debug", "runc_no_pivot": "1", "server_port": "2048"}
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 agent.log=debug agent.runc_no_pivot=1\n")
    cfg = config.load(["--cmdline", str(cmdline), "--state-dir", "/s", "--runc", "/r",
                       "--listen", "unix:/a.sock", "--no-serial"])
    assert (cfg.log_level, cfg.no_pivot, cfg.state_dir, cfg.runc) == ("debug", True, "/s", "/r")
    assert cfg.listen == ("unix:/a.sock",) and cfg.use_serial is False and cfg.use_vsock is True
    cfg = config.load(["--cmdline", "/nonexistent", "--no-pivot"])
    assert cfg.no_pivot is True and cfg.log_level == "info"
    with pytest.raises(ConfigError):
        config.load(["--cmdline", "/nonexistent", "--listen", "tcp:1.2.3.4:5"])
    with pytest.raises(ConfigError):
        config.load(["--cmdline", "/nonexistent", "--cgroup-parent", "rel"])


def test_storage_args_for_9p_share() -> None:
    from agent_api.agent.guest_sandbox import storage_args
    from proto.kata import agent_pb2
    st = agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p", options=["nodev", "cache=mmap"],
                           mount_point=SHARED)
    assert storage_args(st) == ("kataShared", SHARED, "9p", 4, "trans=virtio,version=9p2000.L,cache=mmap")
    # kata's runtime packs the 9p options into one entry
    kata = agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p", mount_point=SHARED,
                             options=["trans=virtio,version=9p2000.L,cache=mmap", "nodev", "msize=8192"])
    assert storage_args(kata) == ("kataShared", SHARED, "9p", 4,
                                  "trans=virtio,version=9p2000.L,cache=mmap,msize=8192")
    for bad in ("a,,b", "x\x00y", ""):
        with pytest.raises(InvalidArgument):
            storage_args(agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p",
                                           mount_point=SHARED, options=[bad]))
    with pytest.raises(InvalidArgument):
        storage_args(agent_pb2.Storage(driver="9p", source="kataShared", fstype="ext4", mount_point=SHARED))
