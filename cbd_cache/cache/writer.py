"""Writing a cache: create the group (or reopen it to resume), then whole shards, each marked done after its rows."""
from __future__ import annotations

import datetime
import shlex
from typing import Any

import numpy as np
import zarr

from cbd_cache import __version__
from cbd_cache.cache.codec import logits_dtype, quantize_int8
from cbd_cache.cache.schema import SCHEMA_VERSION, Layout, array_specs
from cbd_cache.cache.store import (
    _diff,
    _no_group,
    _schema_error,
    create_array,
    damaged,
    metadata_problems,
    read_whole,
    store,
)
from cbd_cache.errors import CacheError
from cbd_cache.system.storage import Location, exists


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
