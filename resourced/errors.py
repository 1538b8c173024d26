"""Policy-file errors carry the file, the line and the reason (the daemon stops at start)."""
from __future__ import annotations

from common.errors import ConfigError


class PolicyError(ConfigError):
    def __init__(self, file: str, line: int | None, reason: str) -> None:
        self.file, self.line, self.reason = file, line, reason
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {reason}")
