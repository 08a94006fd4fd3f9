"""Where every stage reads and writes inside a workdir: the one place that knows the layout.

    W/data/manifest.json            prepared dataset: class names, counts, shards, fingerprint
    W/data/{train,test}-NNNNNN.tar  WebDataset shards
    W/data.lock                     held by the one process preparing the data
    W/teachers/<name>/              a stage-1 teacher's run folder (below)
    W/cache.zarr                    teacher descriptors per (image, view), the view parameters, provenance
    W/cache.zarr.locks/             teacher-<name>.lock: held by the one process exporting that teacher;
                                    shared.lock: held for moments, to create the cache or write a shard's views
    W/students/<run>/               a stage-2 student's (or baseline's) run folder
    W/results.{md,json}             the evaluation table of every model in the workdir

A run folder holds:

    checkpoint.pt       the network: weights, the spec that rebuilds it, its config and accuracies
    run.json            identity, kind, history, meta and the checkpoint's SHA-256: written last, it
                        marks the run finished (`train.runs.is_done`)
    resume.pt           while training: where a killed run continues (`train.resume`)
    log.jsonl           one line per epoch
    eval.json, eval.md  the held-out report (accuracy, 15-bin ECE); ncm_<features>.json the NCM report
    per_class.csv       class, name, training count, shot group, accuracy on the held-out split
    reliability.png     the reliability diagram of the held-out split
    features_images.npz the features NCM ran the model for (train, val, test), where a figure asked to keep them
    .lock               held by the one process training the run

The data folder (manifest + shards) and the cache may live elsewhere, on a shared filesystem or on
any fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://...`): `pipeline.data_url` and
`pipeline.cache_url`. A `Location` is then a URL string instead of a Path; `join`, `open_file`,
`exists` and `zarr_store` treat both alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbd_cache.errors import FileDamaged
from cbd_cache.system.storage import Location, join, location, read_json

CHECKPOINT = "checkpoint.pt"
RECORD = "run.json"
RESUME = "resume.pt"
LOG = "log.jsonl"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
PER_CLASS_CSV = "per_class.csv"
RELIABILITY_PNG = "reliability.png"
LOCK = ".lock"
RUN_KINDS = ("teachers", "students")   # the folders of W that hold run folders


def rebuild_command(path: Path) -> str:
    """The command that writes a run folder's file again (for the line that refuses a torn or non-finite one)."""
    path = Path(path)
    folder = path.parent
    if path.name == RESUME:
        return "remove it, then run the same training command again (it starts over from step 0)"
    if path.name in (EVAL_JSON, EVAL_MD):
        return "cbd-cache evaluate, with the same options (it evaluates the checkpoint again)"
    if path.name.startswith("ncm_"):
        return f"cbd-cache ncm {folder.parent.name}/{folder.name}, with the same options (remove the file first)"
    if folder.parent.name == "teachers":
        return (f"cbd-cache train-teacher --name {folder.name} (or import-teacher {folder.name} --checkpoint FILE for "
                "an imported one), with the same options (remove the file first)")
    if folder.parent.name == "students":
        return "cbd-cache train-student with the same options (remove the file first)"
    return "the command that wrote it"


def read_run_json(path: Path) -> dict[str, Any]:
    """A JSON file of a run folder (run.json, eval.json, ncm_*.json); a torn one is `FileDamaged`, naming the file
    and the command that writes it again."""
    try:
        d = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
        raise FileDamaged(f"{path} is torn (not JSON: {e}); write it again: {rebuild_command(path)}") from None
    if not isinstance(d, dict):
        raise FileDamaged(f"{path} is not what this tool wrote (a JSON {type(d).__name__}); write it again: "
                          f"{rebuild_command(path)}")
    return d


def ncm_report(folder: Path, features: str) -> Path:
    return folder / f"ncm_{features}.json"


def kept_features(folder: Path) -> Path:
    """The model's features of every image (train, val, test), kept by NCM for the paper table's figures."""
    return folder / "features_images.npz"


def run_lock(folder: Path) -> Path:
    """The lock file of a run folder (teachers/<name>, students/<run>)."""
    return folder / LOCK


def data_lock(data: Path) -> Path:
    """The lock file beside the data folder, held by the one process preparing it."""
    return Path(data).with_name(Path(data).name + LOCK)


def cache_lock(cache: Path, part: str) -> Path:
    """A lock file of a cache, in a folder beside it (a zarr store holds only its own files): `teacher-<name>`
    for the export of one teacher group, `shared` for the shared arrays."""
    return cache.with_name(cache.name + ".locks") / f"{part}.lock"


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
        return self.teacher_dir(name) / CHECKPOINT

    def student_dir(self, name: str) -> Path:
        return self.root / "students" / name

    def model_dir(self, ref: str) -> Path:
        """A model by reference, `teachers/<name>` or `students/<run>` (as `student.init` names it)."""
        return self.root / ref

    def students(self) -> list[str]:
        folder = self.root / "students"
        return sorted(p.name for p in folder.iterdir() if (p / CHECKPOINT).is_file()) if folder.is_dir() else []

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"
