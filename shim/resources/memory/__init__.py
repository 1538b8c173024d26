"""Memory elasticity of a sandbox: :mod:`~shim.resources.memory.plan` (limits and the order of
the mechanisms, pure) and :mod:`~shim.resources.memory.resource` (the resource that resizes)."""
from shim.resources.memory.plan import Limits, MemoryLimitError, MemoryTimeout
from shim.resources.memory.resource import MemoryResource, ResizeResult

__all__ = ["Limits", "MemoryLimitError", "MemoryResource", "MemoryTimeout", "ResizeResult"]
