"""Names the host and the guest agree on (kata's where kata has one).

The sandbox's shared directory is exported with mount tag :data:`SHARE_TAG` and mounted by the
agent at :data:`GUEST_SHARED_DIR`; the agent listens on the virtio-serial port
:data:`AGENT_PORT_NAME` or vsock port :data:`AGENT_VSOCK_PORT`; co-location files live in
:data:`GUEST_COLO_DIR`.
"""
from __future__ import annotations

#: 9p / virtio-fs mount tag of the sandbox share (kata's ``kataShared``).
SHARE_TAG = "kataShared"
#: Where every guest-side mount of host storage lives (the agent refuses others).
SHARED_MOUNT_BASE = "/run/kata-containers"
#: The share's mount point in the guest; container rootfs are ``<dir>/<container-id>/rootfs``.
GUEST_SHARED_DIR = f"{SHARED_MOUNT_BASE}/shared/containers"
#: The guest's virtio-serial port the agent serves ttrpc on.
AGENT_PORT_NAME = "agent.channel.0"
#: kata's agent vsock port.
AGENT_VSOCK_PORT = 1024
#: kata-colo's guest-side state visible to containers (read-only).
GUEST_COLO_DIR = "/run/kata-colo"
#: vCPU → priority mapping the agent writes for batch job agents.
GUEST_VCPU_PRIORITIES = f"{GUEST_COLO_DIR}/vcpu-priorities.json"
