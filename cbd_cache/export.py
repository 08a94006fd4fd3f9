"""Export: every teacher, in eval mode, over A deterministic views of every training image -> the cache.

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

from .cache import CacheWriter, TeacherRecord, provenance
from .checkpoint import load_checkpoint
from .config import Config
from .data.manifest import Manifest
from .data.stream import ExportStream
from .distributed import barrier
from .logs import Progress, log
from .losses import teacher_target
from .runtime import Runtime
from .views import VIEW_FIELDS, ViewSpec
from .workdir import Location, Workdir, file_sha256


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
    """One shard's rows as they arrive from the loader, in any order."""

    def __init__(self, rows: int, views: int, dims: dict[str, int], logit_dims: dict[str, int]):
        self.views = np.zeros((rows, views, len(VIEW_FIELDS)), np.int32)
        self.descriptors = {k: np.zeros((rows, views, d), np.float32) for k, d in dims.items()}
        self.logits = {k: np.zeros((rows, views, d), np.float32) for k, d in logit_dims.items()}
        self.missing = rows


@torch.no_grad()
def export_cache(cfg: Config, wd: Workdir, runtime: Runtime) -> Location:
    manifest = Manifest.load(wd.manifest)
    names = [t.name for t in cfg.teachers]
    nets, records = load_teachers(cfg, wd, names)
    spec = ViewSpec.from_cfg(cfg.views)
    e = cfg.export
    prov = provenance(manifest, cfg.pipeline.seed, spec.to_dict(), e.views, e.dtype,
                      e.chunk_rows or cfg.data.shard_size, records, e.logits)
    d = runtime.dist
    writer = CacheWriter(wd.cache, prov) if d.main else None   # one rank creates the store, then the others open it
    barrier()
    writer = writer or CacheWriter(wd.cache, prov, create=False)
    shards = manifest.train.shards
    todo = [s for s in range(len(shards)) if s not in writer.done_shards()]
    barrier()   # every rank has the same list before any rank writes
    if not todo:
        log(f"[export] {wd.cache} is complete ({len(shards)} shards); nothing to do")
        return wd.cache
    log(f"[export] {len(names)} teachers x {e.views} views x {sum(shards[s].rows for s in todo)} images "
        f"({len(todo)}/{len(shards)} shards to go) on {runtime.device}"
        + (f", dealt over {d.world} ranks" if d.world > 1 else ""))
    todo = todo[d.rank::d.world]
    nets = [runtime.prepare_teacher(n) for n in nets]
    dims = {r.name: r.descriptor_dim for r in records}
    logit_dims = {r.name: manifest.num_classes for r in records} if e.logits else {}
    stream = ExportStream(manifest, todo, spec, cfg.pipeline.seed, e.views, e.batch_size)
    loader = DataLoader(stream, batch_size=None, **runtime.loader_kwargs())
    pending: dict[int, ShardBuffer] = {}
    progress = Progress("export", sum(shards[s].rows for s in todo) * e.views, unit="view")
    started = time.perf_counter()
    for s, rows, views, images in loader:
        info = shards[s]
        buf = pending.setdefault(s, ShardBuffer(info.rows, e.views, dims, logit_dims))
        local = (rows - info.start).numpy()
        n = len(local)
        buf.views[local] = views.numpy()
        x = runtime.to_device(images)
        with runtime.autocast():   # every teacher's work is queued before the first copy back waits for it
            outs = [(name, net, net.features(x)) for name, net in zip(names, nets)]
            logits = {name: net.classifier(v) for name, net, v in outs} if e.logits else {}
        for name, _, v in outs:
            buf.descriptors[name][local] = teacher_target(v).cpu().numpy().reshape(n, e.views, -1)
        for name, z in logits.items():
            buf.logits[name][local] = z.float().cpu().numpy().reshape(n, e.views, -1)
        buf.missing -= n
        if buf.missing == 0:
            writer.write_shard(s, buf.views, buf.descriptors, buf.logits)
            del pending[s]
        progress.update(n * e.views)
    if pending:
        raise RuntimeError(f"export: shards {sorted(pending)} did not receive all their rows")
    barrier()
    done = len(writer.done_shards())
    log(f"[export] wrote {len(todo)} shards{' on rank 0' if d.world > 1 else ''} in "
        f"{time.perf_counter() - started:.0f}s to {wd.cache}; {done}/{len(shards)} shards done")
    return wd.cache
