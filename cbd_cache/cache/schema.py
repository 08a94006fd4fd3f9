"""The teacher-descriptor cache: one Zarr v3 group per workdir, `W/cache.zarr`.

Schema (version `SCHEMA_VERSION`), N training images, S shards, image i with v_i stored views
(`data.sampling.view_counts`: `export.allocation` "uniform" gives every image A = `export.views`,
"draws" gives it max(min_views, round(A * r_c(i))), where the class-balanced student draws it),
V views in all, stored flat, image-major, in manifest row order:

    view_count            int32   (N,)        v_i
    view_offset           int64   (N,)        where image i's views start in the flat arrays below
    views                 int32   (V, 5)      each view's (top, left, height, width, flip) in source pixels
    descriptors/<teacher> float16 (V, d)      the teacher's eval-mode GAP descriptor of that view, L2-normalised
                                              (`export.dtype`: float16, float32, or int8 with `scales/`)
    scales/<teacher>      float16 (V,)        int8 only: descriptor = scale * int8 vector (symmetric, per vector)
    logits/<teacher>      float16 (V, C)      optional (export.logits): the teacher's logits of that view
                                              (float16 under int8, float32 under float32)
    shard_done            uint8   (S,)        1 once shard s is written; export resumes from it

Image i's views are views[view_offset[i] : view_offset[i] + v_i], view a of them the a-th view
derived from (seed, key) (`views.derive_views`): a pure function of (seed, key, a), so a uniform
cache is the case v_i = A, and a smaller budget's views are a prefix of each image's. Zarr has only
regular chunk grids, so the per-view arrays are chunked by `chunk_views` views and each shard's
block starts on a chunk boundary, padded (zeros) up to the next one: one shard is still written by
one writer as whole chunks, and read back as one contiguous slice; writers on several ranks or
machines never share a chunk. The padding costs at most one chunk per shard (`Layout`, the one
definition the writer, reader, `cache info`, verify and the dry run use).

Damage is never read as data (schema 3). Every array carries a CRC32C per chunk, so a flipped,
truncated or rewritten chunk fails its read; and every array's fill value (`FILL`: NaN for floats,
-128 for int8, -1 for int32/int64) is one no export writes, so a chunk missing from a finished
shard reads as holes the reader sees, never as zeros. Either stops the run with `CacheDamaged`,
which names the array, the shard and `cbd-cache export --repair`. (`shard_done` fills with 0: a
lost mark only makes export redo its shard.)

The group's attributes (`provenance`) record the manifest fingerprint, the view seed, spec and
allocation, and each teacher's checkpoint hash; a cache that disagrees with the data or teachers
it is asked to serve is refused. `provenance` is written last at creation (after the two per-row
arrays): a group without it is a creation that was cut short. The store may be a local path or
any fsspec URL. `CacheReader` hides the storage dtype: it serves float16 or float32 targets,
dequantising int8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cbd_cache.cache.codec import INT8_MAX, logits_dtype
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.sampling import view_counts
from cbd_cache.data.shards import read_labels
from cbd_cache.views import VIEW_FIELDS

SCHEMA_VERSION = 3      # 3: fill values no export writes (2 filled with zeros)


CHUNKS_PER_SHARD = 32    # auto chunk_views: a shard's average block in 32 chunks, so padding wastes <= 1/32


MIN_CHUNK_VIEWS = 64


def default_chunk_views(shard_size: int, views: int) -> int:
    """`export.chunk_views = 0`: a full shard's views (shard_size * A) in `CHUNKS_PER_SHARD` chunks, at least 64.

    The padding of a shard's block is under one chunk, so under 1/32 of an average block; smaller
    chunks waste less but make a shard's read touch more chunk objects.
    """
    return max(MIN_CHUNK_VIEWS, shard_size * views // CHUNKS_PER_SHARD)


# Fill values no export writes: a missing chunk reads as these, and the reader takes them for damage.
FILL: dict[str, float | int] = {"float16": float("nan"), "float32": float("nan"), "int8": -INT8_MAX - 1,
                                "int32": -1, "int64": -1}


@dataclass(frozen=True)
class ArraySpec:
    """One array of the schema as zarr stores it."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    fill: float | int


@dataclass(frozen=True)
class Layout:
    """Where every image's views sit in the flat per-view arrays: the cache schema's one definition."""

    counts: np.ndarray           # (N,) int64, v_i
    offsets: np.ndarray          # (N,) int64, first flat index of image i's views
    blocks: np.ndarray           # (S, 2) int64, shard s's flat [start, stop): start on a chunk boundary,
                                 # stop the next chunk boundary after its last view (or the array's end)
    chunk_views: int

    @property
    def total(self) -> int:
        """V: the flat arrays' length, padding included."""
        return int(self.blocks[-1, 1]) if len(self.blocks) else 0

    def array_bytes(self, teachers: dict[str, int], dtype: str, num_classes: int, logits: bool) -> dict[str, int]:
        """Bytes of each array as written (uncompressed, before the 4-byte CRC32C of each chunk)."""
        item = {"float16": 2, "float32": 4, "int8": 1}
        n, v = len(self.counts), self.total
        sizes = {"view_count": n * 4, "view_offset": n * 8, "views": v * len(VIEW_FIELDS) * 4}
        for name, d in teachers.items():
            sizes[f"descriptors/{name}"] = v * d * item[dtype]
            if dtype == "int8":
                sizes[f"scales/{name}"] = v * 2
            if logits:
                sizes[f"logits/{name}"] = v * num_classes * item[logits_dtype(dtype)]
        return sizes


def make_layout(shards: list[list[int]], counts: np.ndarray, chunk_views: int) -> Layout:
    """Shard blocks in order, each padded to a multiple of `chunk_views`; rows packed within their shard's block."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.zeros(len(counts), dtype=np.int64)
    blocks = np.zeros((len(shards), 2), dtype=np.int64)
    start = 0
    for s, (lo, hi) in enumerate(shards):
        within = np.cumsum(counts[lo:hi])
        offsets[lo:hi] = start + within - counts[lo:hi]
        used = int(within[-1]) if hi > lo else 0
        blocks[s] = start, start + -(-used // chunk_views) * chunk_views
        start = int(blocks[s, 1])
    return Layout(counts, offsets, blocks, chunk_views)


def cache_counts(manifest: Manifest, views: int, allocation: str, min_views: int,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """v_i of every training image, from the manifest's class counts and the images' labels (read if not given)."""
    if allocation == "uniform":
        return np.full(manifest.train.num_samples, views, dtype=np.int64)
    labels = read_labels(manifest, "train") if labels is None else labels
    return view_counts(labels, manifest.train.class_counts, views, allocation, min_views)


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


def provenance(manifest: Manifest, view_seed: int, view_spec: dict, views: int, allocation: str, min_views: int,
               dtype: str, layout: Layout, teachers: list[TeacherRecord], logits: bool) -> dict[str, Any]:
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
        "allocation": allocation,
        "min_views": min_views,
        "views_stored": int(layout.counts.sum()),
        "views_total": layout.total,
        "chunk_views": layout.chunk_views,
        "dtype": dtype,
        "logits": logits,
        "teachers": {t.name: t.to_dict() for t in teachers},
    }


# The settings a cache's content depends on: config key -> the provenance key that records it. A student's
# name and identity include them, and a student whose settings differ from the cache's is refused.
CACHE_SETTINGS = {"pipeline.seed": "view_seed", "export.views": "views_per_image", "export.allocation": "allocation",
                  "export.min_views": "min_views", "export.dtype": "dtype", "export.logits": "logits"}


PER_ROW = ("view_count", "view_offset")     # one value per image, one chunk each; "shard_done" one per shard


def array_specs(prov: dict[str, Any], layout: Layout) -> dict[str, ArraySpec]:
    """Every array of a cache with this provenance and layout: what export creates and readers check.

    Arrays other than `PER_ROW` and "shard_done" hold one entry per flat view, chunked by `chunk_views`.
    """
    v, cv, dtype = layout.total, layout.chunk_views, prov["dtype"]
    specs = {**row_specs(prov), "views": ArraySpec((v, len(VIEW_FIELDS)), (cv, len(VIEW_FIELDS)), "int32", FILL["int32"])}
    for name, t in prov["teachers"].items():
        d = t["descriptor_dim"]
        specs[f"descriptors/{name}"] = ArraySpec((v, d), (cv, d), dtype, FILL[dtype])
        if dtype == "int8":
            specs[f"scales/{name}"] = ArraySpec((v,), (cv,), "float16", FILL["float16"])
        if prov["logits"]:
            c, ldtype = prov["num_classes"], logits_dtype(dtype)
            specs[f"logits/{name}"] = ArraySpec((v, c), (cv, c), ldtype, FILL[ldtype])
    return specs


def row_specs(prov: dict[str, Any]) -> dict[str, ArraySpec]:
    """The arrays whose shapes do not depend on the layout: `PER_ROW` and "shard_done"."""
    n = prov["num_rows"]
    return {"view_count": ArraySpec((n,), (max(n, 1),), "int32", FILL["int32"]),
            "view_offset": ArraySpec((n,), (max(n, 1),), "int64", FILL["int64"]),
            "shard_done": ArraySpec((len(prov["shards"]),), (1,), "uint8", 0)}
