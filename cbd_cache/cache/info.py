"""`cbd-cache cache info`: arrays, shapes, dtypes, chunking, provenance, completeness and bytes."""
from __future__ import annotations

from typing import Any

import zarr

from cbd_cache.cache.store import open_group, read_whole
from cbd_cache.system.storage import Location, bytes_under


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


def info_text(d: dict[str, Any]) -> str:
    """What `cache info` prints: completeness and size, the allocation, every array, every teacher."""
    lo, hi = d["views_min_max"]
    lines = [f"{d['path']}: schema {d['schema_version']}, {'complete' if d['complete'] else 'INCOMPLETE'} "
             f"({d['shards_done']}/{d['shards_total']} shards), {d['bytes_on_disk'] / 2**20:.1f} MiB on disk",
             f"manifest fingerprint {d['manifest_fingerprint']}, view seed {d['view_seed']}; {d['allocation']} "
             f"allocation of A = {d['views_per_image']}: {lo}..{hi} views per image, {d['views_stored']} stored "
             f"({d['views_total']} with chunk padding, chunks of {d['chunk_views']} views)"]
    lines += [f"  {name:<28} {str(a['shape']):<20} {a['dtype']:<8} chunks {a['chunks']}  "
              f"{a['bytes_stored'] / 2**20:.2f} MiB" for name, a in d["arrays"].items()]
    lines += [f"  teacher {name}: {t['type']} {t['arch']} seed {t['seed']} sha256 {t['checkpoint_sha256'][:12]}"
              for name, t in d["teachers"].items()]
    return "\n".join(lines)
