"""Host facts (hypervisor.host) on a fake /proc + /dev tree: accelerator choice, vhost devices,
and the vsock CID reservation (kata's FindContextID) with a scripted ioctl."""
import errno
import random
import struct

import pytest

from common.errors import InvalidArgument, ResourceExhausted, Unavailable
from hypervisor import host

CPUINFO_VMX = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n"
CPUINFO_SVM = "processor\t: 0\nflags\t\t: fpu svm lm\n"
CPUINFO_NONE = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\nbugs\t\t: vmx_whatever\n"


def fake_host(tmp_path, cpuinfo: str = CPUINFO_NONE, devices: tuple[str, ...] = ()) -> host.HostPaths:
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    for dev in devices:
        p = tmp_path / dev.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    return host.HostPaths(str(tmp_path))


@pytest.mark.parametrize("cpuinfo, expected", [(CPUINFO_VMX, "kvm"), (CPUINFO_SVM, "kvm"),
                                               (CPUINFO_NONE, "tcg"), ("", "tcg")])
def test_auto_accel_follows_cpu_flags(tmp_path, cpuinfo, expected):
    assert host.resolve_accel("auto", fake_host(tmp_path, cpuinfo)) == expected


def test_explicit_accel_wins_and_bad_accel_is_invalid(tmp_path):
    paths = fake_host(tmp_path, CPUINFO_VMX)
    assert host.resolve_accel("tcg", paths) == "tcg"
    assert host.resolve_accel("kvm", fake_host(tmp_path, CPUINFO_NONE)) == "kvm"
    with pytest.raises(InvalidArgument):
        host.resolve_accel("xen", paths)


def test_device_facts(tmp_path):
    paths = fake_host(tmp_path, devices=("/dev/vhost-net",))
    assert host.has_vhost_net(paths) and not host.has_vhost_vsock(paths) and not host.has_vfio(paths)
    with pytest.raises(Unavailable, match="vhost-vsock"):
        host.require_vhost_vsock(paths)


def test_vsock_cid_skips_cids_in_use(tmp_path):
    paths = fake_host(tmp_path, devices=("/dev/vhost-vsock",))
    tried: list[int] = []

    def ioctl(fd, req, arg):
        assert req == host.VHOST_VSOCK_SET_GUEST_CID
        cid = struct.unpack("=Q", arg)[0]
        tried.append(cid)
        if len(tried) < 3:
            raise OSError(errno.EADDRINUSE, "in use")

    cid = host.reserve_vsock_cid(paths, ioctl=ioctl, rng=random.Random(7))
    try:
        assert cid.cid == tried[-1] and len(tried) == 3
        assert host.MIN_GUEST_CID <= cid.cid <= host.MAX_GUEST_CID and cid.fd >= 0
    finally:
        cid.close()
    assert cid.fd == -1


def test_vsock_cid_gives_up_and_closes(tmp_path):
    paths = fake_host(tmp_path, devices=("/dev/vhost-vsock",))

    def busy(fd, req, arg):
        raise OSError(errno.EADDRINUSE, "in use")

    with pytest.raises(ResourceExhausted):
        host.reserve_vsock_cid(paths, ioctl=busy)
    with pytest.raises(Unavailable):
        host.reserve_vsock_cid(host.HostPaths(str(tmp_path / "none")))
