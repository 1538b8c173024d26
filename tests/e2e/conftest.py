"""Fixtures: a private containerd 1.6 per test module (tests.support.containerd), with the shim
CLI and the host test backend (``fake_containerd``), with the real kata-colo runtime
(``kata_containerd``), or serving CRI pods with handler ``kata-colo`` (``cri_containerd``)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.support import image
from tests.support.containerd import (
    CNI_BIN_DIR,
    CRI_NAMESPACE,
    FAKE_BIN,
    NoShim,
    product_shim_dir,
    start_containerd,
    stop_containerd,
)


def _shim_dir() -> str:
    try:
        return product_shim_dir()
    except NoShim as exc:
        pytest.skip(str(exc))


def _require_containerd() -> None:
    if shutil.which("containerd") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's containerd")


@pytest.fixture(scope="module")
def fake_containerd():
    """containerd whose kata-colo runtime is the real shim CLI with the TEST host backend."""
    _require_containerd()
    c = start_containerd([str(FAKE_BIN)])
    c.import_busybox()
    yield c
    stop_containerd(c)


@pytest.fixture(scope="module")
def kata_containerd():
    """containerd with the real kata-colo runtime (VMs under QEMU) and the busybox image."""
    _require_containerd()
    if not image.built():
        pytest.skip(image.SKIP_REASON)
    shim_dir = _shim_dir()
    c = start_containerd([shim_dir])
    c.import_busybox()
    yield c
    stop_containerd(c)
    shutil.rmtree(shim_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cri_containerd():
    """containerd whose CRI plugin runs pods with handler ``kata-colo`` (the real shim, VMs under
    QEMU) on a private CNI bridge; busybox imported into the ``k8s.io`` namespace."""
    _require_containerd()
    if not image.built():
        pytest.skip(image.SKIP_REASON)
    if not all((CNI_BIN_DIR / p).exists() for p in ("bridge", "host-local", "loopback")):
        pytest.skip("CNI plugins missing (apt install containernetworking-plugins)")
    shim_dir = _shim_dir()
    c = start_containerd([shim_dir])
    c.namespace = CRI_NAMESPACE
    try:
        c.import_busybox()
    except BaseException:
        stop_containerd(c)
        raise
    yield c
    stop_containerd(c)
    shutil.rmtree(shim_dir, ignore_errors=True)
