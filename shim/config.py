"""kata-colo configuration: a kata-style TOML file → frozen dataclasses, validated.

Path resolution (first hit wins): the runtime option ``ConfigPath`` (runtimeoptions.v1.Options
from containerd's CRI runtime options), ``$KATA_COLO_CONFIG``, ``/etc/kata-colo/configuration.toml``,
then the defaults shipped in the package (``shim/defaults/configuration.toml``).

``[runtime] hypervisor`` names the driver (:mod:`hypervisor.registry`); its ``[hypervisor.<name>]``
table holds the keys every driver shares (:class:`HypervisorConfig`) plus the driver's own, which
its ``Options`` dataclass parses and validates (``HypervisorConfig.options``). Tables of other
drivers may be present and are validated too.

Sandbox annotations may override a few hypervisor values (kata's
``io.katacontainers.config.hypervisor.<key>``) only when ``<key>`` is listed in
``[hypervisor.<name>] enable_annotations``; anything else is a ConfigError (a clear error through
ctr, raised before any resource is created).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, Unavailable
from hypervisor import host, registry

DEFAULT_PATH = "/etc/kata-colo/configuration.toml"
ENV_PATH = "KATA_COLO_CONFIG"
PACKAGED_DEFAULT = Path(__file__).resolve().parent / "defaults" / "configuration.toml"

ANNOTATION_HV_PREFIX = "io.katacontainers.config.hypervisor."
ANNOTATION_VCPU_PRIORITIES = "io.katacontainers.colo.vcpu-priorities"
ANNOTATION_CONTAINER_PRIORITY = "io.katacontainers.colo.container-priority"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"

_SHARED_FS = ("virtio-9p", "none")
_AGENT_TRANSPORTS = ("virtio-serial", "vsock", "hybrid-vsock")
OCI_RUNTIMES = ("runc", "crun")
MAX_VM_CACHE = 64
DEFAULT_HYPERVISOR = "qemu"
_VFIO_PORTS = ("no-port", "root-port")
_SAFE_PARAM = re.compile(r"^[A-Za-z0-9_.,:=/+\- ]*$")


@dataclass(frozen=True)
class HypervisorConfig:
    """Keys of ``[hypervisor.<name>]`` every driver shares. ``path`` "" = the driver's default
    binary; ``options`` is the driver's ``Options`` (its own keys)."""

    path: str = ""
    kernel: str = "/var/lib/kata-colo/images/current/vmlinux"
    initrd: str = "/var/lib/kata-colo/images/current/initramfs.cpio"
    image: str = ""
    kernel_params: str = ""
    default_vcpus: int = 1
    default_maxvcpus: int = 0
    default_memory: int = 512
    default_maxmemory: int = 0
    shared_fs: str = "virtio-9p"
    enable_debug: bool = False
    boot_timeout: float = 60.0
    enable_annotations: tuple[str, ...] = ("default_vcpus", "default_memory", "disable_block_device_use")
    disable_block_device_use: bool = False
    hot_plug_vfio: str = "root-port"
    cold_plug_vfio: str = "root-port"
    options: Any = None

    @property
    def binary(self) -> str:
        return self.path or str(getattr(type(self.options), "DEFAULT_PATH", ""))


@dataclass(frozen=True)
class AgentConfig:
    """``oci_runtime``: the OCI runtime the guest agent runs containers with (``runc`` or
    ``crun``; both ship in the guest image)."""

    transport: str = "virtio-serial"
    vsock_port: int = 1024
    dial_timeout: float = 60.0
    enable_debug: bool = False
    runc_no_pivot: bool = True
    oci_runtime: str = "runc"
    debug_console_enabled: bool = False


@dataclass(frozen=True)
class FactoryConfig:
    """``[factory]`` (kata's keys; paths under /run/kata-colo): ``enable_template`` starts VMs
    as clones of a saved template VM kept at ``template_path``; ``vm_cache_number`` > 0 asks
    the VM cache daemon at ``vm_cache_endpoint`` for a pre-booted clone first."""

    enable_template: bool = False
    template_path: str = "/run/kata-colo/vm/template"
    vm_cache_number: int = 0
    vm_cache_endpoint: str = "/run/kata-colo/cache.sock"


@dataclass(frozen=True)
class RuntimeConfig:
    """``enable_debug`` turns on the shim's debug log; ``hypervisor`` names the driver;
    ``static_sandbox_resource_mgmt`` (kata's key): containerd Update never resizes the VM;
    ``admin_gid`` is the group (besides root) allowed on the management socket (0 = root only)."""

    enable_debug: bool = False
    internetworking_model: str = "tcfilter"
    hypervisor: str = DEFAULT_HYPERVISOR
    static_sandbox_resource_mgmt: bool = False
    admin_gid: int = 0


ONLINE_CGROUPS = ("kubepods/burstable", "kubepods/pod*", "kubepods.slice/kubepods-burstable.slice",
                  "kubepods.slice/kubepods-pod*.slice")
OFFLINE_CGROUPS = ("kubepods/besteffort", "kubepods.slice/kubepods-besteffort.slice")


@dataclass(frozen=True)
class MemoryConfig:
    """``[colo.memory]``: memory elasticity (:mod:`shim.resources.memory`). No shrink goes below
    the guest's used memory + ``reserve_mib``, nor below ``min_mib``; the guest gets
    ``resize_timeout`` seconds to take or give back memory before the resize is reported as
    timed out (the VM keeps what it reached)."""

    reserve_mib: int = 64
    min_mib: int = 256
    resize_timeout: float = 30.0

    def validate(self) -> MemoryConfig:
        _check(0 <= self.reserve_mib <= 1 << 20, "colo.memory.reserve_mib must be 0..1048576")
        _check(64 <= self.min_mib <= 1 << 22, "colo.memory.min_mib must be 64..4194304")
        _check(0 < self.resize_timeout <= 3600, "colo.memory.resize_timeout must be in (0, 3600] seconds")
        return self


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: the block rootfs layer cache (``layer_image_format`` erofs|ext4, bounded
    by ``layer_cache_max_mib``), per-container scratch disks (sparse, ``scratch_disk_mib``),
    data disks (``data_disk_driver`` nvme|virtio-blk), host-wide device claims and whether
    VFIO functions not yet on vfio-pci are rebound (``vfio_bind``; restored at teardown)."""

    layer_cache_dir: str = "/var/lib/kata-colo/layers"
    layer_cache_max_mib: int = 4096
    layer_image_format: str = "erofs"
    scratch_dir: str = "/var/lib/kata-colo/scratch"
    scratch_disk_mib: int = 4096
    data_disk_driver: str = "nvme"
    claims_dir: str = "/run/kata-colo/claims"
    direct_volumes_dir: str = "/run/kata-containers/shared/direct-volumes"
    cdi_spec_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
    vfio_bind: bool = False


@dataclass(frozen=True)
class ColoConfig:
    """``[colo]``: where sandboxes live in the host cgroup tree and how the tiers are named.

    ``sandbox_cgroup_only`` (kata's name): shim + VMM join the sandbox's OCI cgroupsPath (or
    ``<cgroup_root>/<id>`` without one), limited to the pod's memory + ``memory_overhead_mib``.
    ``online_cgroups`` / ``offline_cgroups``: the tiers (paths below each hierarchy root, ``*``
    globs per component) whose usage the node agent measures; ``cgroup_root`` is always offline.
    ``root`` / ``vmm`` / ``priorities``: knob tables (shim.resources.qos.model)."""

    cgroup_root: str = "kata-colo"
    sandbox_cgroup_only: bool = True
    memory_overhead_mib: int = 256
    online_cgroups: tuple[str, ...] = ONLINE_CGROUPS
    offline_cgroups: tuple[str, ...] = OFFLINE_CGROUPS
    root: Mapping[str, Any] = field(default_factory=dict)
    vmm: Mapping[str, Any] = field(default_factory=dict)
    priorities: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.memory, Mapping):  # the raw [colo.memory] table from parse()
            object.__setattr__(self, "memory", _section(MemoryConfig, self.memory, "colo.memory"))


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig = field(default_factory=lambda: _default_hypervisor(DEFAULT_HYPERVISOR))
    agent: AgentConfig = AgentConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    colo: ColoConfig = ColoConfig()
    factory: FactoryConfig = FactoryConfig()
    storage: StorageConfig = StorageConfig()
    source: str = "<defaults>"

    def validate(self, host_paths: host.HostPaths = host.HOST) -> Config:
        hv, name = self.hypervisor, self.runtime.hypervisor
        where = f"hypervisor.{name}"
        _check(name in registry.names(), f"runtime.hypervisor must be one of {registry.names()}, not {name!r}")
        _check(hv.shared_fs in _SHARED_FS, f"{where}.shared_fs must be one of {_SHARED_FS}")
        _check(1 <= hv.default_vcpus <= 256, f"{where}.default_vcpus must be 1..256")
        _check(hv.default_maxvcpus == 0 or hv.default_maxvcpus >= hv.default_vcpus,
               f"{where}.default_maxvcpus must be 0 (= host CPUs) or >= default_vcpus")
        _check(hv.default_memory >= 128, f"{where}.default_memory must be >= 128 MiB")
        _check(hv.default_maxmemory == 0 or hv.default_maxmemory >= hv.default_memory,
               f"{where}.default_maxmemory must be 0 or >= default_memory")
        _check(hv.boot_timeout > 0, f"{where}.boot_timeout must be > 0")
        _check(bool(_SAFE_PARAM.match(hv.kernel_params)),
               f"{where}.kernel_params has unsupported characters: {hv.kernel_params!r}")
        _check(isinstance(hv.options, registry.options_class(name)),
               f"{where}: options of another driver ({type(hv.options).__name__})")
        hv.options.validate(where)
        _check(self.agent.transport in _AGENT_TRANSPORTS,
               f"agent.kata.transport must be one of {_AGENT_TRANSPORTS}")
        if self.agent.transport == "vsock":
            try:
                host.require_vhost_vsock(host_paths)
            except Unavailable as exc:
                raise ConfigError(f"invalid configuration: agent.kata.transport: {exc}") from None
        if self.agent.transport == "hybrid-vsock":
            _check(name == "clh", f"agent.kata.transport hybrid-vsock is Cloud Hypervisor's; {name} cannot serve it")
        _check(self.agent.dial_timeout > 0, "agent.kata.dial_timeout must be > 0")
        _check(self.agent.oci_runtime in OCI_RUNTIMES, f"agent.kata.oci_runtime must be one of {OCI_RUNTIMES}")
        fac = self.factory
        for key_name in ("template_path", "vm_cache_endpoint"):
            value = getattr(fac, key_name)
            _check(os.path.isabs(value) and os.path.normpath(value) not in ("/", "/run", "/tmp"),
                   f"factory.{key_name} must be an absolute path below a directory, not {value!r}")
        _check(0 <= fac.vm_cache_number <= MAX_VM_CACHE, f"factory.vm_cache_number must be 0..{MAX_VM_CACHE}")
        _check(not fac.vm_cache_number or fac.enable_template,
               "factory.vm_cache_number > 0 needs factory.enable_template = true (cached VMs are template clones)")
        _check(0 <= self.runtime.admin_gid < 2**32 - 1, "runtime.admin_gid must be a gid >= 0 (0 = root only)")
        for key in ("hot_plug_vfio", "cold_plug_vfio"):
            _check(getattr(hv, key) in _VFIO_PORTS, f"{where}.{key} must be one of {_VFIO_PORTS}")
        st = self.storage
        _check(st.layer_image_format in ("erofs", "ext4"), "storage.layer_image_format must be erofs or ext4")
        _check(st.layer_cache_max_mib >= 16, "storage.layer_cache_max_mib must be >= 16")
        _check(st.scratch_disk_mib >= 64, "storage.scratch_disk_mib must be >= 64")
        _check(st.data_disk_driver in ("nvme", "virtio-blk"), "storage.data_disk_driver must be nvme or virtio-blk")
        for key in ("layer_cache_dir", "scratch_dir", "claims_dir", "direct_volumes_dir"):
            _check(os.path.isabs(getattr(st, key)), f"storage.{key} must be an absolute path")
        _check(self.runtime.internetworking_model in ("tcfilter", "none"),
               "runtime.internetworking_model must be 'tcfilter' or 'none'")
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.colo.cgroup_root)),
               f"colo.cgroup_root must be a plain cgroup name, not {self.colo.cgroup_root!r}")
        _check(0 <= self.colo.memory_overhead_mib <= 1 << 20, "colo.memory_overhead_mib must be 0..1048576")
        for tier in (*self.colo.online_cgroups, *self.colo.offline_cgroups):
            _check(bool(re.fullmatch(r"[A-Za-z0-9_.@*?+-]+(/[A-Za-z0-9_.@*?+-]+)*", tier.strip("/")))
                   and ".." not in tier.split("/"), f"colo: bad tier cgroup path {tier!r}")
        for name in self.colo.priorities:
            _check(bool(re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name)),
                   f"colo.priorities: bad priority name {name!r}")
        self.colo.memory.validate()
        return self


def _default_hypervisor(name: str) -> HypervisorConfig:
    return HypervisorConfig(options=registry.options_class(name)())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid configuration: {message}")


def _section(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"invalid configuration: [{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"invalid configuration: unknown key {where}.{key}")
        default = getattr(cls(), key)
        kwargs[key] = _coerce(value, default, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, Mapping)
    if not ok:
        raise ConfigError(f"invalid configuration: {where} has the wrong type ({type(value).__name__})")
    return value


def _hypervisor_section(name: str, raw: Mapping[str, Any], where: str) -> HypervisorConfig:
    """One ``[hypervisor.<name>]`` table: shared keys → HypervisorConfig, the rest → the
    driver's Options (an unknown key of either is a ConfigError naming it)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"invalid configuration: [{where}] must be a table")
    options_cls = registry.options_class(name)
    shared = {f.name for f in dataclasses.fields(HypervisorConfig)} - {"options"}
    own = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(raw) - shared - own)
    if unknown:
        raise ConfigError(f"invalid configuration: unknown key {where}.{unknown[0]}")
    common_part = _section(HypervisorConfig, {k: v for k, v in raw.items() if k in shared}, where)
    options = _section(options_cls, {k: v for k, v in raw.items() if k in own}, where)
    return dataclasses.replace(common_part, options=options)


def parse(text: str, source: str = "<string>", host_paths: host.HostPaths = host.HOST) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid configuration {source}: {exc}") from None
    known = {"hypervisor", "agent", "runtime", "colo", "storage", "factory"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"invalid configuration {source}: unknown section(s) {sorted(unknown)}")
    runtime = _section(RuntimeConfig, raw.get("runtime", {}), "runtime")
    if runtime.hypervisor not in registry.names():
        raise ConfigError(f"invalid configuration {source}: runtime.hypervisor must be one of "
                          f"{registry.names()}, not {runtime.hypervisor!r}")
    hv_raw = raw.get("hypervisor", {})
    if not isinstance(hv_raw, Mapping):
        raise ConfigError(f"invalid configuration {source}: [hypervisor] must hold [hypervisor.<name>] tables")
    bad = sorted(set(hv_raw) - set(registry.names()))
    if bad:
        raise ConfigError(f"invalid configuration {source}: unknown hypervisor section [hypervisor.{bad[0]}] "
                          f"(known: {', '.join(registry.names())})")
    sections = {name: _hypervisor_section(name, table, f"hypervisor.{name}") for name, table in hv_raw.items()}
    for name, section in sections.items():
        section.options.validate(f"hypervisor.{name}")
    colo_raw = dict(raw.get("colo", {}))
    priorities = colo_raw.pop("priorities", {})
    root = colo_raw.pop("root", {})
    vmm = colo_raw.pop("vmm", {})
    colo = _section(ColoConfig, {k: v for k, v in colo_raw.items()}, "colo")
    if not isinstance(priorities, Mapping) or not all(isinstance(v, Mapping) for v in priorities.values()):
        raise ConfigError(f"invalid configuration {source}: [colo.priorities.<name>] must be tables")
    if not isinstance(root, Mapping) or not isinstance(vmm, Mapping):
        raise ConfigError(f"invalid configuration {source}: [colo.root] and [colo.vmm] must be tables")
    colo = dataclasses.replace(colo, priorities=dict(priorities), root=dict(root), vmm=dict(vmm))
    cfg = Config(
        hypervisor=sections.get(runtime.hypervisor) or _default_hypervisor(runtime.hypervisor),
        agent=_section(AgentConfig, raw.get("agent", {}).get("kata", {}), "agent.kata"),
        runtime=runtime,
        colo=colo,
        factory=_section(FactoryConfig, raw.get("factory", {}), "factory"),
        storage=_section(StorageConfig, raw.get("storage", {}), "storage"),
        source=source,
    )
    return cfg.validate(host_paths)


def resolve_path(config_path: str | None = None) -> Path | None:
    for candidate in (config_path, os.environ.get(ENV_PATH), DEFAULT_PATH):
        if candidate:
            p = Path(candidate)
            if p.is_file():
                return p
            if candidate is not DEFAULT_PATH:
                raise ConfigError(f"configuration file {candidate} does not exist")
    return PACKAGED_DEFAULT if PACKAGED_DEFAULT.is_file() else None


def load(config_path: str | None = None) -> Config:
    path = resolve_path(config_path)
    if path is None:
        return Config().validate()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    return parse(text, str(path))


#: kata's boolean hypervisor annotations kata-colo honours (when listed in enable_annotations)
_BOOL_ANNOTATIONS = ("disable_block_device_use",)


def apply_annotations(cfg: Config, annotations: Mapping[str, str]) -> Config:
    """Return cfg with the allowed kata hypervisor annotations applied (ConfigError otherwise)."""
    hv = cfg.hypervisor
    changes: dict[str, Any] = {}
    for key, value in annotations.items():
        if not key.startswith(ANNOTATION_HV_PREFIX):
            continue
        name = key[len(ANNOTATION_HV_PREFIX):]
        if name not in hv.enable_annotations:
            raise ConfigError(f"annotation {key} is not enabled in configuration (enable_annotations)")
        if name in _BOOL_ANNOTATIONS:
            if value not in ("true", "false"):
                raise ConfigError(f"annotation {key}={value!r} must be true or false")
            changes[name] = value == "true"
            continue
        if name not in ("default_vcpus", "default_memory", "default_maxvcpus", "default_maxmemory"):
            raise ConfigError(f"annotation {key} is not supported")
        try:
            number = int(value, 10)
        except ValueError:
            raise ConfigError(f"annotation {key}={value!r} is not an integer") from None
        changes[name] = number
    if not changes:
        return cfg
    new_hv = dataclasses.replace(hv, **changes)
    if new_hv.default_maxvcpus and new_hv.default_maxvcpus < new_hv.default_vcpus:
        new_hv = dataclasses.replace(new_hv, default_maxvcpus=new_hv.default_vcpus)
    if new_hv.default_maxmemory and new_hv.default_maxmemory < new_hv.default_memory:
        new_hv = dataclasses.replace(new_hv, default_maxmemory=new_hv.default_memory)
    try:
        return dataclasses.replace(cfg, hypervisor=new_hv).validate()
    except ConfigError as exc:
        raise ConfigError(f"annotations rejected: {exc}") from None
