"""kata-style configuration → the hypervisor's :class:`~hypervisor.base.VmConfig` (before the
resources add their devices)."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.guest_paths import AGENT_VSOCK_PORT
from hypervisor.base import VmConfig
from shim import config as cfgmod


def kernel_params(cfg: cfgmod.Config) -> str:
    return " ".join(p for p in (cfg.hypervisor.kernel_params,
                                "agent.log=debug" if cfg.agent.enable_debug else "",
                                "agent.runc_no_pivot=1" if cfg.agent.runc_no_pivot else "",
                                f"agent.runc={cfg.agent.oci_runtime}" if cfg.agent.oci_runtime != "runc" else "",
                                "agent.debug_console" if cfg.agent.debug_console_enabled else "") if p)


def vm_config(cfg: cfgmod.Config, vm_id: str, vm_dir: Path, **overrides: Any) -> VmConfig:
    hv = cfg.hypervisor
    base = VmConfig(
        vm_id=vm_id, state_dir=str(vm_dir), kernel=hv.kernel, hypervisor_path=hv.binary,
        initrd=hv.initrd, image=hv.image, kernel_params=kernel_params(cfg), vcpus=hv.default_vcpus,
        max_vcpus=hv.default_maxvcpus or max(hv.default_vcpus, os.cpu_count() or 1),
        memory_mib=hv.default_memory, max_memory_mib=hv.default_maxmemory,
        agent_channel=cfg.agent.transport,  # type: ignore[arg-type]  # validated by Config
        vsock_port=cfg.agent.vsock_port or AGENT_VSOCK_PORT, debug=hv.enable_debug,
        options=hv.options)
    return replace(base, **overrides) if overrides else base
