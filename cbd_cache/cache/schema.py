"""The teacher-descriptor cache: one Zarr v3 group per workdir, `W/cache.zarr`.

Schema (version `SCHEMA_VERSION`), N training images, S shards, image i with v_i stored views
(`data.sampling.view_counts`: `export.allocation` "uniform" gives every image A = `export.views`,
"draws" gives it max(min_views, round(A * r_c(i))), where the class-balanced student draws it),
V views in all, stored flat, image-major, in manifest row order. The views are shared by every
teacher; each teacher is a group of its own, `teachers/<name>`, that export adds, replaces or drops
alone:

    view_count                  int32   (N,)    v_i
    view_offset                 int64   (N,)    where image i's views start in the flat arrays below
    views                       int32   (V, 5)  each view's (top, left, height, width, flip) in source pixels
    views_done                  uint8   (S,)    1 once shard s's views are written (by whichever export came first)
    teachers/<name>/descriptors float16 (V, d)  the teacher's eval-mode GAP descriptor of that view, L2-normalised
                                                (`export.dtype`: float16, float32, or int8 with `scales`)
    teachers/<name>/scales      float16 (V,)    int8 only: descriptor = scale * int8 vector (symmetric, per vector)
    teachers/<name>/logits      float16 (V, C)  optional (export.logits): the teacher's logits of that view
                                                (float16 under int8, float32 under float32)
    teachers/<name>/shard_done  uint8   (S,)    1 once shard s of this teacher is written; export resumes from it

Image i's views are views[view_offset[i] : view_offset[i] + v_i], view a of them the a-th view
derived from (seed, key) (`views.derive_views`): a pure function of (seed, key, a), so a uniform
cache is the case v_i = A, and a smaller budget's views are a prefix of each image's. Zarr has only
regular chunk grids, so the per-view arrays are chunked by `chunk_views` views and each shard's
block starts on a chunk boundary, padded (zeros) up to the next one: one shard is still written by
one writer as whole chunks, and read back as one contiguous slice; writers on several ranks or
machines never share a chunk. The padding costs at most one chunk per shard (`Layout`, the one
definition the writer, reader, `cache info`, verify and the dry run use).

Damage is never read as data. Every array carries a CRC32C per chunk, so a flipped, truncated or
rewritten chunk fails its read; and every array's fill value (`FILL`: NaN for floats, -128 for
int8, -1 for int32/int64) is one no export writes, so a chunk missing from a finished shard reads
as holes the reader sees, never as zeros. Either stops the run with `CacheDamaged`, which names the
array, the shard and `cbd-cache export --repair`. (Done-marks fill with 0: a lost mark only makes
export redo its shard.)

Provenance that checks itself. The root group's `provenance` records what the shared part depends
on (the manifest fingerprint and shard ranges, the view seed, spec and allocation, the layout,
dtype and logits), no teacher: two exports of different teachers agree on it. Each teacher group's
`teacher` attribute records that teacher (checkpoint hash, arch, descriptor size, input
normalisation). Each carries a `fingerprint` of itself, recomputed on every open: metadata edited
by hand is refused. `provenance` is written last at creation (after the two per-row arrays), and
`teacher` last in its group: a group without it is a creation that was cut short. The store may be
a local path or any fsspec URL. `CacheReader` hides the storage dtype: it serves float16 or float32
targets, dequantising int8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cbd_cache.cache.codec import INT8_MAX, logits_dtype
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.sampling import view_counts
from cbd_cache.data.shards import read_labels
from cbd_cache.system.digests import digest
from cbd_cache.views import VIEW_FIELDS

SCHEMA_VERSION = 4      # 4: a group per teacher with its own done-marks and provenance, fingerprinted provenance;
                        # 3: fill values no export writes (2 filled with zeros)

TEACHERS = "teachers"                       # the group of teacher groups
VIEWS_DONE = "views_done"                   # the shared views' done-marks
TEACHER_DONE = "shard_done"                 # a teacher's done-marks, in its group
TEACHER_ARRAYS = ("descriptors", "scales", "logits", TEACHER_DONE)


def teacher_array(name: str, kind: str) -> str:
    """The path of one of teacher `name`'s arrays in the cache: teachers/<name>/<kind>."""
    return f"{TEACHERS}/{name}/{kind}"


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
            sizes[teacher_array(name, "descriptors")] = v * d * item[dtype]
            if dtype == "int8":
                sizes[teacher_array(name, "scales")] = v * 2
            if logits:
                sizes[teacher_array(name, "logits")] = v * num_classes * item[logits_dtype(dtype)]
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


def claimed_counts_agree(prov: dict[str, Any], counts: np.ndarray, class_counts: list[int]) -> bool:
    """The stored v_i are what the provenance's budget, allocation and minimum give these classes: the
    same multiset of counts (the images' labels are not needed, so a reader can check it on every open)."""
    per_class = view_counts(np.arange(len(class_counts)), class_counts, prov["views_per_image"], prov["allocation"],
                            prov["min_views"])
    expected = np.repeat(per_class, class_counts)
    return len(expected) == len(counts) and np.array_equal(np.sort(expected), np.sort(np.asarray(counts)))


def fingerprint(record: dict[str, Any]) -> str:
    """The digest of a provenance record without its own `fingerprint` key: recomputed on every open."""
    return digest({k: v for k, v in record.items() if k != "fingerprint"})


def sealed(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its fingerprint."""
    return {**record, "fingerprint": fingerprint(record)}


@dataclass(frozen=True)
class TeacherRecord:
    """What a teacher group records of its teacher: everything its descriptors depend on but the views."""

    name: str
    type: str
    arch: str
    seed: int
    checkpoint_sha256: str
    descriptor_dim: int
    input_mean: list[float]       # the input normalisation the network applies (imported teachers bring their own)
    input_std: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "target": "eval-mode global-average-pooled descriptor, L2-normalised"}


def provenance(manifest: Manifest, view_seed: int, view_spec: dict, views: int, allocation: str, min_views: int,
               dtype: str, layout: Layout, logits: bool) -> dict[str, Any]:
    """Everything the shared part of the cache depends on (no teacher), with its fingerprint. Two exports
    with equal provenance and equal teacher records write equal bytes."""
    return sealed({
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
    })


# The settings a cache's content depends on: config key -> the provenance key that records it. A student's
# name and identity include them, taken from the cache it reads, and a student whose settings differ is refused.
CACHE_SETTINGS = {"pipeline.seed": "view_seed", "export.views": "views_per_image", "export.allocation": "allocation",
                  "export.min_views": "min_views", "export.dtype": "dtype", "export.logits": "logits"}


PER_ROW = ("view_count", "view_offset")     # one value per image, one chunk each; done-marks one per shard


def shared_specs(prov: dict[str, Any], layout: Layout) -> dict[str, ArraySpec]:
    """The arrays every teacher shares: the per-row arrays, the views and their done-marks."""
    v, cv = layout.total, layout.chunk_views
    return {**row_specs(prov), "views": ArraySpec((v, len(VIEW_FIELDS)), (cv, len(VIEW_FIELDS)), "int32", FILL["int32"]),
            VIEWS_DONE: done_spec(prov)}


def teacher_specs(prov: dict[str, Any], layout: Layout, name: str, descriptor_dim: int) -> dict[str, ArraySpec]:
    """Teacher `name`'s arrays (by their paths in the cache): descriptors, int8 scales, logits, done-marks."""
    v, cv, dtype = layout.total, layout.chunk_views, prov["dtype"]
    d = descriptor_dim
    specs = {teacher_array(name, "descriptors"): ArraySpec((v, d), (cv, d), dtype, FILL[dtype])}
    if dtype == "int8":
        specs[teacher_array(name, "scales")] = ArraySpec((v,), (cv,), "float16", FILL["float16"])
    if prov["logits"]:
        c, ldtype = prov["num_classes"], logits_dtype(dtype)
        specs[teacher_array(name, "logits")] = ArraySpec((v, c), (cv, c), ldtype, FILL[ldtype])
    specs[teacher_array(name, TEACHER_DONE)] = done_spec(prov)
    return specs


def array_specs(prov: dict[str, Any], layout: Layout, teachers: dict[str, dict[str, Any]]) -> dict[str, ArraySpec]:
    """Every array of a cache with this provenance, layout and teacher records: what export creates and readers check."""
    specs = shared_specs(prov, layout)
    for name, record in teachers.items():
        specs.update(teacher_specs(prov, layout, name, record["descriptor_dim"]))
    return specs


def done_spec(prov: dict[str, Any]) -> ArraySpec:
    return ArraySpec((len(prov["shards"]),), (1,), "uint8", 0)


def row_specs(prov: dict[str, Any]) -> dict[str, ArraySpec]:
    """The arrays whose shapes do not depend on the layout: `PER_ROW`."""
    n = prov["num_rows"]
    return {"view_count": ArraySpec((n,), (max(n, 1),), "int32", FILL["int32"]),
            "view_offset": ArraySpec((n,), (max(n, 1),), "int64", FILL["int64"])}


def done_array(array: str) -> str:
    """The done-marks that vouch for `array`'s shards: the views' or its teacher's."""
    parts = array.split("/")
    return teacher_array(parts[1], TEACHER_DONE) if parts[0] == TEACHERS and len(parts) > 1 else VIEWS_DONE
