"""The host side's one translation module: plain values and OCI JSON → kata's agent protobufs,
and agent replies → the shim's dataclasses.

OCI JSON ↔ ``grpc.Spec`` / ``grpc.Process`` / ``grpc.LinuxResources`` is :mod:`agent_api.oci_codec`
(shared with the guest); kata-shaped network dicts (shim.resources.network.endpoint) become
``types_pb2`` messages; StatsContainerResponse becomes :class:`shim.backend.Stats`; an
:class:`~hypervisor.base.AgentAddress` becomes the client's URL.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from agent_api.oci_codec import process_from_oci, resources_from_oci, spec_from_oci
from common.errors import InvalidArgument
from common.guest_paths import GUEST_SHARED_DIR
from hypervisor.base import AgentAddress
from proto.kata import agent_pb2, types_pb2
from shim.backend import Stats

__all__ = ["NINEP_OPTIONS", "agent_url", "device_from_dict", "interface_from_dict", "storage_from_dict",
           "neighbor_from_dict", "ninep_storage",
           "process_from_oci", "resources_from_oci", "route_from_dict", "spec_from_oci", "stats_from_pb"]

NINEP_OPTIONS = ("trans=virtio", "version=9p2000.L", "cache=mmap", "msize=512000")
M = TypeVar("M", bound=Message)


def stats_from_pb(resp: agent_pb2.StatsContainerResponse) -> Stats:
    cg = resp.cgroup_stats
    cpu, mem, pids = cg.cpu_stats.cpu_usage, cg.memory_stats, cg.pids_stats
    extra: dict[str, int] = dict(mem.stats)
    return Stats(
        cpu_usage_ns=cpu.total_usage, cpu_user_ns=cpu.usage_in_usermode, cpu_kernel_ns=cpu.usage_in_kernelmode,
        memory_usage=mem.usage.usage, memory_limit=mem.usage.limit,
        memory_rss=extra.get("anon", extra.get("rss", 0)),
        memory_cache=mem.cache or extra.get("file", 0),
        memory_inactive_file=extra.get("inactive_file", extra.get("total_inactive_file", 0)),
        pg_fault=extra.get("pgfault", 0), pg_maj_fault=extra.get("pgmajfault", 0),
        pids_current=pids.current, pids_limit=pids.limit)


def _from_dict(value: Mapping[str, Any], message: M, what: str) -> M:
    try:
        return json_format.ParseDict(dict(value), message)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"bad {what} {value!r}: {exc}") from None


def interface_from_dict(d: Mapping[str, Any]) -> types_pb2.Interface:
    """A kata-shaped ``Interface`` dict (VethEndpoint.to_agent_interface) → protobuf."""
    return _from_dict(d, types_pb2.Interface(), "interface")


def route_from_dict(d: Mapping[str, Any]) -> types_pb2.Route:
    """A kata-shaped ``Route`` dict (VethEndpoint.to_agent_routes) → protobuf."""
    return _from_dict(d, types_pb2.Route(), "route")


def neighbor_from_dict(d: Mapping[str, Any]) -> types_pb2.ARPNeighbor:
    """A kata-shaped ``ARPNeighbor`` dict (VethEndpoint.to_agent_neighbors) → protobuf."""
    return _from_dict(d, types_pb2.ARPNeighbor(), "ARP neighbor")


def storage_from_dict(d: Mapping[str, Any]) -> agent_pb2.Storage:
    """A kata-shaped ``Storage`` dict (shim.resources.blockdev.plan.guest_view) → protobuf."""
    return _from_dict(d, agent_pb2.Storage(), "storage")


def device_from_dict(d: Mapping[str, Any]) -> agent_pb2.Device:
    """A kata-shaped ``Device`` dict → protobuf."""
    return _from_dict(d, agent_pb2.Device(), "device")


def agent_url(addr: AgentAddress) -> str:
    if addr.transport == "virtio-serial":
        return f"unix://{addr.path}"
    if addr.transport == "vsock":
        return f"vsock://{addr.cid}:{addr.port}"
    return f"hvsock://{addr.path}:{addr.port}"


def ninep_storage(share_tag: str) -> agent_pb2.Storage:
    """The Storage that mounts the sandbox's 9p share at the guest's shared dir."""
    return agent_pb2.Storage(driver="9p", source=share_tag, fstype="9p", options=list(NINEP_OPTIONS),
                             mount_point=GUEST_SHARED_DIR)
