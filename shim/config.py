"""kata-colo configuration: a kata-style TOML file → frozen dataclasses, validated.

Path resolution (first hit wins): the runtime option ``ConfigPath`` (runtimeoptions.v1.Options
from containerd's CRI runtime options), ``$KATA_COLO_CONFIG``, ``/etc/kata-colo/configuration.toml``,
then the defaults shipped in the package (``config/configuration.toml`` in the repo).

Sandbox annotations may override a few hypervisor values (kata's
``io.katacontainers.config.hypervisor.<key>``) only when ``<key>`` is listed in
``[hypervisor.qemu] enable_annotations``; anything else is a ConfigError (a clear error through
ctr, raised before any resource is created).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.errors import ConfigError

DEFAULT_PATH = "/etc/kata-colo/configuration.toml"
ENV_PATH = "KATA_COLO_CONFIG"
PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "config" / "configuration.toml"

ANNOTATION_HV_PREFIX = "io.katacontainers.config.hypervisor."
ANNOTATION_VCPU_PRIORITIES = "io.katacontainers.colo.vcpu-priorities"
ANNOTATION_CONTAINER_PRIORITY = "io.katacontainers.colo.container-priority"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"

_ACCELS = ("auto", "kvm", "tcg")
_SHARED_FS = ("virtio-9p",)
_AGENT_TRANSPORTS = ("virtio-serial", "vsock", "hybrid-vsock")
_SAFE_PARAM = re.compile(r"^[A-Za-z0-9_.,:=/+\- ]*$")


@dataclass(frozen=True)
class HypervisorConfig:
    path: str = "/usr/bin/qemu-system-x86_64"
    kernel: str = "/var/lib/kata-colo/images/current/vmlinux"
    initrd: str = "/var/lib/kata-colo/images/current/initramfs.cpio"
    image: str = ""
    machine_type: str = "q35"
    accel: str = "auto"
    cpu_model: str = ""
    kernel_params: str = ""
    default_vcpus: int = 1
    default_maxvcpus: int = 0
    default_memory: int = 512
    default_maxmemory: int = 0
    memory_slots: int = 10
    shared_fs: str = "virtio-9p"
    enable_balloon: bool = True
    disable_vhost_net: bool = False
    pcie_root_ports: int = 0
    enable_debug: bool = False
    boot_timeout: float = 60.0
    enable_annotations: tuple[str, ...] = ("default_vcpus", "default_memory")


@dataclass(frozen=True)
class AgentConfig:
    transport: str = "virtio-serial"
    vsock_port: int = 1024
    dial_timeout: float = 60.0
    enable_debug: bool = False
    runc_no_pivot: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    enable_debug: bool = False
    internetworking_model: str = "tcfilter"
    state_root: str = "/run/kata-colo/sbs"
    disable_new_netns: bool = False


@dataclass(frozen=True)
class ColoConfig:
    enabled: bool = True
    cgroup_root: str = "kata-colo"
    root: Mapping[str, Any] = field(default_factory=dict)
    priorities: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig = HypervisorConfig()
    agent: AgentConfig = AgentConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    colo: ColoConfig = ColoConfig()
    source: str = "<defaults>"

    def validate(self) -> "Config":
        hv = self.hypervisor
        _check(hv.accel in _ACCELS, f"hypervisor.qemu.accel must be one of {_ACCELS}, not {hv.accel!r}")
        _check(hv.shared_fs in _SHARED_FS, f"hypervisor.qemu.shared_fs must be one of {_SHARED_FS}")
        _check(1 <= hv.default_vcpus <= 256, "hypervisor.qemu.default_vcpus must be 1..256")
        _check(hv.default_maxvcpus == 0 or hv.default_maxvcpus >= hv.default_vcpus,
               "hypervisor.qemu.default_maxvcpus must be 0 (= host CPUs) or >= default_vcpus")
        _check(hv.default_memory >= 128, "hypervisor.qemu.default_memory must be >= 128 MiB")
        _check(hv.default_maxmemory == 0 or hv.default_maxmemory >= hv.default_memory,
               "hypervisor.qemu.default_maxmemory must be 0 or >= default_memory")
        _check(0 <= hv.memory_slots <= 255, "hypervisor.qemu.memory_slots must be 0..255")
        _check(0 <= hv.pcie_root_ports <= 32, "hypervisor.qemu.pcie_root_ports must be 0..32")
        _check(hv.boot_timeout > 0, "hypervisor.qemu.boot_timeout must be > 0")
        _check(bool(_SAFE_PARAM.match(hv.kernel_params)),
               f"hypervisor.qemu.kernel_params has unsupported characters: {hv.kernel_params!r}")
        _check(self.agent.transport in _AGENT_TRANSPORTS,
               f"agent.kata.transport must be one of {_AGENT_TRANSPORTS}")
        _check(self.agent.dial_timeout > 0, "agent.kata.dial_timeout must be > 0")
        _check(self.runtime.internetworking_model in ("tcfilter", "none"),
               "runtime.internetworking_model must be 'tcfilter' or 'none'")
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.colo.cgroup_root)),
               f"colo.cgroup_root must be a plain cgroup name, not {self.colo.cgroup_root!r}")
        for name in self.colo.priorities:
            _check(bool(re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name)),
                   f"colo.priorities: bad priority name {name!r}")
        return self


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid configuration: {message}")


def _section(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"invalid configuration: [{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
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


def parse(text: str, source: str = "<string>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid configuration {source}: {exc}") from None
    known = {"hypervisor", "agent", "runtime", "colo"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"invalid configuration {source}: unknown section(s) {sorted(unknown)}")
    hv_raw = raw.get("hypervisor", {})
    if set(hv_raw) - {"qemu"}:
        raise ConfigError(f"invalid configuration {source}: only [hypervisor.qemu] is supported")
    colo_raw = dict(raw.get("colo", {}))
    priorities = colo_raw.pop("priorities", {})
    root = colo_raw.pop("root", {})
    colo = _section(ColoConfig, {k: v for k, v in colo_raw.items()}, "colo")
    if not isinstance(priorities, Mapping) or not all(isinstance(v, Mapping) for v in priorities.values()):
        raise ConfigError(f"invalid configuration {source}: [colo.priorities.<name>] must be tables")
    colo = dataclasses.replace(colo, priorities=dict(priorities), root=dict(root))
    cfg = Config(
        hypervisor=_section(HypervisorConfig, hv_raw.get("qemu", {}), "hypervisor.qemu"),
        agent=_section(AgentConfig, raw.get("agent", {}).get("kata", {}), "agent.kata"),
        runtime=_section(RuntimeConfig, raw.get("runtime", {}), "runtime"),
        colo=colo,
        source=source,
    )
    return cfg.validate()


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
