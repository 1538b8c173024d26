"""Hypervisor drivers by name: ``[runtime] hypervisor = "<name>"`` with its ``[hypervisor.<name>]``.

A driver module exports a class implementing :class:`hypervisor.base.Hypervisor` with two class
attributes the configuration needs before any VM exists:

* ``Options``: a frozen dataclass of the keys only this driver knows (QEMU's machine type, CH's
  hotplug method, ...), with ``validate()`` raising ConfigError and ``DEFAULT_PATH`` (the binary
  used when ``path`` is not configured);
* ``name``: the registry name.

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


def names() -> tuple[str, ...]:
    return tuple(DRIVERS)


def driver_class(name: str) -> Any:
    """The driver class registered as ``name`` (ConfigError for an unknown name)."""
    target = DRIVERS.get(name)
    if target is None:
        raise ConfigError(f"unknown hypervisor {name!r} (known: {', '.join(DRIVERS)})")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"hypervisor {name!r} is not available: {exc}") from exc


def create(name: str) -> Any:
    """A new, unprepared driver instance."""
    return driver_class(name)()


def options_class(name: str) -> Any:
    return driver_class(name).Options
