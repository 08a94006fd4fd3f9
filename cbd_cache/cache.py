"""The teacher-descriptor cache: one Zarr v3 group per workdir, `W/cache.zarr`.

Schema (version `SCHEMA_VERSION`), N training images, A views per image, S shards:

    views                 int32   (N, A, 5)   each view's (top, left, height, width, flip) in source pixels
    descriptors/<teacher> float16 (N, A, d)   the teacher's eval-mode GAP descriptor of that view, L2-normalised
                                              (`export.dtype`: float16, float32, or int8 with `scales/`)
    scales/<teacher>      float16 (N, A)      int8 only: descriptor = scale * int8 vector (symmetric, per vector)
    logits/<teacher>      float16 (N, A, C)   optional (export.logits): the teacher's logits of that view
                                              (float16 under int8, float32 under float32)
    shard_done            uint8   (S,)        1 once shard s is written; export resumes from it

Row i is the manifest's sample i. Chunks hold `chunk_rows` rows (default: one shard), so a shard is
written by one writer as whole chunks and read back as one contiguous slice; writers on several
ranks or machines never share a chunk, so they may write one store at once. The group's attributes
(`provenance`) record the manifest fingerprint, the view seed and spec, and each teacher's
checkpoint hash; a cache that disagrees with the data or teachers it is asked to serve is refused.
`provenance` is written last at creation: a group without it is a creation that was cut short.
The store may be a local path or any fsspec URL.
`CacheReader` hides the storage dtype: it serves float16 or float32 targets, dequantising int8.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.errors

from . import __version__
from .data.manifest import Manifest
from .views import VIEW_FIELDS
from .workdir import Location, bytes_under, exists, join

SCHEMA_VERSION = 1
INT8_MAX = 127


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector int8 over the last axis: (q int8, scale float16) with x ~= scale * q.

    The scale is rounded to float16 before q is computed, so `dequantize_int8` inverts exactly what
    was stored; a zero vector gets scale 0 and q = 0.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / INT8_MAX).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    q = np.divide(x, s32, out=np.zeros_like(x), where=s32 > 0)
    return np.clip(np.rint(q), -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype: str | np.dtype = np.float32) -> np.ndarray:
    """scale * q, computed in float32, returned as `dtype`."""
    return (q.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(dtype, copy=False)


def logits_dtype(dtype: str) -> str:
    """Logits are not quantised: an int8 cache stores them as float16."""
    return "float16" if dtype == "int8" else dtype


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, or does not match the data or teachers it is asked to serve."""


@dataclass(frozen=True)
class TeacherRecord:
    """What the cache records of each teacher it holds."""

    name: str
    type: str
    arch: str
    seed: int
    checkpoint_sha256: str
    descriptor_dim: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def provenance(manifest: Manifest, view_seed: int, view_spec: dict, views: int, dtype: str, chunk_rows: int,
               teachers: list[TeacherRecord], logits: bool) -> dict[str, Any]:
    """Everything the cache's content depends on; two exports with equal provenance write equal bytes."""
    return {
        "schema_version": SCHEMA_VERSION,
        "manifest_fingerprint": manifest.fingerprint,
        "num_rows": manifest.train.num_samples,
        "num_classes": manifest.num_classes,
        "shards": [[s.start, s.stop] for s in manifest.train.shards],
        "view_seed": view_seed,
        "view_spec": view_spec,
        "view_fields": list(VIEW_FIELDS),
        "views_per_image": views,
        "dtype": dtype,
        "chunk_rows": chunk_rows,
        "logits": logits,
        "teachers": {t.name: t.to_dict() for t in teachers},
    }


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class CacheWriter:
    """Creates the group (or reopens it to resume) and writes whole shards."""

    def __init__(self, path: Location, prov: dict[str, Any], create: bool = True):
        """Open the cache at `path` for writing, creating it if absent (only when `create`: one writer creates)."""
        self.path = path
        self.prov = prov
        attrs = None
        if exists(path):
            try:
                attrs = dict(zarr.open_group(store(path), mode="r").attrs)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                attrs = {}
        if attrs is not None and "provenance" in attrs:
            diff = _diff(attrs["provenance"], prov)
            if diff:
                raise CacheError(
                    f"{self.path} was exported for different {', '.join(diff)}; it cannot be resumed. "
                    f"Delete it (rm -r {self.path}) to export again, or use another --workdir")
            self.group = zarr.open_group(store(path), mode="r+")
        elif not create:
            raise CacheError(f"{self.path}: the cache was not created")
        elif attrs is not None and "tool_version" not in attrs:
            raise CacheError(f"{self.path} exists and is not a cbd-cache cache; choose another cache location")
        else:   # absent, or a creation that was cut short: (re)create it
            self.group = self._create()

    def _create(self) -> zarr.Group:
        p = self.prov
        group = zarr.open_group(store(self.path), mode="w", attributes={"tool_version": __version__})
        n, a, rows = p["num_rows"], p["views_per_image"], p["chunk_rows"]
        group.create_array("views", shape=(n, a, len(VIEW_FIELDS)), chunks=(rows, a, len(VIEW_FIELDS)),
                           dtype="int32", compressors=None, fill_value=0)
        for name, t in p["teachers"].items():
            group.create_array(f"descriptors/{name}", shape=(n, a, t["descriptor_dim"]),
                               chunks=(rows, a, t["descriptor_dim"]), dtype=p["dtype"], compressors=None, fill_value=0)
            if p["dtype"] == "int8":
                group.create_array(f"scales/{name}", shape=(n, a), chunks=(rows, a), dtype="float16",
                                   compressors=None, fill_value=0)
            if p["logits"]:
                group.create_array(f"logits/{name}", shape=(n, a, p["num_classes"]), chunks=(rows, a, p["num_classes"]),
                                   dtype=logits_dtype(p["dtype"]), compressors=None, fill_value=0)
        group.create_array("shard_done", shape=(len(p["shards"]),), chunks=(1,), dtype="uint8", compressors=None,
                           fill_value=0)
        # provenance last: readers take the group for a cache only once its arrays exist
        group.attrs.update({"provenance": p,
                            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        return zarr.open_group(store(self.path), mode="r+")

    def done_shards(self) -> set[int]:
        return set(np.flatnonzero(self.group["shard_done"][:]).tolist())

    def write_shard(self, index: int, views: np.ndarray, descriptors: dict[str, np.ndarray],
                    logits: dict[str, np.ndarray] | None = None) -> None:
        """Write shard `index`'s rows, then mark it done: a crash in between only costs a redo."""
        start, stop = self.prov["shards"][index]
        dtype = self.prov["dtype"]
        self.group["views"][start:stop] = views
        for name, d in descriptors.items():
            if dtype == "int8":
                d, scale = quantize_int8(d)
                self.group[f"scales/{name}"][start:stop] = scale
            self.group[f"descriptors/{name}"][start:stop] = d.astype(dtype, copy=False)
        for name, z in (logits or {}).items():
            self.group[f"logits/{name}"][start:stop] = z.astype(logits_dtype(dtype), copy=False)
        self.group["shard_done"][index] = 1


def store(path: Location) -> str:
    """What zarr opens: a local path, or an fsspec URL (zarr wraps it in an FsspecStore)."""
    return str(path)


def open_group(path: Location) -> zarr.Group:
    if not exists(path):
        raise CacheError(f"no cache at {path}; run `cbd-cache export` first")
    group = zarr.open_group(store(path), mode="r")
    prov = dict(group.attrs).get("provenance")
    if not prov:
        raise CacheError(f"{path}: the cache's creation was cut short; run `cbd-cache export` to create it again")
    if prov.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema {prov and prov.get('schema_version')}, this tool reads {SCHEMA_VERSION}")
    return group


class CacheReader:
    """Serves (views, targets) for a row range to the student, after checking the cache fits.

    Targets are the chosen teachers' descriptors concatenated in the order asked, each already
    L2-normalised at export; `views` limits the student to the first V cached views. An int8 cache
    is dequantised here, to float16, so the student never sees the storage format.
    """

    def __init__(self, path: Location, manifest: Manifest, teachers: list[str], views: int = 0,
                 checkpoint_hashes: dict[str, str] | None = None, with_logits: bool = False):
        self.path = path
        group = open_group(self.path)
        prov = dict(group.attrs)["provenance"]
        if prov["manifest_fingerprint"] != manifest.fingerprint:
            raise CacheError(
                f"{self.path} was exported for data with fingerprint {prov['manifest_fingerprint'][:12]}, but "
                f"the manifest {join(manifest.folder, 'manifest.json')} has {manifest.fingerprint[:12]}; "
                "re-run `cbd-cache export` for this data")
        done = group["shard_done"][:]
        if not done.all():
            raise CacheError(f"{self.path} is incomplete: {int(done.sum())}/{len(done)} shards exported; "
                             "run `cbd-cache export` to finish it")
        missing = [t for t in teachers if t not in prov["teachers"]]
        if missing:
            raise CacheError(f"{self.path} has no descriptors for teacher(s) {missing}; "
                             f"it holds {sorted(prov['teachers'])}")
        for name, sha in (checkpoint_hashes or {}).items():
            cached = prov["teachers"].get(name, {}).get("checkpoint_sha256")
            if name in teachers and cached != sha:
                raise CacheError(f"{self.path}: teacher {name!r} was retrained after the export "
                                 f"(checkpoint {sha[:12]}, cache {cached[:12]}); re-run `cbd-cache export`")
        if with_logits and not prov["logits"]:
            raise CacheError(f"{self.path} holds no teacher logits; export with --set export.logits=true")
        if views > prov["views_per_image"]:
            raise CacheError(f"{self.path} holds {prov['views_per_image']} views per image, {views} were asked for")
        self.group = group
        self.prov = prov
        self.teachers = list(teachers)
        self.views = views or prov["views_per_image"]
        self.with_logits = with_logits
        self.dims = [prov["teachers"][t]["descriptor_dim"] for t in teachers]
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        """An array of the group, opened once: each `group[name]` re-reads and parses its zarr.json."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def target_dim(self) -> int:
        return sum(self.dims)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows [start, stop): views int32 (n, V, 5), targets (n, V, sum d), logits (n, V, K*C) or None.

        Each array is one contiguous, chunk-aligned slice: no per-sample reads.
        """
        v = self.views
        views = self.array("views")[start:stop, :v]
        parts = [self.descriptors(t, start, stop) for t in self.teachers]
        targets = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        logits = None
        if self.with_logits:
            zs = [self.array(f"logits/{t}")[start:stop, :v] for t in self.teachers]
            logits = np.concatenate(zs, axis=-1) if len(zs) > 1 else zs[0]
        return views, targets, logits

    def descriptors(self, teacher: str, start: int, stop: int) -> np.ndarray:
        """One teacher's descriptors of rows [start, stop), first V views: float16/float32 as stored, int8 dequantised."""
        d = self.array(f"descriptors/{teacher}")[start:stop, :self.views]
        if self.prov["dtype"] != "int8":
            return d
        return dequantize_int8(d, self.array(f"scales/{teacher}")[start:stop, :self.views], np.float16)


def cache_info(path: Location) -> dict[str, Any]:
    """Arrays, shapes, dtypes, chunking, provenance, completeness and bytes on disk."""
    group = open_group(path)
    prov = dict(group.attrs)["provenance"]
    arrays = {}
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        arrays[name] = _array_info(arr)
    for sub in ("descriptors", "scales", "logits"):
        if sub in group:
            for name, arr in sorted(group[sub].arrays(), key=lambda kv: kv[0]):
                arrays[f"{sub}/{name}"] = _array_info(arr)
    done = group["shard_done"][:]
    bytes_on_disk = bytes_under(path)
    return {
        "path": str(path),
        "schema_version": prov["schema_version"],
        "manifest_fingerprint": prov["manifest_fingerprint"],
        "complete": bool(done.all()),
        "shards_done": int(done.sum()),
        "shards_total": int(len(done)),
        "views_per_image": prov["views_per_image"],
        "view_seed": prov["view_seed"],
        "view_spec": prov["view_spec"],
        "dtype": prov["dtype"],
        "teachers": prov["teachers"],
        "arrays": arrays,
        "bytes_on_disk": bytes_on_disk,
        "tool_version": dict(group.attrs).get("tool_version"),
        "created_utc": dict(group.attrs).get("created_utc"),
    }


def _array_info(arr: zarr.Array) -> dict[str, Any]:
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "bytes_stored": int(arr.nbytes_stored())}
