"""Read a sandbox's resource journal (``<state>/resources.json``) the way a test inspects it:
never raising (a missing or half-written journal reads as empty)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JOURNAL = "resources.json"

Journal = list[dict[str, Any]]


def read_journal(state_dir: Path) -> Journal:
    try:
        entries: Journal = json.loads((state_dir / JOURNAL).read_text())["entries"]
        return entries
    except (OSError, ValueError, KeyError, TypeError):
        return []


def kinds(journal: Journal) -> list[str]:
    return [str(e.get("kind")) for e in journal]
