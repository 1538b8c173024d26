"""Sandbox resources (host objects a VM needs) and the manager that runs their lifecycle.

:data:`SANDBOX_RESOURCES` is the one place a resource is added: each class has ``kind``,
``for_sandbox(ctx)`` (an instance, or None when the sandbox does not need it) and the
:class:`~shim.resources.manager.Resource` methods; the list order is the creation order
(teardown and recovery run it backwards).
"""
from __future__ import annotations

from typing import Any

from shim.resources.manager import RecoverFn, Resource, ResourceContext, ResourceManager
from shim.resources.memory import MemoryResource
from shim.resources.network.resource import NetworkResource
from shim.resources.qos.resource import QosResource
from shim.resources.sharefs import ShareFsResource

SANDBOX_RESOURCES: tuple[Any, ...] = (ShareFsResource, NetworkResource, QosResource, MemoryResource)


def for_sandbox(ctx: ResourceContext) -> list[Resource]:
    """The resources this sandbox needs, in creation order."""
    return [r for r in (cls.for_sandbox(ctx) for cls in SANDBOX_RESOURCES) if r is not None]


def recover_functions() -> dict[str, RecoverFn]:
    return {cls.kind: cls.recover for cls in SANDBOX_RESOURCES}


__all__ = ["SANDBOX_RESOURCES", "Resource", "ResourceContext", "ResourceManager", "for_sandbox",
           "recover_functions"]
