"""`cbd-cache cache info`: arrays, shapes, dtypes, chunking, provenance, completeness and bytes, and each
teacher group's state: complete, partial, stale (its checkpoint changed since), or without provenance."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import zarr

from cbd_cache.cache.schema import TEACHER_DONE, TEACHERS, VIEWS_DONE, teacher_array
from cbd_cache.cache.store import (
    group_attrs,
    open_group,
    provenance_of,
    read_whole,
    teacher_folders,
    teacher_record,
)
from cbd_cache.errors import CacheDamaged, FileDamaged
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.storage import Location, bytes_under, join


def cache_info(path: Location, checkpoint: Callable[[str], Path] | None = None,
               expected: Sequence[str] = ()) -> dict[str, Any]:
    """Arrays, shapes, dtypes, chunking, provenance, allocation, completeness and bytes on disk; each teacher
    group's record, bytes and state (`checkpoint(name)`: where its checkpoint would be, to tell a stale one);
    `missing`: the `expected` teachers the cache lacks."""
    group = open_group(path)
    prov = provenance_of(group)
    arrays: dict[str, dict[str, Any]] = {}
    _walk(group, "", arrays)
    done = read_whole(group, path, VIEWS_DONE)
    counts = read_whole(group, path, "view_count")
    teachers = {name: teacher_info(group, path, name, checkpoint) for name in teacher_folders(path)}
    return {
        "path": str(path),
        "schema_version": prov["schema_version"],
        "fingerprint": prov["fingerprint"],
        "manifest_fingerprint": prov["manifest_fingerprint"],
        "complete": bool(done.all()) and all(t["state"] in ("complete", "stale") for t in teachers.values()),
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
        "logits": prov["logits"],
        "teachers": teachers,
        "missing": [n for n in expected if n not in teachers],
        "arrays": arrays,
        "bytes_on_disk": bytes_under(path),
        "tool_version": dict(group.attrs).get("tool_version"),
        "created_utc": dict(group.attrs).get("created_utc"),
    }


def teacher_info(group: zarr.Group, path: Location, name: str,
                 checkpoint: Callable[[str], Path] | None = None) -> dict[str, Any]:
    """One teacher group: its provenance, bytes, shards done and state."""
    size = bytes_under(join(path, f"{TEACHERS}/{name}"))
    try:
        record = teacher_record(group, path, name)
    except FileDamaged as e:
        return {"state": "edited", "bytes_on_disk": size, "problem": str(e)}
    if record is None:
        return {"state": "no provenance", "bytes_on_disk": size,
                "problem": "an export of it was cut short, or its group metadata was lost; `cbd-cache export` "
                           "writes it again"}
    try:
        done = read_whole(group, path, teacher_array(name, TEACHER_DONE))
    except CacheDamaged as e:
        return {**record, "state": "partial", "bytes_on_disk": size, "problem": str(e)}
    attrs = group_attrs(group, name)
    ckpt = checkpoint(name) if checkpoint else None
    stale = ckpt is not None and ckpt.is_file() and file_sha256(ckpt) != record["checkpoint_sha256"]
    state = "stale" if stale else ("complete" if done.all() else "partial")
    return {**record, "state": state, "shards_done": int(done.sum()), "bytes_on_disk": size,
            "created_utc": attrs.get("created_utc"), "finished_utc": attrs.get("finished_utc")}


def _walk(group: zarr.Group, prefix: str, out: dict[str, dict[str, Any]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # zarr warns of folders without metadata (teacher_info names them)
        members = sorted(group.members(), key=lambda kv: kv[0])
    for name, member in members:
        if isinstance(member, zarr.Array):
            out[prefix + name] = _array_info(member)
        else:
            _walk(member, f"{prefix}{name}/", out)


def _array_info(arr: zarr.Array) -> dict[str, Any]:
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "bytes_stored": int(arr.nbytes_stored())}


def teacher_line(name: str, t: dict[str, Any], shards: int) -> str:
    mib = f"{t['bytes_on_disk'] / 2**20:.2f} MiB"
    if "arch" not in t:
        return f"  teacher {name}: {t['state'].upper()}, {mib}: {t['problem']}"
    state = {"complete": "complete", "partial": f"PARTIAL ({t.get('shards_done', '?')}/{shards} shards; "
                                                "`cbd-cache export` finishes it)",
             "stale": f"STALE (its checkpoint changed since; `cbd-cache export --replace {name}` rewrites it)"}
    when = f", exported {t['finished_utc']}" if t.get("finished_utc") else ""
    return (f"  teacher {name}: {state[t['state']]}, {mib}; {t['type']} {t['arch']} seed {t['seed']}, "
            f"d = {t['descriptor_dim']}, checkpoint sha256 {t['checkpoint_sha256'][:12]}{when}")


def info_text(d: dict[str, Any]) -> str:
    """What `cache info` prints: completeness and size, the allocation, every array, every teacher."""
    lo, hi = d["views_min_max"]
    lines = [f"{d['path']}: schema {d['schema_version']}, {'complete' if d['complete'] else 'INCOMPLETE'} "
             f"(views: {d['shards_done']}/{d['shards_total']} shards), {d['bytes_on_disk'] / 2**20:.1f} MiB on disk",
             f"manifest fingerprint {d['manifest_fingerprint']}, view seed {d['view_seed']}; {d['allocation']} "
             f"allocation of A = {d['views_per_image']}: {lo}..{hi} views per image, {d['views_stored']} stored "
             f"({d['views_total']} with chunk padding, chunks of {d['chunk_views']} views), {d['dtype']}"
             + (", with logits" if d["logits"] else "")]
    lines += [f"  {name:<28} {str(a['shape']):<20} {a['dtype']:<8} chunks {a['chunks']}  "
              f"{a['bytes_stored'] / 2**20:.2f} MiB" for name, a in d["arrays"].items()]
    lines += [teacher_line(name, t, d["shards_total"]) for name, t in d["teachers"].items()]
    lines += [f"  teacher {name}: ABSENT (in the pipeline, not in the cache; `cbd-cache export` adds it)"
              for name in d["missing"]]
    return "\n".join(lines)
