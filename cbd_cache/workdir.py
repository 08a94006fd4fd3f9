"""Where every stage reads and writes inside a workdir: the one place that knows the layout.

    W/data/manifest.json            prepared dataset: class names, counts, shards, fingerprint
    W/data/{train,test}-NNNNNN.tar  WebDataset shards
    W/teachers/<name>/checkpoint.pt stage-1 teacher, with its config, seed and accuracies
    W/cache.zarr                    teacher descriptors per (image, view), the view parameters, provenance
    W/students/<run>/checkpoint.pt  stage-2 students (and baselines)
    W/results.{md,json}             the evaluation table of every model in the workdir
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def cache(self) -> Path:
        return self.root / "cache.zarr"

    def teacher_dir(self, name: str) -> Path:
        return self.root / "teachers" / name

    def teacher_checkpoint(self, name: str) -> Path:
        return self.teacher_dir(name) / "checkpoint.pt"

    def student_dir(self, name: str) -> Path:
        return self.root / "students" / name

    def model_dir(self, ref: str) -> Path:
        """A model by reference, `teachers/<name>` or `students/<run>` (as `student.init` names it)."""
        return self.root / ref

    def students(self) -> list[str]:
        folder = self.root / "students"
        return sorted(p.name for p in folder.iterdir() if (p / "checkpoint.pt").is_file()) if folder.is_dir() else []

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a killed process never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
