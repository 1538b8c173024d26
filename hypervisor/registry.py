"""Hypervisor drivers by name: ``[runtime] hypervisor = "<name>"`` with its ``[hypervisor.<name>]``.

A driver module exports a class implementing :class:`hypervisor.base.Hypervisor` with the class
attributes ``name`` (the registry name) and ``Options``: a frozen dataclass of the keys only this
driver knows (QEMU's machine type, CH's hotplug method, ...), with ``validate(where)`` raising
ConfigError and ``DEFAULT_PATH`` (the binary used when ``path`` is not configured). The Options
class lives in a light module of its own (:data:`OPTIONS`) so that reading the configuration
(the shim's start path, kata-colo-ctl) imports no VMM client.

Drivers are imported lazily: selecting ``qemu`` never imports the Cloud Hypervisor client.
"""
from __future__ import annotations

import importlib
from typing import Any

from common.errors import ConfigError

DRIVERS: dict[str, str] = {
    "qemu": "hypervisor.qemu.driver:QemuHypervisor",
    "clh": "hypervisor.clh.driver:CloudHypervisor",
}
OPTIONS: dict[str, str] = {
    "qemu": "hypervisor.qemu.options:QemuOptions",
    "clh": "hypervisor.clh.options:ClhOptions",
}


def names() -> tuple[str, ...]:
    return tuple(DRIVERS)


def _load(table: dict[str, str], name: str) -> Any:
    target = table.get(name)
    if target is None:
        raise ConfigError(f"unknown hypervisor {name!r} (known: {', '.join(DRIVERS)})")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"hypervisor {name!r} is not available: {exc}") from exc


def driver_class(name: str) -> Any:
    """The driver class registered as ``name`` (ConfigError for an unknown name)."""
    return _load(DRIVERS, name)


def create(name: str) -> Any:
    """A new, unprepared driver instance."""
    return driver_class(name)()


def options_class(name: str) -> Any:
    """The driver's Options dataclass, without importing the driver."""
    return _load(OPTIONS, name)
