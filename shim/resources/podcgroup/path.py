"""The sandbox's OCI ``linux.cgroupsPath`` → a group path relative to every hierarchy root.

Two spellings exist (runc's, which containerd and kubelet follow):

* cgroupfs driver: a path, ``/kubepods/besteffort/pod<uid>/<id>`` or ctr's ``/default/<id>``
  (relative paths are taken from the hierarchy root too; runc would put them below its own
  cgroup, which for a shim is meaningless);
* systemd driver: ``<slice>:<prefix>:<name>``, e.g.
  ``kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>``. The slice expands by its dashes
  (``a-b-c.slice`` → ``a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` or empty is the root) and
  the unit is ``<prefix>-<name>.scope`` (``<name>`` itself when it ends in ``.slice``), as runc's
  systemd driver expands it.

:func:`resolve` returns the relative path ("a/b/c", never "" for a valid input) or None for an
empty cgroupsPath. Anything that could escape the hierarchy or is not a plain cgroup name
(``..``, control characters, a bad slice name) is a ConfigError.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError

_COMPONENT = re.compile(r"[A-Za-z0-9_.@+-]{1,255}")
MAX_DEPTH = 16


def _check_component(part: str, whole: str) -> str:
    if part in (".", "..") or not _COMPONENT.fullmatch(part):
        raise ConfigError(f"linux.cgroupsPath {whole!r}: {part!r} is not a usable cgroup name")
    return part


def expand_slice(slice_name: str, whole: str = "") -> list[str]:
    """``kubepods-besteffort-pod1.slice`` → [kubepods.slice, kubepods-besteffort.slice,
    kubepods-besteffort-pod1.slice]; ``-.slice`` / "" → [] (the root)."""
    whole = whole or slice_name
    if slice_name in ("", "-.slice"):
        return []
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise ConfigError(f"linux.cgroupsPath {whole!r}: {slice_name!r} is not a systemd slice name")
    stem = slice_name[: -len(".slice")]
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise ConfigError(f"linux.cgroupsPath {whole!r}: invalid slice name {slice_name!r}")
    parts = stem.split("-")
    out = ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]
    return [_check_component(p, whole) for p in out]


def is_systemd(cgroups_path: str) -> bool:
    return ":" in cgroups_path and not cgroups_path.startswith("/")


def resolve(cgroups_path: str | None) -> str | None:
    """The group for ``cgroups_path`` relative to the hierarchy roots (see module docstring)."""
    if cgroups_path is None or not cgroups_path.strip():
        return None
    text = cgroups_path.strip()
    if any(ord(c) < 0x20 for c in text):
        raise ConfigError(f"linux.cgroupsPath {cgroups_path!r} has control characters")
    if is_systemd(text):
        fields = text.split(":")
        if len(fields) != 3:
            raise ConfigError(f"linux.cgroupsPath {text!r}: a systemd path is <slice>:<prefix>:<name>")
        slice_name, prefix, name = fields
        if not name:
            raise ConfigError(f"linux.cgroupsPath {text!r}: the unit name is empty")
        unit = name if name.endswith(".slice") else (f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
        parts = [*expand_slice(slice_name, text), _check_component(unit, text)]
    else:
        parts = [_check_component(p, text) for p in text.split("/") if p]
        if not parts:
            raise ConfigError(f"linux.cgroupsPath {text!r} names the hierarchy root")
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"linux.cgroupsPath {text!r} is deeper than {MAX_DEPTH} levels")
    return "/".join(parts)


def from_spec(spec: Mapping[str, Any]) -> str | None:
    """The resolved cgroupsPath of an OCI spec mapping (None when absent or empty)."""
    linux = spec.get("linux")
    if not isinstance(linux, Mapping):
        return None
    value = linux.get("cgroupsPath")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"linux.cgroupsPath must be a string, not {type(value).__name__}")
    return resolve(value)


def under(path: str, root: str) -> bool:
    """True when group ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")
