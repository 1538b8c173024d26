"""The sandbox (pod) cgroup: shim + VMM accounted in the sandbox's OCI cgroupsPath (kata's
sandbox_cgroup_only), or in ``<cgroup_root>/<id>`` below the offline root without one."""
from shim.resources.podcgroup.path import resolve
from shim.resources.podcgroup.resource import PodCgroupResource, host_memory_limit, pod_memory_limit, sandbox_group

__all__ = ["PodCgroupResource", "host_memory_limit", "pod_memory_limit", "resolve", "sandbox_group"]
