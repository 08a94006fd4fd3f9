"""Hashes that give things their identity: short digests of JSON-able data, SHA-256 of files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------- helpers
def digest(obj: Any) -> str:
    """A stable short hash of JSON-able data: configs, provenance."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: checkpoints' identity in provenance and run records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
