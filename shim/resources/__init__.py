"""Sandbox resources (host objects a VM needs) and the manager that runs their lifecycle.

:data:`SANDBOX_RESOURCES` is the one place a resource is added: each class has ``kind``,
``for_sandbox(ctx)`` (an instance, or None when the sandbox does not need it) and the
:class:`~shim.resources.manager.Resource` methods; the list order is the creation order
(teardown and recovery run it backwards). A backend may also *offer* a resource for the boot of
one sandbox (:func:`offer_for_boot`: the first container's block storage, made from its rootfs
mounts, which the sandbox spec alone does not show); offers join the boot after the listed ones.
"""
from __future__ import annotations

from typing import Any

from shim.resources.blockdev.resource import ContainerStorage
from shim.resources.manager import RecoverFn, Resource, ResourceContext, ResourceManager
from shim.resources.memory import MemoryResource
from shim.resources.network.resource import NetworkResource
from shim.resources.podcgroup.resource import PodCgroupResource
from shim.resources.qos.resource import QosResource
from shim.resources.sharefs import ShareFsResource
from shim.resources.vfio.physical import PhysicalNicResource

# PodCgroupResource first: the shim joins the sandbox cgroup before anything (the VMM) is spawned.
SANDBOX_RESOURCES: tuple[Any, ...] = (PodCgroupResource, ShareFsResource, NetworkResource, PhysicalNicResource,
                                      QosResource, ContainerStorage, MemoryResource)

_OFFERS: dict[str, list[Resource]] = {}


def offer_for_boot(sandbox_id: str, resource: Resource) -> None:
    """Have the next boot of ``sandbox_id`` include ``resource`` (journaled under its kind: at
    most one offer per kind)."""
    _OFFERS.setdefault(sandbox_id, []).append(resource)


def withdraw_offers(sandbox_id: str) -> list[Resource]:
    """Offers the boot did not take (dropped)."""
    return _OFFERS.pop(sandbox_id, [])


def for_sandbox(ctx: ResourceContext) -> list[Resource]:
    """The resources this sandbox needs, in creation order (offers last)."""
    listed = [r for r in (cls.for_sandbox(ctx) for cls in SANDBOX_RESOURCES) if r is not None]
    return listed + _OFFERS.pop(ctx.sandbox_id, [])


def recover_functions() -> dict[str, RecoverFn]:
    return {cls.kind: cls.recover for cls in SANDBOX_RESOURCES}


__all__ = ["SANDBOX_RESOURCES", "Resource", "ResourceContext", "ResourceManager", "for_sandbox",
           "offer_for_boot", "recover_functions", "withdraw_offers"]
