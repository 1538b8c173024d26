"""The sandbox's shared filesystem: the 9p share (:mod:`~shim.resources.sharefs.ninep`) and the
symlink-safe mount helpers for directories the guest writes (:mod:`~shim.resources.sharefs.beneath`)."""
from shim.resources.sharefs.ninep import ShareFsResource, Virtio9pShare

__all__ = ["ShareFsResource", "Virtio9pShare"]
