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

import datetime
import shlex
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import zarr

from . import __version__
from .data.manifest import Manifest
from .data.sampling import view_counts
from .data.shards import read_labels
from .views import VIEW_FIELDS
from .workdir import Location, bytes_under, exists, join

SCHEMA_VERSION = 3      # 3: fill values no export writes (2 filled with zeros)
INT8_MAX = 127
CHUNKS_PER_SHARD = 32    # auto chunk_views: a shard's average block in 32 chunks, so padding wastes <= 1/32
MIN_CHUNK_VIEWS = 64


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


REPAIR = "run `cbd-cache export --repair` (same --pipeline, --workdir and --set) to rewrite what is damaged"


class CacheDamaged(RuntimeError):
    """A cache whose stored bytes are not what export wrote: a chunk or array metadata missing, truncated,
    changed. The CLI exits 1; `cbd-cache export --repair` rewrites what is damaged."""


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


def create_array(group: zarr.Group, name: str, spec: ArraySpec) -> zarr.Array:
    """An array of the schema: uncompressed, with a CRC32C per chunk. Over an array whose metadata was
    lost, it writes that metadata again (byte for byte) and keeps the chunks."""
    return group.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=spec.fill,
                              compressors=[zarr.codecs.Crc32cCodec()])


def metadata_problems(group: zarr.Group, specs: dict[str, ArraySpec]) -> dict[str, str]:
    """Arrays whose metadata is missing, unreadable or not the schema's: name -> what is wrong."""
    problems = {}
    for name, spec in specs.items():
        try:
            arr = group[name]
        except KeyError:
            problems[name] = "its metadata (zarr.json) is missing"
            continue
        except (ValueError, TypeError) as e:
            problems[name] = f"its metadata (zarr.json) is unreadable ({e})"
            continue
        if not isinstance(arr, zarr.Array):
            problems[name] = "is not an array"
            continue
        got = ArraySpec(tuple(arr.shape), tuple(arr.chunks), str(arr.dtype), arr.fill_value)
        if got.shape != spec.shape or got.chunks != spec.chunks or got.dtype != spec.dtype or not _same_fill(got, spec):
            problems[name] = (f"its metadata says shape {got.shape}, chunks {got.chunks}, {got.dtype}, fill {got.fill}; "
                              f"the schema says {spec.shape}, {spec.chunks}, {spec.dtype}, fill {spec.fill}")
    return problems


def _same_fill(a: ArraySpec, b: ArraySpec) -> bool:
    return bool(np.isnan(a.fill) and np.isnan(b.fill)) if isinstance(b.fill, float) else a.fill == b.fill


def holes(x: np.ndarray, fill: float | int) -> np.ndarray:
    """Indices of the entries along axis 0 that hold the fill value: views of a chunk that was never
    written or was lost (no export writes the fill value; a chunk is all fill or none)."""
    if not len(x):
        return np.zeros(0, np.int64)
    first = x.reshape(len(x), -1)[:, 0]
    return np.flatnonzero(np.isnan(first) if isinstance(fill, float) and np.isnan(fill) else first == fill)


def chunk_key(name: str, spec: ArraySpec, chunk: int) -> str:
    """Chunk `chunk` of array `name` as a file under the cache (Zarr v3's default key encoding): views/c/3/0."""
    return f"{name}/c/{chunk}" + "/0" * (len(spec.shape) - 1)


def read_chunks(arr: zarr.Array, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray | ValueError]]:
    """[lo, hi) along axis 0 one chunk at a time: (chunk index, its data or the error reading it raised).
    What names the chunk that made a multi-chunk read fail, or that reads as holes."""
    step = arr.chunks[0]
    for start in range(lo - lo % step, hi, step):
        try:
            yield start // step, arr[max(start, lo):min(start + step, hi)]
        except ValueError as e:
            yield start // step, e


def why(e: ValueError) -> str:
    """What zarr's error on reading a chunk means, in a few words."""
    text = str(e)
    if "checksum" in text:
        return "fails its checksum"
    if "reshape" in text or "size" in text:
        return "has the wrong size"
    return f"cannot be decoded ({text})"


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _schema_error(path: Location, version: Any) -> CacheError:
    q = shlex.quote(str(path))
    if isinstance(version, int) and version < SCHEMA_VERSION:
        return CacheError(f"{path} was written by an older cbd-cache (schema {version}); re-export it: "
                          f"rm -r {q} && cbd-cache export (with the same --pipeline, --workdir and --set)")
    return CacheError(f"{path} has cache schema {version}, this cbd-cache reads schema {SCHEMA_VERSION}; "
                      "use the cbd-cache that wrote it")


class CacheWriter:
    """Creates the group (or reopens it to resume) and writes whole shards."""

    def __init__(self, path: Location, prov: dict[str, Any], layout: Layout, create: bool = True):
        """Open the cache at `path` for writing, creating it if absent (only when `create`: one writer creates)."""
        self.path = path
        self.prov = prov
        self.layout = layout
        attrs = None
        if exists(path):
            try:
                attrs = dict(zarr.open_group(store(path), mode="r").attrs)
            except (FileNotFoundError, ValueError):
                raise _no_group(path) from None
        if attrs is not None and "provenance" in attrs:
            version = attrs["provenance"].get("schema_version")
            if version != SCHEMA_VERSION:
                raise _schema_error(path, version)
            diff = _diff(attrs["provenance"], prov)
            if diff:
                raise CacheError(
                    f"{self.path} was exported for different {', '.join(diff)}; it cannot be resumed. "
                    f"Delete it (rm -r {shlex.quote(str(self.path))}) to export again, or use another --workdir")
            self.group = zarr.open_group(store(path), mode="r+")
        elif not create:
            raise CacheError(f"{self.path}: the cache was not created")
        elif attrs is not None and "tool_version" not in attrs:
            raise CacheError(f"{self.path} is a Zarr group, not a cbd-cache cache; choose another cache location")
        else:   # absent, or a creation that was cut short: (re)create it
            self.group = self._create()

    def _create(self) -> zarr.Group:
        p, layout = self.prov, self.layout
        group = zarr.open_group(store(self.path), mode="w", attributes={"tool_version": __version__})
        for name, spec in array_specs(p, layout).items():
            create_array(group, name, spec)
        group["view_count"][:] = layout.counts.astype(np.int32)
        group["view_offset"][:] = layout.offsets
        # provenance last: readers take the group for a cache only once its arrays exist
        group.attrs.update({"provenance": p,
                            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        return zarr.open_group(store(self.path), mode="r+")

    def done_shards(self) -> set[int]:
        return set(np.flatnonzero(read_whole(self.group, self.path, "shard_done")).tolist())

    def check_metadata(self) -> None:
        """Every array's metadata is the schema's (what resuming or finishing an export relies on)."""
        for name, problem in metadata_problems(self.group, array_specs(self.prov, self.layout)).items():
            raise damaged(self.path, name, problem)

    def check_chunks(self) -> None:
        """A finished cache holds every chunk: a count of the stored chunks, without reading one (a
        changed or cut chunk shows only when read: `cache verify`)."""
        for name, spec in array_specs(self.prov, self.layout).items():
            expected = -(-spec.shape[0] // spec.chunks[0]) if spec.shape[0] else 0
            stored = self.group[name].nchunks_initialized
            if stored < expected:
                raise damaged(self.path, name, f"{expected - stored} of its {expected} chunks are missing")

    def write_shard(self, index: int, views: np.ndarray, descriptors: dict[str, np.ndarray],
                    logits: dict[str, np.ndarray] | None = None) -> None:
        """Write shard `index`'s views (flat, image-major, as `Layout` packs them), then mark it done.

        The block is written whole, padding included, so every chunk it touches is written by this
        writer alone; a crash before the mark only costs a redo.
        """
        start, stop = (int(x) for x in self.layout.blocks[index])
        used = len(views)
        dtype = self.prov["dtype"]

        def padded(x: np.ndarray, as_dtype) -> np.ndarray:
            out = np.zeros((stop - start, *x.shape[1:]), dtype=as_dtype)
            out[:used] = x
            return out

        self.group["views"][start:stop] = padded(views, np.int32)
        for name, d in descriptors.items():
            if dtype == "int8":
                d, scale = quantize_int8(d)
                self.group[f"scales/{name}"][start:stop] = padded(scale, np.float16)
            self.group[f"descriptors/{name}"][start:stop] = padded(d, dtype)
        for name, z in (logits or {}).items():
            self.group[f"logits/{name}"][start:stop] = padded(z, logits_dtype(dtype))
        self.group["shard_done"][index] = 1


def store(path: Location) -> str:
    """What zarr opens: a local path, or an fsspec URL (zarr wraps it in an FsspecStore)."""
    return str(path)


def _no_group(path: Location) -> CacheError:
    return CacheError(f"{path} has no readable group metadata (zarr.json): it is not a cbd-cache cache, or that file "
                      f"was lost. If it is this pipeline's cache, delete it (rm -r {shlex.quote(str(path))}) and run "
                      "`cbd-cache export` again; otherwise choose another cache location")


def open_group(path: Location) -> zarr.Group:
    if not exists(path):
        raise CacheError(f"no cache at {path}; run `cbd-cache export` first")
    try:
        group = zarr.open_group(store(path), mode="r")
    except (FileNotFoundError, ValueError):     # GroupNotFoundError is both; a garbled zarr.json a ValueError
        raise _no_group(path) from None
    prov = dict(group.attrs).get("provenance")
    if not prov:
        raise CacheError(f"{path}: the cache's creation was cut short; run `cbd-cache export` to create it again")
    if prov.get("schema_version") != SCHEMA_VERSION:
        raise _schema_error(path, prov.get("schema_version"))
    return group


def damaged(path: Location, name: str, what: str, shard: int | None = None) -> CacheDamaged:
    where = f" (shard {shard})" if shard is not None else ""
    return CacheDamaged(f"{path}: {name}{where}: {what}; {REPAIR}")


def read_whole(group: zarr.Group, path: Location, name: str) -> np.ndarray:
    """A per-row or per-shard array, whole; damage raises CacheDamaged (a lost `shard_done` chunk reads
    0, "not done": export redoes that shard)."""
    try:
        x = group[name][:]
    except KeyError:
        raise damaged(path, name, "its metadata (zarr.json) is missing") from None
    except ValueError:
        arr = group[name]
        for c, x in read_chunks(arr, 0, arr.shape[0]):     # which chunk (one per shard for the done marks)
            if isinstance(x, ValueError):
                raise CacheDamaged(f"{join(path, f'{name}/c/{c}')} {why(x)}; {REPAIR}") from None
        raise
    if name in PER_ROW and len(holes(x, FILL[str(x.dtype)])):
        raise damaged(path, name, "its chunk is missing")
    return x


@dataclass(frozen=True)
class ViewBlock:
    """A run of rows' cached views, flat: row j's are [offset[j], offset[j] + count[j]) of each array."""

    views: np.ndarray            # (M, 5) int32
    targets: np.ndarray          # (M, sum d) float16/float32
    logits: np.ndarray | None    # (M, K*C) or None
    offset: np.ndarray           # (n,) int64
    count: np.ndarray            # (n,) int64, the views the reader serves (a prefix of those stored)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.views, self.targets, self.logits, self.offset, self.count) if a is not None)

    def every_view(self) -> np.ndarray:
        """Flat indices of every served view, row after row."""
        starts = np.repeat(self.offset - np.cumsum(self.count) + self.count, self.count)
        return starts + np.arange(int(self.count.sum()))


class CacheReader:
    """Serves rows' views and targets to the student, after checking the cache fits.

    Targets are the chosen teachers' descriptors concatenated in the order asked, each already
    L2-normalised at export. `views = V` serves each image the views an export with budget A = V
    (and the cache's allocation) would hold: a prefix of the stored ones, as view a never depends
    on the budget (on a "draws" cache this reads the labels once). An int8 cache is dequantised
    here, to float16, so the student never sees the storage format.
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
        for name, problem in metadata_problems(group, row_specs(prov)).items():
            raise damaged(path, name, problem)
        self.layout = make_layout(prov["shards"], read_whole(group, path, "view_count"), prov["chunk_views"])
        self.specs = array_specs(prov, self.layout)
        used = ["views", *(f"{a}/{t}" for t in teachers if t in prov["teachers"] for a in
                           ("descriptors", "scales", *(["logits"] if with_logits else [])))]
        for name, problem in metadata_problems(group, {k: self.specs[k] for k in used if k in self.specs}).items():
            raise damaged(path, name, problem)
        done = read_whole(group, path, "shard_done")
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
            raise CacheError(f"{self.path} holds a budget of {prov['views_per_image']} views per image "
                             f"({prov['allocation']} allocation), {views} were asked for")
        self.group = group
        self.prov = prov
        self.teachers = list(teachers)
        self.views = views or prov["views_per_image"]
        self.with_logits = with_logits
        self.dims = [prov["teachers"][t]["descriptor_dim"] for t in teachers]
        self.counts = self.layout.counts
        if self.views != prov["views_per_image"]:
            self.counts = np.minimum(self.counts, cache_counts(manifest, self.views, prov["allocation"],
                                                               prov["min_views"]))
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        """An array of the group, opened once: each `group[name]` re-reads and parses its zarr.json."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def target_dim(self) -> int:
        return sum(self.dims)

    def read(self, start: int, stop: int) -> ViewBlock:
        """Rows [start, stop) (a shard, or several in a row): each array one contiguous slice, no per-sample reads."""
        lo = int(self.layout.offsets[start])
        hi = int(self.layout.offsets[stop - 1] + self.layout.counts[stop - 1])
        views = self.read_array("views", lo, hi)
        parts = [self.descriptors(t, lo, hi) for t in self.teachers]
        targets = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        logits = None
        if self.with_logits:
            zs = [self.read_array(f"logits/{t}", lo, hi) for t in self.teachers]
            logits = np.concatenate(zs, axis=-1) if len(zs) > 1 else zs[0]
        return ViewBlock(views, targets, logits, self.layout.offsets[start:stop] - lo, self.counts[start:stop])

    def descriptors(self, teacher: str, lo: int, hi: int) -> np.ndarray:
        """One teacher's descriptors of flat views [lo, hi): float16/float32 as stored, int8 dequantised."""
        d = self.read_array(f"descriptors/{teacher}", lo, hi)
        if self.prov["dtype"] != "int8":
            return d
        return dequantize_int8(d, self.read_array(f"scales/{teacher}", lo, hi), np.float16)

    def read_array(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Flat views [lo, hi) of one array; a chunk that fails its check, or is missing, raises CacheDamaged."""
        cv = self.layout.chunk_views

        def chunk_damaged(chunk: int, what: str) -> CacheDamaged:
            shard = int(np.searchsorted(self.layout.blocks[:, 1], chunk * cv, side="right"))
            return CacheDamaged(f"{join(self.path, chunk_key(name, self.specs[name], chunk))} (shard {shard}) "
                                f"{what}; {REPAIR}")

        try:
            x = self.array(name)[lo:hi]
        except ValueError:
            for c, part in read_chunks(self.array(name), lo, hi):     # which chunk
                if isinstance(part, ValueError):
                    raise chunk_damaged(c, why(part)) from None
            raise
        bad = holes(x, self.specs[name].fill)
        if len(bad):
            raise chunk_damaged((lo + int(bad[0])) // cv, "is missing")
        return x


def cache_info(path: Location) -> dict[str, Any]:
    """Arrays, shapes, dtypes, chunking, provenance, allocation, completeness and bytes on disk."""
    group = open_group(path)
    prov = dict(group.attrs)["provenance"]
    arrays = {}
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        arrays[name] = _array_info(arr)
    for sub in ("descriptors", "scales", "logits"):
        if sub in group:
            for name, arr in sorted(group[sub].arrays(), key=lambda kv: kv[0]):
                arrays[f"{sub}/{name}"] = _array_info(arr)
    done = read_whole(group, path, "shard_done")
    counts = read_whole(group, path, "view_count")
    bytes_on_disk = bytes_under(path)
    return {
        "path": str(path),
        "schema_version": prov["schema_version"],
        "manifest_fingerprint": prov["manifest_fingerprint"],
        "complete": bool(done.all()),
        "shards_done": int(done.sum()),
        "shards_total": int(len(done)),
        "views_per_image": prov["views_per_image"],
        "allocation": prov["allocation"],
        "min_views": prov["min_views"],
        "views_stored": prov["views_stored"],
        "views_total": prov["views_total"],
        "views_min_max": [int(counts.min()), int(counts.max())] if len(counts) else [0, 0],
        "chunk_views": prov["chunk_views"],
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
