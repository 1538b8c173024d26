"""The one id rule for container, exec and sandbox ids (also used for share names).

containerd and CRI ids are 64 hex characters; ctr lets users pick any name. The rule is runc's
(``^[\\w+-\\.]+$``) narrowed to what is safe as a path component, a cgroup name and a QEMU id:
a letter or digit first, then up to 127 of ``[A-Za-z0-9_.-]``.
"""
from __future__ import annotations

import re

from common.errors import InvalidArgument

ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


def valid_id(value: object) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value))


def check_id(value: str, what: str = "container_id") -> str:
    """``value`` if it follows the id rule, else InvalidArgument naming ``what``."""
    if not valid_id(value):
        shown = value[:140] if isinstance(value, str) else value
        raise InvalidArgument(f"invalid {what} {shown!r}")
    return value
