"""The sandbox's shared directory, exported to the guest over virtio-9p (kata's ``kataShared``).

Host side: ``<state>/shared`` (mode 0700 below a 0700 state dir: no other host user can reach
anything the guest writes). Container rootfs are bound at ``shared/<cid>/rootfs`` and host files
or volumes at ``shared/<name>``, every bind ``nosuid,nodev`` and read-only on the host side when
the container's mount is read-only (the guest alone must not be the one enforcing it). All paths
below the share are resolved with :class:`~shim.resources.sharefs.beneath.Beneath` (no symlink the
guest planted is followed). The guest agent mounts the share at
:data:`common.guest_paths.GUEST_SHARED_DIR`.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from agent_api.client.convert import ninep_storage
from common.errors import InvalidArgument, ResourceError
from common.guest_paths import GUEST_SHARED_DIR, SHARE_TAG
from common.ids import check_id, valid_id
from common.mount import mounts_under
from hypervisor.base import SharedDir, VmPatch
from shim.resources.manager import ResourceContext
from shim.resources.sharefs.beneath import Beneath

SHARE_DIR = "shared"


class Virtio9pShare:
    """Host side of the share. Blocking (mounts): call through ``asyncio.to_thread``."""

    def __init__(self, host_dir: Path, tag: str = SHARE_TAG) -> None:
        self.host_dir = host_dir
        self.tag = tag

    def prepare(self) -> None:
        self.host_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.host_dir.parent, 0o700)
        self.host_dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.host_dir, 0o700)

    def share_rootfs(self, container_id: str, host_rootfs: Path, readonly: bool = False) -> str:
        """Bind a container's rootfs (already mounted on its bundle) into the share."""
        check_id(container_id, "container id")
        rel = f"{container_id}/rootfs"
        with Beneath(self.host_dir) as b:
            b.makedirs(rel)
            b.umount_all(rel)  # a leftover bind of an earlier attempt is replaced
            b.bind(str(host_rootfs), rel, readonly=readonly)
        return f"{GUEST_SHARED_DIR}/{rel}"

    def share_path(self, source: str, name: str, readonly: bool = False) -> str:
        """Bind a host file or directory (CRI's /etc/hosts, volumes) into the share as ``name``."""
        if not valid_id(name):
            raise InvalidArgument(f"invalid share name {name!r}")
        if not os.path.isabs(source):
            raise InvalidArgument(f"share source {source!r} is not absolute")
        with Beneath(self.host_dir) as b:
            if os.path.isdir(source):
                b.makedirs(name)
            else:
                b.create_file(name)
            b.umount_all(name)
            b.bind(source, name, readonly=readonly)
        return f"{GUEST_SHARED_DIR}/{name}"

    def unshare_path(self, name: str) -> None:
        if not valid_id(name):
            raise InvalidArgument(f"invalid share name {name!r}")
        with Beneath(self.host_dir) as b:
            b.umount_all(name)
        self._remove(self.host_dir / name)

    def unshare(self, container_id: str) -> None:
        check_id(container_id, "container id")
        with Beneath(self.host_dir) as b:
            b.umount_all(f"{container_id}/rootfs")
        self._remove(self.host_dir / container_id)

    def unshare_container(self, container_id: str, owns: Callable[[str], bool]) -> None:
        """Everything of one container: its rootfs and the share entries ``owns`` claims
        (``delete`` after a crash, which has no list of them)."""
        self.unshare(container_id)
        if self.host_dir.is_dir():
            for child in sorted(os.listdir(self.host_dir)):
                if owns(child) and valid_id(child):
                    self.unshare_path(child)

    def _remove(self, path: Path) -> None:
        """Remove ``path`` (not following symlinks) once nothing is mounted below it. A symlink
        the guest planted is removed as such: what it points at is never looked at."""
        if path.is_symlink():
            path.unlink(missing_ok=True)
            return
        if mounts_under(path):
            raise ResourceError(f"{path}: still mounted, not removing it")
        if not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)

    def cleanup(self) -> None:
        """Unmount everything below the share and remove it (idempotent)."""
        if not self.host_dir.exists():
            return
        base = os.path.realpath(self.host_dir)
        with Beneath(self.host_dir) as b:
            for mp in mounts_under(self.host_dir):
                if mp != base:
                    b.umount_all(os.path.relpath(mp, base))
        self._remove(self.host_dir)


class ShareFsResource:
    """The share as a sandbox resource: exported before boot, mounted by CreateSandbox."""

    kind: ClassVar[str] = "sharefs"

    def __init__(self, state_dir: Path) -> None:
        self.share = Virtio9pShare(state_dir / SHARE_DIR)

    @classmethod
    def for_sandbox(cls, ctx: ResourceContext) -> ShareFsResource | None:
        if ctx.config.hypervisor.shared_fs == "none":
            return None
        if "virtio-9p" not in ctx.hypervisor.capabilities().shared_fs:
            raise InvalidArgument(f"hypervisor {ctx.hypervisor.name} has no virtio-9p; "
                                  "set shared_fs = \"none\" (block rootfs)")
        return cls(ctx.state_dir)

    def record(self) -> dict[str, Any]:
        return {"host_dir": str(self.share.host_dir)}

    async def before_boot(self, ctx: ResourceContext) -> VmPatch:
        await asyncio.to_thread(self.share.prepare)
        return VmPatch(shared_dirs=(SharedDir(self.share.tag, str(self.share.host_dir)),))

    def guest_storages(self) -> list[Any]:
        return [ninep_storage(self.share.tag)]

    async def after_boot(self, ctx: ResourceContext) -> None:
        return None

    async def teardown(self) -> None:
        await asyncio.to_thread(self.share.cleanup)

    @classmethod
    async def recover(cls, record: dict[str, Any]) -> None:
        host_dir = str(record.get("host_dir") or "")
        if not host_dir or not os.path.isabs(host_dir) or os.path.basename(host_dir) != SHARE_DIR:
            raise ResourceError(f"sharefs record names no share directory: {record!r}")
        await asyncio.to_thread(Virtio9pShare(Path(host_dir)).cleanup)
