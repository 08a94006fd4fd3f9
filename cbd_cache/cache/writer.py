"""Writing a cache: create the shared group (or reopen it), add, replace or drop teacher groups, then
write whole shards, each marked done after its rows.

Exports of different teachers may write one cache at once (`pipeline.export` holds one lock per
teacher group). What they share is written under a lock held for moments (`shared`): the creation of
the group, and each shard's views, which the first export to reach a shard writes and every later
one checks against its own.
"""
from __future__ import annotations

import datetime
import shlex
import shutil
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import fsspec
import numpy as np
import zarr

from cbd_cache import __version__
from cbd_cache.cache.codec import logits_dtype, quantize_int8
from cbd_cache.cache.schema import (
    TEACHER_DONE,
    TEACHERS,
    VIEWS_DONE,
    Layout,
    sealed,
    shared_specs,
    teacher_array,
    teacher_specs,
)
from cbd_cache.cache.store import (
    check_provenance,
    create_array,
    damaged,
    diff_keys,
    metadata_problems,
    no_group,
    read_whole,
    store,
    teacher_record,
)
from cbd_cache.errors import CacheError
from cbd_cache.system.locks import hold
from cbd_cache.system.storage import Location, exists, is_url, join
from cbd_cache.workdir import cache_lock


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def shared_lock(path: Location) -> ContextManager:
    """The lock of the cache's shared arrays, waited for (held for moments); none for a cache at a URL."""
    return nullcontext() if is_url(path) else hold(cache_lock(Path(path), "shared"), f"{path} (shared arrays)", wait=True)


class CacheWriter:
    """Creates the group (or reopens it to resume or add teachers), manages teacher groups, writes whole shards."""

    def __init__(self, path: Location, prov: dict[str, Any], layout: Layout, create: bool = True):
        """Open the cache at `path` for writing, creating it if absent (only when `create`: one writer creates)."""
        self.path = path
        self.prov = prov
        self.layout = layout
        self.records: dict[str, dict[str, Any]] = {}     # the teacher groups this writer writes, by name
        self._arrays: dict[str, zarr.Array] = {}
        with shared_lock(path):      # two exports that find no cache: one creates it, the other opens it
            attrs = None
            if exists(path):
                try:
                    attrs = dict(zarr.open_group(store(path), mode="r").attrs)
                except (FileNotFoundError, ValueError):
                    raise no_group(path) from None
            if attrs is not None and "provenance" in attrs:
                check_provenance(path, attrs["provenance"])
                diff = diff_keys(attrs["provenance"], prov)
                if diff:
                    raise CacheError(
                        f"{self.path} was exported for different {', '.join(k for k in diff if k != 'fingerprint')}; "
                        f"it cannot be resumed or extended. Delete it (rm -r {shlex.quote(str(self.path))}) to export again, "
                        "or use another --workdir")
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
        for name, spec in shared_specs(p, layout).items():
            create_array(group, name, spec)
        group.require_group(TEACHERS)
        group["view_count"][:] = layout.counts.astype(np.int32)
        group["view_offset"][:] = layout.offsets
        # provenance last: readers take the group for a cache only once its arrays exist
        group.attrs.update({"provenance": p, "created_utc": now_utc()})
        return zarr.open_group(store(self.path), mode="r+")

    # ------------------------------------------------------------------------------------ teacher groups
    def stored_record(self, name: str) -> dict[str, Any] | None:
        return teacher_record(self.group, self.path, name)

    def add_teacher(self, record: dict[str, Any]) -> None:
        """Create teacher `record["name"]`'s group, empty, over whatever a cut-short creation or drop left
        there: its arrays, then its provenance last (a group without it is not a teacher yet)."""
        name = record["name"]
        remove_group(self.path, name)
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(f"{TEACHERS}/{name}/")}
        for array, spec in teacher_specs(self.prov, self.layout, name, record["descriptor_dim"]).items():
            create_array(self.group, array, spec)
        self.group[f"{TEACHERS}/{name}"].attrs.update({"teacher": sealed(record), "created_utc": now_utc()})
        self.records[name] = self.stored_record(name)

    def open_teacher(self, name: str) -> None:
        """Write into teacher `name`'s existing group (created by this export's rank 0, or an earlier export)."""
        record = self.stored_record(name)
        if record is None:
            raise CacheError(f"{self.path}: teacher {name}'s group was not created")
        self.records[name] = record

    def finish_teacher(self, name: str) -> None:
        """Record when the teacher's last shard was written (once)."""
        attrs = self.group[f"{TEACHERS}/{name}"].attrs
        if "finished_utc" not in attrs:
            attrs.update({"finished_utc": now_utc()})

    # ------------------------------------------------------------------------------------ done-marks
    def views_done(self) -> np.ndarray:
        return read_whole(self.group, self.path, VIEWS_DONE).astype(bool)

    def teacher_done(self, name: str) -> np.ndarray:
        return read_whole(self.group, self.path, teacher_array(name, TEACHER_DONE)).astype(bool)

    def specs(self) -> dict:
        specs = shared_specs(self.prov, self.layout)
        for name, record in self.records.items():
            specs.update(teacher_specs(self.prov, self.layout, name, record["descriptor_dim"]))
        return specs

    def check_metadata(self) -> None:
        """Every array's metadata is the schema's (what resuming or finishing an export relies on)."""
        for name, problem in metadata_problems(self.group, self.specs()).items():
            raise damaged(self.path, name, problem)

    def check_chunks(self) -> None:
        """A finished part holds every chunk: a count of the stored chunks, without reading one (a
        changed or cut chunk shows only when read: `cache verify`). Parts still being written are skipped."""
        finished = {VIEWS_DONE: self.views_done().all(),
                    **{teacher_array(n, TEACHER_DONE): self.teacher_done(n).all() for n in self.records}}
        for name, spec in self.specs().items():
            part = teacher_array(name.split("/")[1], TEACHER_DONE) if name.startswith(TEACHERS) else VIEWS_DONE
            if not finished[part] or name == part:
                continue
            expected = -(-spec.shape[0] // spec.chunks[0]) if spec.shape[0] else 0
            stored = self.group[name].nchunks_initialized
            if stored < expected:
                raise damaged(self.path, name, f"{expected - stored} of its {expected} chunks are missing")

    # ------------------------------------------------------------------------------------ shards
    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _padded(self, index: int, x: np.ndarray, dtype) -> tuple[slice, np.ndarray]:
        start, stop = (int(v) for v in self.layout.blocks[index])
        out = np.zeros((stop - start, *x.shape[1:]), dtype=dtype)
        out[:len(x)] = x
        return slice(start, stop), out

    def write_views(self, index: int, views: np.ndarray) -> None:
        """Shard `index`'s views, unless another export wrote them first: then they must be these."""
        with shared_lock(self.path):
            done = read_whole(self.group, self.path, VIEWS_DONE)
            if done[index]:
                start = int(self.layout.blocks[index][0])
                stored = self.array("views")[start:start + len(views)]
                if not np.array_equal(stored, views):
                    raise CacheError(f"{self.path}: the views stored for shard {index} are not the ones this export "
                                     "derives from the data and the view seed; run `cbd-cache cache verify`")
                return
            where, block = self._padded(index, views, np.int32)
            self.array("views")[where] = block
            self.array(VIEWS_DONE)[index] = 1

    def write_teacher(self, index: int, name: str, descriptors: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Shard `index` of one teacher's arrays, whole chunks, padding included (so every chunk it touches is
        written by this writer alone), then its done-mark: a crash before the mark only costs a redo."""
        dtype = self.prov["dtype"]
        parts = {}
        if dtype == "int8":
            descriptors, parts["scales"] = quantize_int8(descriptors)
        parts["descriptors"] = descriptors
        if logits is not None:
            parts["logits"] = logits
        kinds = {"descriptors": dtype, "scales": np.float16, "logits": logits_dtype(dtype)}
        for kind in ("scales", "descriptors", "logits"):
            if kind in parts:
                where, block = self._padded(index, parts[kind], kinds[kind])
                self.array(teacher_array(name, kind))[where] = block
        self.array(teacher_array(name, TEACHER_DONE))[index] = 1

    def write_shard(self, index: int, views: np.ndarray, descriptors: dict[str, np.ndarray],
                    logits: dict[str, np.ndarray] | None = None) -> None:
        """Shard `index`: its views (flat, image-major, as `Layout` packs them), then each teacher's arrays."""
        self.write_views(index, views)
        for name, d in descriptors.items():
            self.write_teacher(index, name, d, (logits or {}).get(name))


def remove_group(path: Location, name: str) -> bool:
    """Remove teacher `name`'s folder, atomically as readers see it: a local folder is first renamed out
    of the cache (then deleted); at a URL its group metadata goes first. True if there was one."""
    folder = join(path, f"{TEACHERS}/{name}")
    if not exists(folder):
        return False
    if is_url(path):
        fs, root = fsspec.core.url_to_fs(str(folder))
        if fs.exists(f"{root}/zarr.json"):
            fs.rm(f"{root}/zarr.json")
        fs.rm(root, recursive=True)
        return True
    trash = Path(path).with_name(f"{Path(path).name}.dropped-{name}-{uuid.uuid4().hex[:8]}")
    Path(folder).rename(trash)
    shutil.rmtree(trash, ignore_errors=True)    # (a later export clears what a killed drop leaves: clear_trash)
    return True


def clear_trash(path: Location) -> None:
    """Folders a drop renamed out of the cache but was stopped before deleting."""
    if not is_url(path):
        for trash in Path(path).parent.glob(f"{Path(path).name}.dropped-*"):
            shutil.rmtree(trash, ignore_errors=True)


