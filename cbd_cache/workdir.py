"""Where every stage reads and writes inside a workdir: the one place that knows the layout.

    W/data/manifest.json            prepared dataset: class names, counts, shards, fingerprint
    W/data/{train,test}-NNNNNN.tar  WebDataset shards
    W/teachers/<name>/checkpoint.pt stage-1 teacher, with its config, seed and accuracies
    W/cache.zarr                    teacher descriptors per (image, view), the view parameters, provenance
    W/students/<run>/checkpoint.pt  stage-2 students (and baselines)
    W/results.{md,json}             the evaluation table of every model in the workdir

The data folder (manifest + shards) and the cache may live elsewhere, on a shared filesystem or on
any fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://...`): `pipeline.data_url` and
`pipeline.cache_url`. A `Location` is then a URL string instead of a Path; `join`, `open_file`,
`exists` and `zarr_store` treat both alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbd_cache.system.storage import Location, join, location


@dataclass(frozen=True)
class Workdir:
    root: Path
    data_url: str = ""    # "" = root/data
    cache_url: str = ""   # "" = root/cache.zarr

    @property
    def data(self) -> Location:
        return location(self.data_url) if self.data_url else self.root / "data"

    @property
    def manifest(self) -> Location:
        return join(self.data, "manifest.json")

    @property
    def cache(self) -> Location:
        return location(self.cache_url) if self.cache_url else self.root / "cache.zarr"

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
