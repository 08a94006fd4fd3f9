"""Opening a cache and reading its arrays so that damage is never read as data.

Every read goes chunk by chunk when a read fails, to name the chunk; a fill value where a stored
value belongs is a missing chunk. Damage raises `CacheDamaged` naming the array, the shard and
`cbd-cache export --repair`.
"""
from __future__ import annotations

import shlex
from typing import Any, Iterator

import numpy as np
import zarr

from cbd_cache.cache.schema import FILL, PER_ROW, SCHEMA_VERSION, ArraySpec
from cbd_cache.errors import CacheDamaged, CacheError
from cbd_cache.system.storage import Location, exists, join

REPAIR = "run `cbd-cache export --repair` (same --pipeline, --workdir and --set) to rewrite what is damaged"


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


def store(path: Location) -> str:
    """What zarr opens: a local path, or an fsspec URL (zarr wraps it in an FsspecStore)."""
    return str(path)


def _no_group(path: Location) -> CacheError:
    return CacheError(f"{path} has no readable group metadata (zarr.json): it is not a cbd-cache cache, or that file "
                      "was lost. If it is this pipeline's cache, `cbd-cache export --repair` writes it again (or delete "
                      f"it, rm -r {shlex.quote(str(path))}, and run `cbd-cache export`); otherwise choose another cache "
                      "location")


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
