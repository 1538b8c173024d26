"""Cloud Hypervisor-only ``[hypervisor.clh]`` keys (kata's names where kata has one), carried in
``VmConfig.options``.

The keys every driver shares (``path``, ``kernel``, ``initrd``/``image``, ``default_vcpus``,
``default_memory``, ...) live in :class:`shim.config.HypervisorConfig`; only what this driver
alone understands is here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar

from common.errors import ConfigError

#: ``hotplug_method`` values → Cloud Hypervisor's ``MemoryConfig.hotplug_method``.
HOTPLUG_METHODS = {"acpi": "Acpi", "virtio-mem": "VirtioMem"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ClhOptions:
    """``hotplug_method`` how memory beyond ``default_memory`` (up to ``default_maxmemory``) is
    plugged: ``acpi`` (kata's choice: grows in 128 MiB steps, never shrinks while the guest runs)
    or ``virtio-mem`` (grows and shrinks live); ``enable_balloon`` a virtio-balloon device
    (size 0, deflate-on-oom) the memory controller inflates; ``reclaim_guest_freed_memory``
    (kata's key) free page reporting on that balloon; ``entropy_source`` the host file behind the
    guest's virtio-rng; ``disable_seccomp`` (kata's key) runs the VMM with ``--seccomp false``
    (debugging only)."""

    DEFAULT_PATH: ClassVar[str] = "/usr/bin/cloud-hypervisor"

    hotplug_method: str = "acpi"
    enable_balloon: bool = True
    reclaim_guest_freed_memory: bool = False
    entropy_source: str = "/dev/urandom"
    disable_seccomp: bool = False

    def validate(self, where: str = "hypervisor.clh") -> ClhOptions:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"invalid configuration: {where}.{message}")

        check(self.hotplug_method in HOTPLUG_METHODS,
              f"hotplug_method must be one of {tuple(HOTPLUG_METHODS)}, not {self.hotplug_method!r}")
        check(os.path.isabs(self.entropy_source) and not _CONTROL.search(self.entropy_source),
              f"entropy_source must be an absolute path, not {self.entropy_source!r}")
        check(not self.reclaim_guest_freed_memory or self.enable_balloon,
              "reclaim_guest_freed_memory needs enable_balloon (free page reporting rides on the balloon)")
        return self

    @property
    def ch_hotplug_method(self) -> str:
        return HOTPLUG_METHODS[self.hotplug_method]
