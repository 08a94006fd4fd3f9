"""A cache's damage, found without a teacher: what `cache verify` reports and `export --repair` rewrites.

Every chunk of every array is read once. A chunk is damaged when it fails its CRC32C or its size
(bytes flipped, cut short or rewritten) or reads as the fill value (missing: `cache.FILL` is a
value no export writes); an array when its metadata is missing or is not the schema's; a per-row
array when it differs from the layout. Damage is named by array and shard, the unit that export
rewrites.
"""
from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zarr

from cbd_cache import __version__
from cbd_cache.cache.schema import PER_ROW, ArraySpec, Layout, array_specs
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
    done: np.ndarray        # (S,) bool: shards marked done (all, when the marks' metadata is lost)

    def sound_shards(self) -> np.ndarray:
        """Shards marked done with no damaged chunk (none while an array as a whole is damaged)."""
        if any(d.shard is None for d in self.damage):
            return np.zeros_like(self.done)
        ok = self.done.copy()
        ok[shards_to_rewrite(self.damage)] = False
        return ok


def scan_cache(group: zarr.Group, prov: dict[str, Any], layout: Layout, inspect: Inspect | None = None) -> Scan:
    """Every damaged array and (array, shard) of the cache, in array order; `inspect` sees every sound
    block of a finished shard (its stored views only, no padding)."""
    specs = array_specs(prov, layout)
    damage = [Damage(name, None, what) for name, what in metadata_problems(group, specs).items()]
    damage += [Damage(g, None, "its group metadata (zarr.json) is missing")
               for g in sorted({n.split("/")[0] for n in specs if "/" in n}) if g not in group]
    broken = {d.array for d in damage}
    expected = {"view_count": layout.counts, "view_offset": layout.offsets}
    for name in PER_ROW:
        if name not in broken and (what := _per_row(group[name], specs[name], expected[name])):
            damage.append(Damage(name, None, what))
    done = np.ones(len(layout.blocks), bool) if "shard_done" in broken else _shard_done(group["shard_done"], damage)
    arrays = {name: group[name] for name in specs if name not in (*PER_ROW, "shard_done") and name not in broken}
    shards = prov["shards"]
    progress = Progress("cache scan", len(shards), unit="shard")
    for s, (start, stop) in enumerate(layout.blocks.tolist()):
        if done[s]:
            rows = shards[s]
            used = int(layout.offsets[rows[1] - 1] + layout.counts[rows[1] - 1]) - start if rows[1] > rows[0] else 0
            for name, arr in arrays.items():
                block, whats = _read_block(arr, specs[name], start, stop, layout.chunk_views)
                if whats:
                    damage.append(Damage(name, s, "; ".join(whats)))
                elif inspect is not None:
                    inspect(name, s, block[:used])
        progress.update(1)
    return Scan(damage, done)


def shards_to_rewrite(damage: list[Damage]) -> list[int]:
    """The shards a repair rewrites."""
    return sorted({d.shard for d in damage if d.shard is not None})


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


def _shard_done(arr: zarr.Array, damage: list[Damage]) -> np.ndarray:
    """Each shard's done mark; a mark whose chunk fails its check is damage (its shard is rewritten)."""
    try:
        return arr[:].astype(bool)
    except ValueError:
        done = np.zeros(arr.shape[0], bool)
        for s in range(arr.shape[0]):
            try:
                done[s] = bool(arr[s])
            except ValueError as e:
                damage.append(Damage("shard_done", s, f"its chunk {why(e)}"))
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
    `shard_done` with the schema's metadata, and `view_count` the layout's (the data, budget and allocation
    agree). True when it wrote it; CacheError when the arrays belong to other settings. The creation time
    (`created_utc`) becomes the repair's; `cache verify` then checks the descriptors against the teachers."""
    root = join(path, "zarr.json")
    if not exists(path):
        return False
    if exists(root):
        try:
            zarr.open_group(store(path), mode="r")
            return False
        except (FileNotFoundError, ValueError):     # garbled: written again below
            pass
    specs = array_specs(prov, layout)
    problems = {}
    for name in ("views", *PER_ROW, "shard_done"):
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


def mend(group: zarr.Group, path: Location, prov: dict[str, Any], layout: Layout) -> Scan:
    """Undo what can be undone without a teacher and leave the rest to export: lost or wrong metadata is
    written again (byte for byte, keeping the chunks), the per-row arrays again from the layout, and
    every shard with a damaged chunk is marked not done, so the export that follows rewrites it.
    Returns the scan that found the damage (after the metadata was restored)."""
    specs = array_specs(prov, layout)
    found = scan_cache(group, prov, layout)
    whole = [d for d in found.damage if d.shard is None and d.array not in PER_ROW]
    for d in whole:
        if d.array in specs:
            if exists(join(path, f"{d.array}/zarr.json")):
                remove(join(path, f"{d.array}/zarr.json"))   # wrong or unreadable: only the metadata goes
            create_array(group, d.array, specs[d.array])
        else:
            group.require_group(d.array)
    scan = scan_cache(group, prov, layout) if whole else found
    rows = {"view_count": layout.counts.astype(np.int32), "view_offset": layout.offsets}
    for d in scan.damage:
        if d.array in rows:
            group[d.array][:] = rows[d.array]
    for s in shards_to_rewrite(scan.damage):
        group["shard_done"][s] = 0
    return Scan([*whole, *scan.damage], scan.done)
