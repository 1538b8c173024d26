"""The template's warm-up container: its rootfs, its spec (what the shim would send), and the
static-binary check that decides whether there is one."""
from __future__ import annotations

import shutil

import pytest

from agent_api.client.convert import spec_from_oci
from shim.factory import warmup
from shim.sandbox import oci_guest


def test_busybox_static_is_recognised_and_a_dynamic_binary_is_not():
    if not warmup.is_static_elf(warmup.BUSYBOX):
        pytest.skip("no busybox-static on this host")
    assert not warmup.is_static_elf(shutil.which("ls") or "/bin/ls")
    assert not warmup.is_static_elf("/nonexistent")


def test_rootfs_holds_busybox_and_its_applets(tmp_path):
    if not warmup.is_static_elf(warmup.BUSYBOX):
        pytest.skip("no busybox-static on this host")
    warmup.build_rootfs(tmp_path / "r")
    assert (tmp_path / "r/bin/busybox").stat().st_size > 100_000
    assert all((tmp_path / "r/bin" / a).is_symlink() for a in warmup.APPLETS)
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"bin", "proc", "sys", "dev", "tmp"}


def test_spec_is_a_valid_guest_spec():
    spec = warmup.warmup_spec("/run/kata-containers/shared/containers/x/rootfs")
    oci_guest.validate(spec)
    pb = spec_from_oci(spec)
    assert list(pb.Process.Args) == ["sh", "-c", "echo warm"] and pb.Root.Path.endswith("/rootfs")
    assert [ns.Type for ns in pb.Linux.Namespaces] == ["pid", "ipc", "uts", "mount"]
