"""`cbd-cache cache verify`: a cache checked end to end, against its data and, where present, its teachers.

The one place near the cache that runs teacher code: it recomputes a sample of stored targets with
the teachers' checkpoints (`losses.teacher_target`, as export computed them).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cache import cache_counts, open_group, stored_layout
from .checkpoint import load_checkpoint
from .data.manifest import Manifest
from .data.shards import content_hash, decode_image, read_shard
from .logs import Progress
from .losses import teacher_target
from .runtime import Runtime
from .views import VIEW_FIELDS, ViewSpec, derive_views, replay
from .workdir import Location, exists, file_sha256


def verify_cache(path: Location, manifest: Manifest, checkpoints: dict[str, Any], runtime: Runtime, rows: int = 64,
                 seed: int = 0, tolerance: float = 5e-3) -> dict[str, Any]:
    """Check a cache end to end; `problems` lists every mismatch (empty: the cache is sound).

    - completeness (every shard done), the manifest fingerprint, the shard row ranges, array shapes;
    - every stored descriptor of every row is unit-norm (a lost or zero chunk is not);
    - `rows` random rows (seeded): their shards' content hashes match the manifest, their views are
      the ones derived from (seed, key, view), and, for each teacher whose checkpoint is in
      `checkpoints` (name -> path) with the hash the cache recorded, a fresh forward pass gives the
      stored descriptor up to `tolerance` in cosine error (1 - cos).
    """
    group = open_group(path)
    prov = dict(group.attrs)["provenance"]
    problems: list[str] = []
    done = group["shard_done"][:]
    if not done.all():
        problems.append(f"incomplete: {int(done.sum())}/{len(done)} shards exported")
    if prov["manifest_fingerprint"] != manifest.fingerprint:
        problems.append(f"manifest fingerprint {prov['manifest_fingerprint'][:12]} in the cache, "
                        f"{manifest.fingerprint[:12]} in the manifest")
    if prov["shards"] != [[s.start, s.stop] for s in manifest.train.shards]:
        problems.append("shard row ranges differ from the manifest's")
    n = prov["num_rows"]
    if "view_count" not in group or tuple(group["view_count"].shape) != (n,):
        return {"path": str(path), "problems": problems + ["view_count: missing or not one count per row"],
                "rows_checked": 0, "max_cosine_error": {}}
    layout = stored_layout(group, prov)
    expected = {"views": (layout.total, len(VIEW_FIELDS)), "view_offset": (n,)}
    for name, t in prov["teachers"].items():
        expected[f"descriptors/{name}"] = (layout.total, t["descriptor_dim"])
    shapes = [f"{name}: shape {tuple(group[name].shape) if name in group else None}, expected {shape}"
              for name, shape in expected.items() if name not in group or tuple(group[name].shape) != shape]
    if not shapes and not np.array_equal(group["view_offset"][:], layout.offsets):
        shapes.append("view_offset: differs from the layout of view_count")
    if shapes:   # nothing below can be read safely
        return {"path": str(path), "problems": problems + shapes, "rows_checked": 0, "max_cosine_error": {}}
    counts, offsets = layout.counts, layout.offsets
    if prov["manifest_fingerprint"] == manifest.fingerprint and not np.array_equal(
            counts, cache_counts(manifest, prov["views_per_image"], prov["allocation"], prov["min_views"])):
        problems.append(f"view_count: differs from the {prov['allocation']} allocation of "
                        f"{prov['views_per_image']} views per image")

    # every stored view: unit-norm descriptors, sane view boxes
    progress = Progress("verify scan", n, unit="row")
    for index, (start, stop) in enumerate(prov["shards"]):
        if not done[index]:
            continue
        lo, hi = int(offsets[start]), int(offsets[stop - 1] + counts[stop - 1])
        views = group["views"][lo:hi]
        if (views[:, 2] < 1).any() or (views[:, 3] < 1).any() or not np.isin(views[:, 4], (0, 1)).all():
            problems.append(f"shard {index} (rows {start}..{stop - 1}): invalid view boxes")
        row_of = start + np.repeat(np.arange(stop - start), counts[start:stop])
        for name in prov["teachers"]:
            d = group[f"descriptors/{name}"][lo:hi].astype(np.float32)
            bad = np.flatnonzero(np.abs(np.linalg.norm(d, axis=-1) - 1.0) > 1e-2)
            if len(bad):
                rows_bad = np.unique(row_of[bad])
                problems.append(f"descriptors/{name}: {len(rows_bad)} rows of shard {index} are not unit-norm "
                                f"(first: row {int(rows_bad[0])})")
        progress.update(stop - start)

    # a random sample of rows: data fingerprint, views, and the teachers' descriptors recomputed
    spec = ViewSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in prov["view_spec"].items()})
    nets = {}
    errors: dict[str, float] = {}
    for name, t in prov["teachers"].items():
        ckpt = checkpoints.get(name)
        if ckpt is None or not exists(ckpt):
            continue
        if file_sha256(ckpt) != t["checkpoint_sha256"]:
            problems.append(f"teacher {name}: its checkpoint changed since the export (re-run `cbd-cache export`)")
            continue
        nets[name] = runtime.prepare_model(load_checkpoint(ckpt)[0].eval())
        errors[name] = 0.0
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    sample = sample[[bool(done[_shard_of(prov["shards"], r)]) for r in sample]]   # rows of finished shards
    by_shard: dict[int, list[int]] = {}
    for row in sample.tolist():
        by_shard.setdefault(_shard_of(prov["shards"], row), []).append(row)
    for index, chosen in by_shard.items():
        info = manifest.train.shards[index]
        samples = read_shard(manifest.shard_path(info), info.start, info.stop)
        if content_hash(samples) != info.sha256:
            problems.append(f"shard {info.name}: its content no longer matches the manifest's hash")
        picked = [samples[row - info.start] for row in chosen]
        flat = np.concatenate([np.arange(offsets[r], offsets[r] + counts[r]) for r in chosen])
        stored = np.split(group["views"].oindex[flat], np.cumsum(counts[chosen])[:-1])
        images = [decode_image(s.data, manifest.channels) for s in picked]
        for s, image, views in zip(picked, images, stored):
            derived = derive_views(prov["view_seed"], s.key, len(views), image.shape[1], image.shape[2], spec)
            if not np.array_equal(derived, views):
                problems.append(f"row {s.row}: stored views differ from the views derived from its key")
        x = torch.stack([replay(image, v, spec.image_px) for image, views in zip(images, stored) for v in views])
        for name, net in nets.items():
            with torch.no_grad(), runtime.autocast():
                fresh = teacher_target(net.features(runtime.to_device(x))).cpu()
            cached = torch.from_numpy(group[f"descriptors/{name}"].oindex[flat].astype(np.float32))
            err = float((1.0 - F.cosine_similarity(fresh, cached, dim=1)).max())
            errors[name] = max(errors[name], err)
    for name, err in errors.items():
        if err > tolerance:
            problems.append(f"descriptors/{name}: recomputed rows differ from the cache by cosine error {err:.2e} "
                            f"(tolerance {tolerance:.0e})")
    return {"path": str(path), "problems": problems, "rows_checked": int(len(sample)), "max_cosine_error": errors,
            "teachers_recomputed": sorted(nets), "tolerance": tolerance}


def _shard_of(shards: list[list[int]], row: int) -> int:
    return next(i for i, (start, stop) in enumerate(shards) if start <= row < stop)
