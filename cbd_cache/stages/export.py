"""Export: every teacher, in eval mode, over v_i deterministic views of training image i -> the cache.

v_i is A = `export.views` for every image ("uniform"), or follows the student's class-balanced
draws ("draws"; `data.sampling.view_counts`).

Shard by shard: the loader replays a shard's views once and all K teachers run on the same batch;
a shard's rows are written as whole chunks and only then marked done, so a killed export resumes
where it stopped and never leaves a half-written shard marked done. Under torchrun the shards still
to do are dealt out over the ranks (rank r takes every world-th), each rank writes only its own
shards' chunks into the one store, and a rerun redoes exactly the shards not marked done.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from cbd_cache.cache.integrity import mend, restore_root, shards_to_rewrite
from cbd_cache.cache.schema import TeacherRecord, cache_counts, default_chunk_views, make_layout, provenance
from cbd_cache.cache.writer import CacheWriter
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.stream import ExportStream
from cbd_cache.errors import CacheError
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.models.losses import teacher_target
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.distributed import barrier
from cbd_cache.system.logs import Progress, log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import Location
from cbd_cache.views import VIEW_FIELDS, ViewSpec
from cbd_cache.workdir import Workdir


def load_teachers(cfg: Config, wd: Workdir, names: list[str]) -> tuple[list[torch.nn.Module], list[TeacherRecord]]:
    nets, records = [], []
    for name in names:
        ckpt = wd.teacher_checkpoint(name)
        if not ckpt.is_file():
            raise FileNotFoundError(f"teacher {name!r} has no checkpoint at {ckpt}; run `cbd-cache train-teacher` first")
        net, meta = load_checkpoint(ckpt)
        t = cfg.teacher_by_name(name)
        records.append(TeacherRecord(name, t.type, meta["network"]["arch"], meta["seed"], file_sha256(ckpt), net.dim))
        nets.append(net.eval().requires_grad_(False))
    return nets, records


class ShardBuffer:
    """One shard's views, flat as the cache packs them, as its rows arrive from the loader in any order."""

    def __init__(self, counts: np.ndarray, dims: dict[str, int], logit_dims: dict[str, int]):
        total = int(counts.sum())
        self.offsets = np.cumsum(counts) - counts
        self.views = np.zeros((total, len(VIEW_FIELDS)), np.int32)
        self.descriptors = {k: np.zeros((total, d), np.float32) for k, d in dims.items()}
        self.logits = {k: np.zeros((total, d), np.float32) for k, d in logit_dims.items()}
        self.missing = len(counts)

    def flat(self, local: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Flat indices of the views of the shard's rows `local`, whose counts are `counts`, row after row."""
        return np.concatenate([np.arange(o, o + c) for o, c in zip(self.offsets[local], counts)])


@torch.no_grad()
def export_cache(cfg: Config, wd: Workdir, runtime: Runtime, repair: bool = False) -> Location:
    """Export, or resume an export; `repair` first finds every damaged chunk and array (`damage.mend`) and
    the export then rewrites just the damaged shards, bit-identical to an undamaged export."""
    manifest = Manifest.load(wd.manifest)
    names = [t.name for t in cfg.teachers]
    nets, records = load_teachers(cfg, wd, names)
    spec = ViewSpec.from_cfg(cfg.views)
    e = cfg.export
    counts = cache_counts(manifest, e.views, e.allocation, e.min_views)
    layout = make_layout([[s.start, s.stop] for s in manifest.train.shards], counts,
                         e.chunk_views or default_chunk_views(cfg.data.shard_size, e.views))
    prov = provenance(manifest, cfg.pipeline.seed, spec.to_dict(), e.views, e.allocation, e.min_views, e.dtype,
                      layout, records, e.logits)
    d = runtime.dist
    if d.main and repair and restore_root(wd.cache, prov, layout):
        log(f"[export] repair: wrote {wd.cache}/zarr.json (the group's metadata) again from the pipeline's settings; "
            "`cbd-cache cache verify` checks the descriptors against the teachers")
    writer = CacheWriter(wd.cache, prov, layout) if d.main else None   # one rank creates the store, then the others open it
    barrier()
    writer = writer or CacheWriter(wd.cache, prov, layout, create=False)
    if d.main and repair:
        found = mend(writer.group, wd.cache, prov, layout)
        log(f"[export] repair: {len(found.damage) or 'no'} damaged arrays/shards in {wd.cache}"
            + "".join(f"\n  {x}" for x in found.damage)
            + (f"\nrewriting shards {shards_to_rewrite(found.damage)}" if shards_to_rewrite(found.damage) else ""))
    elif d.main:
        writer.check_metadata()
    shards = manifest.train.shards
    barrier()
    done = writer.done_shards()   # (read once: it reads one chunk per shard)
    todo = [s for s in range(len(shards)) if s not in done]
    barrier()   # every rank has the same list before any rank writes
    if not todo:
        if d.main:
            writer.check_chunks()
        log(f"[export] {wd.cache} is complete ({len(shards)} shards); nothing to do "
            "(`cbd-cache cache verify` reads every chunk)")
        return wd.cache
    log(f"[export] {len(names)} teachers x {int(sum(counts[shards[s].start:shards[s].stop].sum() for s in todo))} views "
        f"of {sum(shards[s].rows for s in todo)} images ({e.allocation} allocation, A = {e.views}), "
        f"({len(todo)}/{len(shards)} shards to go) on {runtime.device}"
        + (f", dealt over {d.world} ranks" if d.world > 1 else ""))
    todo = todo[d.rank::d.world]
    nets = [runtime.prepare_teacher(n) for n in nets]
    dims = {r.name: r.descriptor_dim for r in records}
    logit_dims = {r.name: manifest.num_classes for r in records} if e.logits else {}
    stream = ExportStream(manifest, todo, spec, cfg.pipeline.seed, counts, e.batch_size)
    loader = DataLoader(stream, batch_size=None, **runtime.loader_kwargs())
    pending: dict[int, ShardBuffer] = {}
    progress = Progress("export", int(sum(counts[shards[s].start:shards[s].stop].sum() for s in todo)), unit="view")
    started = time.perf_counter()
    for s, rows, row_counts, views, images in loader:
        info = shards[s]
        buf = pending.setdefault(s, ShardBuffer(counts[info.start:info.stop], dims, logit_dims))
        local = (rows - info.start).numpy()
        flat = buf.flat(local, row_counts.numpy())
        buf.views[flat] = views.numpy()
        x = runtime.to_device(images)
        with runtime.autocast():   # every teacher's work is queued before the first copy back waits for it
            outs = [(name, net, net.features(x)) for name, net in zip(names, nets)]
            logits = {name: net.classifier(v) for name, net, v in outs} if e.logits else {}
        for name, _, v in outs:
            buf.descriptors[name][flat] = teacher_target(v).cpu().numpy()
        for name, z in logits.items():
            buf.logits[name][flat] = z.float().cpu().numpy()
        for name in names:   # NaN is the cache's mark of a missing chunk, and no target for a student
            if not (np.isfinite(buf.descriptors[name][flat]).all() and
                    (name not in buf.logits or np.isfinite(buf.logits[name][flat]).all())):
                raise CacheError(f"teacher {name} gives non-finite outputs on shard {s} (rows {info.start}.."
                                 f"{info.stop - 1}); its checkpoint {wd.teacher_checkpoint(name)} is broken: "
                                 "train or import it again")
        buf.missing -= len(local)
        if buf.missing == 0:
            writer.write_shard(s, buf.views, buf.descriptors, buf.logits)
            del pending[s]
        progress.update(len(flat))
    if pending:
        raise RuntimeError(f"export: shards {sorted(pending)} did not receive all their rows")
    barrier()
    done = len(writer.done_shards())
    if d.main and done == len(shards):
        writer.check_chunks()
    log(f"[export] wrote {len(todo)} shards{' on rank 0' if d.world > 1 else ''} in "
        f"{time.perf_counter() - started:.0f}s to {wd.cache}; {done}/{len(shards)} shards done")
    return wd.cache
