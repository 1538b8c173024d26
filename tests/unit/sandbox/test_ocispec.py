import pytest

from common.errors import InvalidArgument
from shim.sandbox import oci_guest as ocispec


def _spec(**over):
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        ],
        "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                           {"type": "ipc", "path": "/proc/1/ns/ipc"}],
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
            "cgroupsPath": "/default/c1",
        },
    }
    spec.update(over)
    return spec


def test_guest_spec_rewrites_root_namespaces_hooks_devices():
    shared = []
    out = ocispec.to_guest(_spec(), "c1", "/run/kata-containers/shared/containers/c1/rootfs",
                           lambda src, name, ro: shared.append((src, name)) or f"/guest/{name}")
    assert out["root"] == {"path": "/run/kata-containers/shared/containers/c1/rootfs", "readonly": False}
    assert "hooks" not in out
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}]
    assert "devices" not in out["linux"]
    assert out["linux"]["cgroupsPath"] == "/kata-colo/c1"
    assert shared == []


def test_host_bind_mounts_are_shared_and_rewritten(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    spec = _spec(mounts=[
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]},
        {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind"]},
    ])
    shared = []
    out = ocispec.to_guest(spec, "c1", "/r", lambda src, name, ro: shared.append((src, name, ro)) or f"/guest/{name}")
    assert len(out["mounts"]) == 1
    m = out["mounts"][0]
    assert m["destination"] == "/etc/hosts" and m["source"].startswith("/guest/c1-") and m["source"].endswith("-hosts")
    assert shared == [(str(hosts), m["source"][len("/guest/"):], True)]  # "ro": read-only on the host side
    assert ocispec.owns_share_name("c1", m["source"][len("/guest/"):])
    assert not ocispec.owns_share_name("c", m["source"][len("/guest/"):])


def test_share_names_follow_the_id_rule():
    from common.ids import valid_id

    name = ocispec.share_name("c1", "/data", "/srv/my volume (1)/")
    assert valid_id(name) and name.endswith("-my_volume__1_")
    assert len(ocispec.share_name("c" * 120, "/d", "/x" * 40)) <= 128


def test_missing_bind_source_is_invalid():
    spec = _spec(mounts=[{"destination": "/data", "type": "bind", "source": "/nonexistent/kc", "options": ["rbind"]}])
    with pytest.raises(InvalidArgument, match="does not exist"):
        ocispec.to_guest(spec, "c1", "/r", lambda s, n, ro: n)


@pytest.mark.parametrize("bad", [
    [], "x", {"process": None}, {"process": {"args": []}}, {"process": {"args": [1]}},
    {"process": {"args": ["sh"]}, "mounts": "no"}, {"process": {"args": ["sh"]}, "mounts": [{"type": "bind"}]},
    {"process": {"args": ["sh"]}, "annotations": []},
])
def test_malformed_specs_are_invalid_argument(bad):
    with pytest.raises(InvalidArgument, match="invalid OCI spec"):
        ocispec.validate(bad)
