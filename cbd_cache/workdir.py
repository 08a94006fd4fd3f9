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

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

Location = Path | str   # a local path, or an fsspec URL string


def is_url(loc: Location) -> bool:
    """True for a URL that needs fsspec; `file://` URLs and plain paths are local."""
    return isinstance(loc, str) and "://" in loc and not loc.startswith("file://")


def location(text: str) -> Location:
    """A path or URL from the config: a Path when local, the URL string otherwise."""
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return text.rstrip("/") if is_url(text) else Path(text)


def join(loc: Location, name: str) -> Location:
    return f"{loc}/{name}" if is_url(loc) else Path(loc) / name


def parent(loc: Location) -> Location:
    return loc.rsplit("/", 1)[0] if is_url(loc) else Path(loc).parent


def open_file(loc: Location, mode: str = "rb"):
    """A file object for a path or a URL (fsspec)."""
    if not is_url(loc):
        return open(loc, mode)
    return fsspec.open(loc, mode).open()


def exists(loc: Location) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    fs, path = fsspec.core.url_to_fs(loc)
    return fs.exists(path)


def remove(loc: Location) -> None:
    """Delete one file, local or at a URL."""
    if not is_url(loc):
        Path(loc).unlink()
        return
    fs, path = fsspec.core.url_to_fs(loc)
    fs.rm(path)


def bytes_under(loc: Location) -> int:
    """Bytes stored under a folder or prefix."""
    if not is_url(loc):
        return sum(f.stat().st_size for f in Path(loc).rglob("*") if f.is_file())
    fs, path = fsspec.core.url_to_fs(loc)
    return int(fs.du(path))


def upload(folder: Path, url: str) -> None:
    """Copy a local folder's files to a URL prefix (what `prepare` does for a remote `data_url`)."""
    fs, path = fsspec.core.url_to_fs(url)
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            fs.put_file(str(f), f"{path}/{f.name}")


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


def read_json(path: Location) -> Any:
    with open_file(path, "rb") as f:
        return json.loads(f.read())


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: checkpoints' identity in provenance and run records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
