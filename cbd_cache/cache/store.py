"""Opening a cache and reading its arrays so that damage is never read as data.

Every read goes chunk by chunk when a read fails, to name the chunk; a fill value where a stored
value belongs is a missing chunk. Damage raises `CacheDamaged` naming the array, the shard and
`cbd-cache export --repair`. The provenance of the cache and of each teacher group is checked
against its fingerprint whenever it is opened.
"""
from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import zarr

from cbd_cache.cache.schema import FILL, PER_ROW, SCHEMA_VERSION, TEACHERS, ArraySpec, fingerprint
from cbd_cache.errors import CacheDamaged, CacheError, FileDamaged
from cbd_cache.system.storage import Location, exists, is_url, join

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


def diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def re_export(path: Location) -> str:
    """The shell command that exports a cache again from scratch, with the path quoted for the shell."""
    return f"rm -r {shlex.quote(str(path))} && cbd-cache export (with the same --pipeline, --workdir and --set)"


def schema_error(path: Location, version: Any) -> CacheError:
    if isinstance(version, int) and version < SCHEMA_VERSION:
        return CacheError(f"{path} was written by an older cbd-cache (schema {version}); re-export it: {re_export(path)}")
    return CacheError(f"{path} has cache schema {version}, this cbd-cache reads schema {SCHEMA_VERSION}; "
                      "use the cbd-cache that wrote it")


def store(path: Location) -> str:
    """What zarr opens: a local path, or an fsspec URL (zarr wraps it in an FsspecStore)."""
    return str(path)


def no_group(path: Location) -> CacheError:
    return CacheError(f"{path} has no readable group metadata (zarr.json): it is not a cbd-cache cache, or that file "
                      "was lost. If it is this pipeline's cache, `cbd-cache export --repair` writes it again (or delete "
                      f"it, rm -r {shlex.quote(str(path))}, and run `cbd-cache export`); otherwise choose another cache "
                      "location")


def open_group(path: Location) -> zarr.Group:
    """The cache's root group, once its provenance is this schema's and matches its fingerprint."""
    if not exists(path):
        raise CacheError(f"no cache at {path}; run `cbd-cache export` first")
    try:
        group = zarr.open_group(store(path), mode="r")
    except (FileNotFoundError, ValueError):     # GroupNotFoundError is both; a garbled zarr.json a ValueError
        raise no_group(path) from None
    prov = dict(group.attrs).get("provenance")
    if not prov:
        raise CacheError(f"{path}: the cache's creation was cut short; run `cbd-cache export` to create it again")
    check_provenance(path, prov)
    return group


def check_provenance(path: Location, prov: dict[str, Any]) -> None:
    """The root provenance is this schema's and is what export wrote (its fingerprint recomputed)."""
    if prov.get("schema_version") != SCHEMA_VERSION:
        raise schema_error(path, prov.get("schema_version"))
    if prov.get("fingerprint") != fingerprint(prov):
        raise FileDamaged(f"{join(path, 'zarr.json')}: the cache's provenance does not match its fingerprint (edited "
                          "by hand?); put the file back as export wrote it, or export the cache again: "
                          f"{re_export(path)}")


def provenance_of(group: zarr.Group) -> dict[str, Any]:
    return dict(group.attrs)["provenance"]


def teacher_folders(path: Location) -> list[str]:
    """The folders under teachers/, whether or not they hold a teacher group (a lost or unwritten zarr.json)."""
    folder = join(path, TEACHERS)
    if not is_url(path):
        return sorted(p.name for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []
    fs, root = fsspec.core.url_to_fs(str(folder))
    if not fs.exists(root):
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True) if e["type"] == "directory")


def teacher_record(group: zarr.Group, path: Location, name: str) -> dict[str, Any] | None:
    """Teacher `name`'s provenance, checked against its fingerprint; None when the cache holds no such
    group, or one whose creation was cut short or whose group metadata was lost."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # zarr warns of folders without metadata
            sub = group[f"{TEACHERS}/{name}"]
    except (KeyError, FileNotFoundError, ValueError):
        return None
    record = dict(sub.attrs).get("teacher") if isinstance(sub, zarr.Group) else None
    if record is None:
        return None
    if record.get("fingerprint") != fingerprint(record) or record.get("name") != name:
        raise FileDamaged(f"{join(path, f'{TEACHERS}/{name}/zarr.json')}: teacher {name}'s provenance does not match "
                          "its fingerprint (edited by hand?); put the file back as export wrote it, or export that "
                          f"group again: cbd-cache export --replace {name} (with the same --pipeline, --workdir and --set)")
    return record


def teacher_records(group: zarr.Group, path: Location) -> dict[str, dict[str, Any]]:
    """Every teacher group of the cache that holds its provenance, by name."""
    records = {name: teacher_record(group, path, name) for name in teacher_folders(path)}
    return {name: r for name, r in records.items() if r is not None}


def group_attrs(group: zarr.Group, name: str) -> dict[str, Any]:
    """A teacher group's attributes (created and finished times beside its record)."""
    return dict(group[f"{TEACHERS}/{name}"].attrs)


def damaged(path: Location, name: str, what: str, shard: int | None = None) -> CacheDamaged:
    where = f" (shard {shard})" if shard is not None else ""
    return CacheDamaged(f"{path}: {name}{where}: {what}; {REPAIR}")


def read_whole(group: zarr.Group, path: Location, name: str) -> np.ndarray:
    """A per-row or per-shard array, whole; damage raises CacheDamaged (a lost done-mark chunk reads
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
