"""Facts about this host that decide how a VM can be run, for every driver.

Read once per call from the kernel's own files (nothing cached: tests point ``root`` at a fake
tree). The accelerator rule comes from FINDINGS.md: ``auto`` means KVM only when the CPU flags
show vmx or svm (a PVM host opens /dev/kvm but cannot run a stock guest kernel).
"""
from __future__ import annotations

import fcntl
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import InvalidArgument, ResourceExhausted, Unavailable

ACCELS = ("auto", "kvm", "tcg")
#: _IOW(VHOST_VIRTIO 0xAF, 0x60, __u64): reserve a guest CID on an open /dev/vhost-vsock.
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
#: Guest CIDs 0-2 are reserved (hypervisor, local, host); 0xFFFFFFFF is VMADDR_CID_ANY.
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFE
CID_ATTEMPTS = 64


@dataclass(frozen=True)
class HostPaths:
    """Where the facts are read from (``root`` prefixes every path; "" = this host)."""

    root: str = ""

    def __call__(self, path: str) -> str:
        return f"{self.root}{path}"


HOST = HostPaths()


def cpu_flags(paths: HostPaths = HOST) -> set[str]:
    try:
        with open(paths("/proc/cpuinfo"), encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, flags = line.partition(":")
                if key.strip() == "flags":
                    return set(flags.split())
    except OSError:
        pass
    return set()


def resolve_accel(accel: str, paths: HostPaths = HOST) -> str:
    """``auto`` → ``kvm`` only when the host CPU shows vmx or svm, else ``tcg``."""
    if accel not in ACCELS:
        raise InvalidArgument(f"accel must be one of {ACCELS}, not {accel!r}")
    if accel != "auto":
        return accel
    return "kvm" if {"vmx", "svm"} & cpu_flags(paths) else "tcg"


def has_device(path: str, paths: HostPaths = HOST) -> bool:
    return os.path.exists(paths(path))


def has_vhost_net(paths: HostPaths = HOST) -> bool:
    return has_device("/dev/vhost-net", paths)


def has_vhost_vsock(paths: HostPaths = HOST) -> bool:
    return has_device("/dev/vhost-vsock", paths)


def has_vfio(paths: HostPaths = HOST) -> bool:
    return has_device("/dev/vfio/vfio", paths)


def require_vhost_vsock(paths: HostPaths = HOST) -> None:
    """ConfigError-grade check for ``transport = "vsock"``."""
    if not has_vhost_vsock(paths):
        raise Unavailable("agent transport vsock needs /dev/vhost-vsock (modprobe vhost_vsock); "
                          "this host has none: use transport = \"virtio-serial\"")


@dataclass
class VsockCid:
    """A guest CID reserved on an open /dev/vhost-vsock fd (kata's FindContextID). Hand ``fd`` to
    the VMM (QEMU ``vhost-vsock-pci,vhostfd=``), then :meth:`close` the shim's copy."""

    cid: int
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def reserve_vsock_cid(paths: HostPaths = HOST, ioctl: Callable[[int, int, bytes], object] = fcntl.ioctl,
                      rng: random.Random | None = None) -> VsockCid:
    """Open /dev/vhost-vsock and reserve a free random guest CID on it (EADDRINUSE → next)."""
    rng = rng or random.SystemRandom()
    try:
        fd = os.open(paths("/dev/vhost-vsock"), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise Unavailable(f"cannot open /dev/vhost-vsock: {exc.strerror}") from None
    try:
        for _ in range(CID_ATTEMPTS):
            cid = rng.randint(MIN_GUEST_CID, MAX_GUEST_CID)
            try:
                ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
            except OSError as exc:
                if exc.errno == 98:  # EADDRINUSE: another VM has it
                    continue
                raise Unavailable(f"vhost-vsock: cannot set guest CID: {exc.strerror}") from None
            return VsockCid(cid, fd)
        raise ResourceExhausted(f"no free vsock guest CID after {CID_ATTEMPTS} attempts")
    except BaseException:
        os.close(fd)
        raise
