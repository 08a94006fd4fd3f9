"""`cbd-cache cache verify`: a cache checked end to end, against its data and, where present, its teachers.

The one place near the cache that runs teacher code: it recomputes a sample of stored targets with
the teachers' checkpoints (`losses.teacher_target`, as export computed them). Each teacher group is
checked against its own provenance: its arrays against its recorded descriptor size, its checkpoint
against its recorded hash, its stored rows against that checkpoint's fresh ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cbd_cache.cache.codec import dequantize_int8
from cbd_cache.cache.integrity import VIEWS, scan_cache
from cbd_cache.cache.schema import TEACHERS, Layout, cache_counts, done_array, make_layout, teacher_array
from cbd_cache.cache.store import open_group, provenance_of, read_whole, teacher_folders, teacher_record
from cbd_cache.data.isolated import Encoded, read_in_order
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import Sample, content_hash, read_shard
from cbd_cache.data.sources import Record
from cbd_cache.errors import CacheDamaged, FileDamaged, ShardDamaged
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.models.losses import teacher_target
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import Location, exists
from cbd_cache.views import ViewSpec, concat, derive_views, image_dims, render

SHARED = "views"     # the report's name for the shared part


def verify_cache(path: Location, manifest: Manifest, checkpoints: Mapping[str, Any] | Callable[[str], Path],
                 runtime: Runtime, rows: int = 64, seed: int = 0, tolerance: float = 5e-3) -> dict[str, Any]:
    """Check a cache end to end; `problems` lists every mismatch (empty: the cache is sound), `groups`
    the same by part: the shared views, then each teacher group.

    - completeness (the views and each teacher, shard by shard), the manifest fingerprint and shard row ranges;
    - each teacher group's provenance (its fingerprint; none is a cut-short export);
    - every chunk of every array (`integrity.scan_cache`): its checksum, its size, its presence, and each
      array's metadata; every stored descriptor is unit-norm and every view box sane;
    - `rows` random rows (seeded) of sound shards: their shards' content hashes match the manifest,
      their views are the ones derived from (seed, key, view), and, for each teacher whose
      checkpoint (`checkpoints`: name -> path, or a function of the name) has the hash its group
      recorded, a fresh forward pass gives the stored descriptor up to `tolerance` in cosine error (1 - cos).
    """
    checkpoint = checkpoints.get if isinstance(checkpoints, Mapping) else checkpoints
    group = open_group(path)
    prov = provenance_of(group)
    found: list[tuple[str, str]] = []      # (part, problem)
    same_data = prov["manifest_fingerprint"] == manifest.fingerprint
    if not same_data:
        found.append((SHARED, f"manifest fingerprint {prov['manifest_fingerprint'][:12]} in the cache, "
                              f"{manifest.fingerprint[:12]} in the manifest"))
    if prov["shards"] != [[s.start, s.stop] for s in manifest.train.shards]:
        found.append((SHARED, "shard row ranges differ from the manifest's"))
        same_data = False
    records = {}
    for name in teacher_folders(path):
        try:
            record = teacher_record(group, path, name)
        except FileDamaged as e:
            found.append((name, str(e)))
            continue
        if record is None:
            found.append((name, f"teacher {name}: no provenance (an export of it was cut short, or its group "
                                "metadata was lost); `cbd-cache export` writes it again"))
        else:
            records[name] = record
    if same_data:    # the layout the data's allocation gives: a damaged view_count cannot mislead the scan
        counts = cache_counts(manifest, prov["views_per_image"], prov["allocation"], prov["min_views"])
    else:
        try:
            counts = read_whole(group, path, "view_count")
        except CacheDamaged as e:
            return _report(path, found + [(SHARED, str(e))], list(records))
    layout = make_layout(prov["shards"], counts, prov["chunk_views"])
    problems: list[str] = []
    norms = StoredViews(prov["dtype"] == "int8", problems, prov["shards"], layout)
    scan = scan_cache(group, prov, layout, records, norms)
    found += [(part_of(d.array), str(d)) for d in scan.damage] + [(part_of(p), p) for p in problems]
    for part, missing in scan.incomplete().items():
        total = len(scan.done[part])
        who = "" if part == VIEWS else f"teacher {part.split('/')[1]}: "
        found.insert(0, (part_of(part), f"{who}incomplete: {total - missing}/{total} shards exported"))
    n, counts, offsets = prov["num_rows"], layout.counts, layout.offsets

    # a random sample of rows: data fingerprint, views, and the teachers' descriptors recomputed
    spec = ViewSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in prov["view_spec"].items()})
    nets = {}
    errors: dict[str, float] = {}
    for name, t in records.items():
        ckpt = checkpoint(name)
        if ckpt is None or not exists(ckpt):
            continue
        if file_sha256(ckpt) != t["checkpoint_sha256"]:
            found.append((name, f"teacher {name}: its checkpoint changed since its group was written "
                                f"(`cbd-cache export --replace {name}` rewrites it)"))
            continue
        nets[name] = runtime.prepare_model(load_checkpoint(ckpt)[0].eval())
        errors[name] = 0.0
    sound = scan.sound(VIEWS)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    sample = sample[[bool(sound[_shard_of(prov["shards"], r)]) for r in sample]]   # rows of sound, finished shards
    if not same_data:    # the rows are another data's: nothing to recompute them from
        sample = sample[:0]
    by_shard: dict[int, list[int]] = {}
    for row in sample.tolist():
        by_shard.setdefault(_shard_of(prov["shards"], row), []).append(row)
    picked: list[Sample] = []
    for index, chosen in by_shard.items():
        info = manifest.train.shards[index]
        try:
            samples = read_shard(manifest.shard_path(info), info.start, info.stop)
        except ShardDamaged as e:
            found.append((SHARED, str(e)))
            continue
        if content_hash(samples) != info.sha256:      # not what prepare checked: its images are not decoded
            found.append((SHARED, f"shard {info.name}: its content no longer matches the manifest's hash"))
            continue
        picked += [samples[row - info.start] for row in chosen]
    decodable = set()    # decoded in a worker first, as prepare decodes: a decoder crash is a problem, not verify's end
    encoded = [Record(s.key, s.label, (s.data, s.ext)) for s in picked]
    for r, data, why in read_in_order(Encoded(manifest.channels), encoded, runtime.workers) if encoded else ():
        if data is None:
            found.append((SHARED, f"{r.key}: its image does not decode ({why})"))
        else:
            decodable.add(r.key)
    for index, info in enumerate(manifest.train.shards):
        chosen = [s for s in picked if info.start <= s.row < info.stop and s.key in decodable]
        if not chosen:
            continue
        kept = [s.row for s in chosen]
        flat = np.concatenate([np.arange(offsets[r], offsets[r] + counts[r]) for r in kept])
        stored = np.split(group["views"].oindex[flat], np.cumsum(counts[kept])[:-1])
        dims = [image_dims(s, spec, manifest.channels) for s in chosen]
        for s, (height, width, _), views in zip(chosen, dims, stored):
            derived = derive_views(prov["view_seed"], s.key, len(views), height, width, spec)
            if not np.array_equal(derived, views):
                found.append((SHARED, f"row {s.row}: stored views differ from the views derived from its key"))
        x = concat([render(s, views, spec, manifest.channels, image) for s, (_, _, image), views in
                    zip(chosen, dims, stored)])   # the pixels export gave the teachers, under the cache's decode policy
        for name, net in nets.items():
            if not scan.sound(teacher_array(name, "shard_done"))[index]:
                continue
            with torch.no_grad(), runtime.autocast():
                fresh = teacher_target(net.features(runtime.to_device(x))).cpu()
            cached = stored_descriptors(group, prov["dtype"], name, flat)
            err = float((1.0 - F.cosine_similarity(fresh, cached, dim=1)).max())
            errors[name] = max(errors[name], err)
    for name, err in errors.items():
        if err > tolerance:
            found.append((name, f"{teacher_array(name, 'descriptors')}: recomputed rows differ from the cache by "
                                f"cosine error {err:.2e} (tolerance {tolerance:.0e})"))
    return _report(path, found, list(records), int(len(sample)), errors, sorted(nets), tolerance)


def stored_descriptors(group, dtype: str, name: str, flat: np.ndarray) -> torch.Tensor:
    """Teacher `name`'s stored descriptors of flat views `flat`, as float32 (int8 dequantised)."""
    d = group[teacher_array(name, "descriptors")].oindex[flat]
    if dtype == "int8":
        d = dequantize_int8(d, group[teacher_array(name, "scales")].oindex[flat])
    return torch.from_numpy(d.astype(np.float32))


def part_of(array: str) -> str:
    """The report's part of an array or problem text: `views` (shared) or the teacher's name."""
    head = array.split(":")[0].split(" ")[0]
    parts = done_array(head).split("/")
    return parts[1] if parts[0] == TEACHERS else SHARED


def _report(path: Location, found: list[tuple[str, str]], teachers: list[str], rows_checked: int = 0,
            errors: dict[str, float] | None = None, recomputed: list[str] | None = None,
            tolerance: float | None = None) -> dict[str, Any]:
    groups: dict[str, list[str]] = {SHARED: [], **{t: [] for t in teachers}}
    for part, problem in found:
        groups.setdefault(part, []).append(problem)
    return {"path": str(path), "problems": [p for _, p in found], "groups": groups, "rows_checked": rows_checked,
            "max_cosine_error": errors or {}, "teachers_recomputed": recomputed or [], "tolerance": tolerance}


class StoredViews:
    """`scan_cache`'s inspection of every sound block: descriptors unit-norm (int8 ones once their scales
    arrive), view boxes of positive size and flips of 0 or 1. Findings go into `problems`."""

    def __init__(self, int8: bool, problems: list[str], shards: list[list[int]], layout: Layout):
        self.int8, self.problems, self.shards, self.layout = int8, problems, shards, layout
        self.quantized: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, name: str, shard: int, block: np.ndarray) -> None:
        parts = name.split("/")
        kind, teacher = (parts[2], parts[1]) if parts[0] == TEACHERS else (name, "")
        if kind == "views":
            if (block[:, 2] < 1).any() or (block[:, 3] < 1).any() or not np.isin(block[:, 4], (0, 1)).all():
                start, stop = self.shards[shard]
                self.problems.append(f"shard {shard} (rows {start}..{stop - 1}): invalid view boxes")
        elif kind == "descriptors" and self.int8:
            self.quantized[(teacher, shard)] = block
        elif kind == "descriptors":
            self.unit_norm(teacher, shard, block.astype(np.float32))
        elif kind == "scales" and (teacher, shard) in self.quantized:
            self.unit_norm(teacher, shard, dequantize_int8(self.quantized.pop((teacher, shard)), block))

    def unit_norm(self, teacher: str, shard: int, d: np.ndarray) -> None:
        bad = np.flatnonzero(np.abs(np.linalg.norm(d, axis=-1) - 1.0) > 1e-2)
        if len(bad):
            start, stop = self.shards[shard]
            row_of = start + np.repeat(np.arange(stop - start), self.layout.counts[start:stop])
            rows_bad = np.unique(row_of[bad])
            self.problems.append(f"{teacher_array(teacher, 'descriptors')}: {len(rows_bad)} rows of shard {shard} are "
                                 "not unit-norm "
                                 f"(first: row {int(rows_bad[0])})")


def _shard_of(shards: list[list[int]], row: int) -> int:
    return next(i for i, (start, stop) in enumerate(shards) if start <= row < stop)


def verify_text(report: dict[str, Any]) -> str:
    """What `cache verify` prints: the rows recomputed, each part (the views, each teacher) with its
    mismatches, then OK or FAILED."""
    errors = ", ".join(f"{k} {v:.2e}" for k, v in report["max_cosine_error"].items()) or "no teacher present"
    lines = [f"{report['path']}: {report['rows_checked']} rows recomputed; max cosine error: {errors}"]
    for part, problems in report["groups"].items():
        name = "views (shared)" if part == SHARED else f"teacher {part}"
        recomputed = " (rows recomputed)" if part in report["teachers_recomputed"] else ""
        lines.append(f"  {name}: {'OK' + recomputed if not problems else f'{len(problems)} problem(s)'}")
        lines += [f"    MISMATCH {problem}" for problem in problems]
    lines.append("OK" if not report["problems"] else f"FAILED: {len(report['problems'])} problem(s)")
    return "\n".join(lines)
