"""The manifest of the real base (2322f43975b8c383) as it was written before the adapter config
was recorded, and a way to put it (or a variant) under a home without building anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloud.base.manifest import write_current, write_json

RECORDED_VERSION = "2322f43975b8c383"
RECORDED: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "base" / f"manifest-{RECORDED_VERSION}.json")
    .read_text())


def write_recorded_base(home: Path, **changes: Any) -> str:
    """Write the recorded manifest (with ``changes``) as ``home``'s current base; no files
    behind it, so only what reads the manifest alone works on it."""
    version = str(changes.get("version", RECORDED_VERSION))
    write_json(home / "base" / version / "manifest.json", {**RECORDED, **changes})
    write_current(home, version)
    return version
