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
