"""A cache's damage, found without a teacher: what `cache verify` reports and `export --repair` rewrites.

Every chunk of every array is read once. A chunk is damaged when it fails its CRC32C or its size
(bytes flipped, cut short or rewritten) or reads as the fill value (missing: `cache.FILL` is a
value no export writes); an array when its metadata is missing or is not the schema's; a per-row
array when it differs from the layout. Damage is named by array and shard, the unit that export
rewrites: a damaged views chunk unmarks that shard's views, a damaged teacher chunk that shard of
that teacher alone.
"""
from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zarr

from cbd_cache import __version__
from cbd_cache.cache.schema import (
    PER_ROW,
    TEACHERS,
    VIEWS_DONE,
    ArraySpec,
    Layout,
    array_specs,
    done_array,
    shared_specs,
)
from cbd_cache.cache.store import create_array, holes, metadata_problems, read_chunks, store, why
from cbd_cache.errors import CacheError
from cbd_cache.system.logs import Progress
from cbd_cache.system.storage import Location, exists, join, remove

Inspect = Callable[[str, int, np.ndarray], None]    # (array, shard, the shard's stored views) of each sound block


@dataclass(frozen=True)
class Damage:
    array: str
    shard: int | None      # None: the array as a whole (its metadata, or a per-row array)
    what: str

    def __str__(self) -> str:
        return f"{self.array}{'' if self.shard is None else f' (shard {self.shard})'}: {self.what}"


@dataclass(frozen=True)
class Scan:
    damage: list[Damage]
    done: dict[str, np.ndarray]    # each set of done-marks (views_done, teachers/<name>/shard_done): (S,) bool,
                                   # all True when the marks' metadata is lost

    def sound(self, part: str) -> np.ndarray:
        """Shards of one part (its done-marks' name) marked done with no damaged chunk in that part (none
        while an array of the part, or a shared one, is damaged as a whole)."""
        if any(d.shard is None and done_array(d.array) in (part, VIEWS) for d in self.damage):
            return np.zeros_like(self.done[part])
        ok = self.done[part].copy()
        ok[[d.shard for d in self.damage if d.shard is not None and done_array(d.array) == part]] = False
        return ok

    def incomplete(self) -> dict[str, int]:
        """Each part with shards not marked done: how many are."""
        return {part: int((~d).sum()) for part, d in self.done.items() if not d.all()}


VIEWS = done_array("views")


def scan_cache(group: zarr.Group, prov: dict[str, Any], layout: Layout, teachers: dict[str, dict[str, Any]],
               inspect: Inspect | None = None) -> Scan:
    """Every damaged array and (array, shard) of the shared arrays and the `teachers`' groups, in array
    order; `inspect` sees every sound block of a finished shard (its stored views only, no padding)."""
    specs = array_specs(prov, layout, teachers)
    damage = [Damage(name, None, what) for name, what in metadata_problems(group, specs).items()]
    groups = [TEACHERS, *(f"{TEACHERS}/{t}" for t in teachers)]
    damage += [Damage(g, None, "its group metadata (zarr.json) is missing") for g in groups if g not in group]
    broken = {d.array for d in damage}
    expected = {"view_count": layout.counts, "view_offset": layout.offsets}
    for name in PER_ROW:
        if name not in broken and (what := _per_row(group[name], specs[name], expected[name])):
            damage.append(Damage(name, None, what))
    parts = sorted({done_array(name) for name in specs if name not in PER_ROW})
    done = {part: np.ones(len(layout.blocks), bool) if part in broken else _shard_done(group[part], part, damage)
            for part in parts}
    arrays = {name: group[name] for name in specs
              if name not in (*PER_ROW, *parts) and name not in broken}
    shards = prov["shards"]
    progress = Progress("cache scan", len(shards), unit="shard")
    for s, (start, stop) in enumerate(layout.blocks.tolist()):
        rows = shards[s]
        used = int(layout.offsets[rows[1] - 1] + layout.counts[rows[1] - 1]) - start if rows[1] > rows[0] else 0
        for name, arr in arrays.items():
            if done[done_array(name)][s]:
                block, whats = _read_block(arr, specs[name], start, stop, layout.chunk_views)
                if whats:
                    damage.append(Damage(name, s, "; ".join(whats)))
                elif inspect is not None:
                    inspect(name, s, block[:used])
        progress.update(1)
    return Scan(damage, done)


def shards_to_rewrite(damage: list[Damage]) -> dict[str, list[int]]:
    """The shards a repair rewrites, by part (its done-marks)."""
    out: dict[str, set[int]] = {}
    for d in damage:
        if d.shard is not None:
            out.setdefault(done_array(d.array), set()).add(d.shard)
    return {part: sorted(s) for part, s in sorted(out.items())}


def _per_row(arr: zarr.Array, spec: ArraySpec, expected: np.ndarray) -> str | None:
    try:
        x = arr[:]
    except ValueError as e:
        return f"its chunk {why(e)}"
    if len(holes(x, spec.fill)):
        return "its chunk is missing"
    if not np.array_equal(x, expected):
        return "differs from the layout of the data's view allocation"
    return None


def _shard_done(arr: zarr.Array, name: str, damage: list[Damage]) -> np.ndarray:
    """Each shard's done mark; a mark whose chunk fails its check is damage (its shard is rewritten)."""
    try:
        return arr[:].astype(bool)
    except ValueError:
        done = np.zeros(arr.shape[0], bool)
        for s in range(arr.shape[0]):
            try:
                done[s] = bool(arr[s])
            except ValueError as e:
                damage.append(Damage(name, s, f"its chunk {why(e)}"))
        return done


def _read_block(arr: zarr.Array, spec: ArraySpec, start: int, stop: int, chunk_views: int
                ) -> tuple[np.ndarray | None, list[str]]:
    """A shard's block [start, stop) (chunk-aligned), and what is wrong with its chunks (empty: sound).

    Every chunk of a block begins with a stored view, so a chunk is missing exactly when its first
    row reads as the fill value.
    """
    try:
        block = arr[start:stop]
    except ValueError:
        block = None
    if block is not None:
        return block, _chunks_missing([start // chunk_views + int(i) for i in holes(block[::chunk_views], spec.fill)])
    failed, missing = [], []
    for c, x in read_chunks(arr, start, stop):     # name the chunks that fail
        if isinstance(x, ValueError):
            failed.append(f"chunk {c} {why(x)}")
        elif len(holes(x[:1], spec.fill)):
            missing.append(c)
    return None, failed + _chunks_missing(missing)


def _chunks_missing(chunks: list[int]) -> list[str]:
    if not chunks:
        return []
    return [f"chunk {chunks[0]} is missing" if len(chunks) == 1 else
            f"chunks {', '.join(map(str, chunks))} are missing"]


def restore_root(path: Location, prov: dict[str, Any], layout: Layout) -> bool:
    """Write a lost or garbled root `zarr.json` (the group's metadata and provenance) again, from the provenance the
    pipeline gives, when the cache's arrays are the ones it gives: `views`, `view_count`, `view_offset` and
    `views_done` with the schema's metadata, and `view_count` the layout's (the data, budget and allocation
    agree). True when it wrote it; CacheError when the arrays belong to other settings. The creation time
    (`created_utc`) becomes the repair's; `cache verify` then checks the descriptors against
    the teachers. The teacher groups keep their own metadata and provenance."""
    root = join(path, "zarr.json")
    if not exists(path):
        return False
    if exists(root):
        try:
            zarr.open_group(store(path), mode="r")
            return False
        except (FileNotFoundError, ValueError):     # garbled: written again below
            pass
    specs = shared_specs(prov, layout)
    problems = {}
    for name in ("views", *PER_ROW, VIEWS_DONE):
        try:
            arr = zarr.open_array(store=store(path), path=name, mode="r")
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            problems[name] = "missing or unreadable"
            continue
        want = specs[name]
        if (tuple(arr.shape), tuple(arr.chunks), str(arr.dtype)) != (want.shape, want.chunks, want.dtype):
            problems[name] = f"{arr.shape} {arr.dtype} where the pipeline gives {want.shape} {want.dtype}"
        elif name == "view_count" and _differs(arr, want, layout.counts):
            problems[name] = "another view allocation than the pipeline's"
    if problems:
        raise CacheError(f"{path} has lost its group metadata (zarr.json), and its arrays are not the ones this "
                         f"pipeline's settings give ({'; '.join(f'{k}: {v}' for k, v in problems.items())}): repair it "
                         f"with the settings it was exported with, or delete it (rm -r {shlex.quote(str(path))}) "
                         "and run `cbd-cache export`")
    attrs = {"tool_version": __version__, "provenance": prov,
             "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if exists(root):
        remove(root)
    zarr.open_group(store(path), mode="a", attributes=attrs)   # writes zarr.json only: the arrays stay
    return True


def _differs(arr: zarr.Array, spec: ArraySpec, expected: np.ndarray) -> bool:
    """A readable, whole per-row array that holds other values than `expected` (damage is mend's to fix)."""
    try:
        x = arr[:]
    except ValueError:
        return False
    return not len(holes(x, spec.fill)) and not np.array_equal(x, expected)


def mend(group: zarr.Group, path: Location, prov: dict[str, Any], layout: Layout,
         teachers: dict[str, dict[str, Any]]) -> Scan:
    """Undo what can be undone without a teacher and leave the rest to export: lost or wrong metadata is
    written again (byte for byte, keeping the chunks), the per-row arrays again from the layout, and
    every shard with a damaged chunk is marked not done in its part (the views, or that teacher), so
    the export that follows rewrites it. Returns the scan that found the damage (after the metadata
    was restored)."""
    specs = array_specs(prov, layout, teachers)
    found = scan_cache(group, prov, layout, teachers)
    whole = [d for d in found.damage if d.shard is None and d.array not in PER_ROW]
    for d in whole:
        if d.array in specs:
            if exists(join(path, f"{d.array}/zarr.json")):
                remove(join(path, f"{d.array}/zarr.json"))   # wrong or unreadable: only the metadata goes
            create_array(group, d.array, specs[d.array])
        else:
            group.require_group(d.array)
    scan = scan_cache(group, prov, layout, teachers) if whole else found
    rows = {"view_count": layout.counts.astype(np.int32), "view_offset": layout.offsets}
    for d in scan.damage:
        if d.array in rows:
            group[d.array][:] = rows[d.array]
    for part, shards in shards_to_rewrite(scan.damage).items():
        for s in shards:
            group[part][s] = 0
    return Scan([*whole, *scan.damage], scan.done)
