"""Export: teachers, in eval mode, over v_i deterministic views of training image i -> the cache.

v_i is A = `export.views` for every image ("uniform"), or follows the student's class-balanced
draws ("draws"; `data.sampling.view_counts`).

Each teacher is a group of the cache of its own. An export writes the teachers it is given (every
teacher of the pipeline by default, `--teachers` some): a teacher the cache lacks is added, one
whose group is partial is finished, and a complete one is not run. A teacher whose checkpoint
changed since its group was written is refused until `--replace` rewrites that group alone. The
views are shared: the first export to reach a shard writes them, a later one checks its own
against them, so a teacher added later is bit-identical to one exported with the others.

Shard by shard: the loader replays a shard's views once and the teachers that still need it run
on the same batch; a shard's rows are written as whole chunks and only then marked done (the views
and each teacher apart), so a killed export resumes where it stopped and never leaves a half-written
shard marked done. Under torchrun the shards still to do are dealt out over the ranks (rank r takes
every world-th), each rank writes only its own shards' chunks into the one store, and a rerun redoes
exactly the shards not marked done.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from cbd_cache.cache.integrity import mend, restore_root, shards_to_rewrite
from cbd_cache.cache.schema import (
    VIEWS_DONE,
    TeacherRecord,
    cache_counts,
    default_chunk_views,
    make_layout,
    provenance,
)
from cbd_cache.cache.store import diff_keys, teacher_folders
from cbd_cache.cache.writer import CacheWriter, clear_trash, shared_lock
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import ExportStream
from cbd_cache.errors import CacheError, ConfigError
from cbd_cache.models.checkpoints import load_checkpoint, read_torch
from cbd_cache.models.losses import teacher_target
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.distributed import barrier
from cbd_cache.system.logs import Progress, log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import Location
from cbd_cache.views import VIEW_FIELDS, ViewSpec
from cbd_cache.workdir import Workdir


def checkpoint_record(cfg: Config, wd: Workdir, name: str) -> TeacherRecord:
    """What a teacher group records of teacher `name`, read from its checkpoint (no network is built)."""
    ckpt = wd.teacher_checkpoint(name)
    if not ckpt.is_file():
        raise FileNotFoundError(f"teacher {name!r} has no checkpoint at {ckpt}; run `cbd-cache train-teacher` first")
    saved = read_torch(ckpt)
    spec = saved["network"]
    return TeacherRecord(name, cfg.teacher_by_name(name).type, spec["arch"], saved["meta"]["seed"], file_sha256(ckpt),
                         spec["descriptor_dim"], spec["mean"], spec["std"])


def load_teachers(cfg: Config, wd: Workdir, names: list[str]) -> tuple[list[torch.nn.Module], list[TeacherRecord]]:
    nets, records = [], []
    for name in names:
        records.append(checkpoint_record(cfg, wd, name))
        net, _ = load_checkpoint(wd.teacher_checkpoint(name))
        nets.append(net.eval().requires_grad_(False))
    return nets, records


def export_names(cfg: Config, teachers: Sequence[str] = (), replace: Sequence[str] = ()) -> list[str]:
    """The teachers an export writes, in pipeline order: `teachers` (or, alone, `replace`), else all of them."""
    for name in (*teachers, *replace):
        cfg.teacher_by_name(name)      # an unknown name: one line listing the pipeline's teachers
    if teachers and (outside := [n for n in replace if n not in teachers]):
        raise ConfigError(f"--replace {outside[0]}: it is not among --teachers {','.join(teachers)}")
    chosen = set(teachers or replace) or {t.name for t in cfg.teachers}
    return [t.name for t in cfg.teachers if t.name in chosen]


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


def open_groups(writer: CacheWriter, records: dict[str, dict[str, Any]], replace: Sequence[str]) -> None:
    """Rank 0: each teacher's group opened, added or replaced; a changed teacher is refused before anything
    is written."""
    path = writer.path
    stored = {name: writer.stored_record(name) for name in records}
    for name, record in records.items():
        old = stored[name]
        if old is None or name in replace:
            continue
        diff = diff_keys({k: old.get(k) for k in record}, record)
        if "checkpoint_sha256" in diff:
            raise CacheError(f"{path}: teacher {name} was retrained since its group was written (checkpoint "
                             f"{record['checkpoint_sha256'][:12]}, cache {old['checkpoint_sha256'][:12]}); "
                             f"`cbd-cache export --replace {name}` rewrites that group alone")
        if diff:
            raise CacheError(f"{path}: teacher {name}'s group was written for a different {', '.join(diff)}; "
                             f"`cbd-cache export --replace {name}` rewrites that group alone")
    leftovers = set(teacher_folders(path))
    for name, record in records.items():
        if stored[name] is not None and name not in replace:
            writer.records[name] = stored[name]
            continue
        writer.add_teacher(record)
        log(f"[export] {'replacing' if stored[name] is not None else 'adding'} teacher {name} "
            f"({record['arch']}, checkpoint {record['checkpoint_sha256'][:12]}) in {path}"
            + (" over a group without provenance (a cut-short export, or its metadata lost)"
               if stored[name] is None and name in leftovers else ""))


@torch.no_grad()
def export_cache(cfg: Config, wd: Workdir, runtime: Runtime, repair: bool = False, teachers: Sequence[str] = (),
                 replace: Sequence[str] = ()) -> Location:
    """Export, add or finish `teachers` (all of the pipeline's by default; `replace`: rewrite those groups).
    `repair` first finds every damaged chunk and array of the shared part and of these teachers
    (`integrity.mend`) and the export then rewrites just the damaged shards, bit-identical."""
    manifest = Manifest.load(wd.manifest)
    names = export_names(cfg, teachers, replace)
    loaded, recs = load_teachers(cfg, wd, names)   # every checkpoint read (and refused) before anything is written
    records = {r.name: r.to_dict() for r in recs}
    spec = ViewSpec.from_cfg(cfg.views)
    e = cfg.export
    counts = cache_counts(manifest, e.views, e.allocation, e.min_views)
    layout = make_layout([[s.start, s.stop] for s in manifest.train.shards], counts,
                         e.chunk_views or default_chunk_views(cfg.data.shard_size, e.views))
    prov = provenance(manifest, cfg.pipeline.seed, spec.to_dict(), e.views, e.allocation, e.min_views, e.dtype,
                      layout, e.logits)
    d = runtime.dist
    writer = None
    if d.main:    # one rank creates the store and the teacher groups, then the others open them
        clear_trash(wd.cache)
        if repair:
            with shared_lock(wd.cache):
                restored = restore_root(wd.cache, prov, layout)
            if restored:
                log(f"[export] repair: wrote {wd.cache}/zarr.json (the group's metadata) again from the pipeline's "
                    "settings; `cbd-cache cache verify` checks the descriptors against the teachers")
        writer = CacheWriter(wd.cache, prov, layout)
        open_groups(writer, records, replace)
    barrier()
    if writer is None:
        writer = CacheWriter(wd.cache, prov, layout, create=False)
        for name in names:
            writer.open_teacher(name)
    if d.main and repair:
        with shared_lock(wd.cache):
            found = mend(writer.group, wd.cache, prov, layout, writer.records)
        redo = shards_to_rewrite(found.damage)
        log(f"[export] repair: {len(found.damage) or 'no'} damaged arrays/shards in {wd.cache}"
            + "".join(f"\n  {x}" for x in found.damage)
            + "".join(f"\nrewriting {'the views' if part == VIEWS_DONE else part.rsplit('/', 1)[0]} of shards {shards}"
                      for part, shards in redo.items()))
    elif d.main:
        writer.check_metadata()
    barrier()
    views_todo = ~writer.views_done()
    teacher_todo = {name: ~writer.teacher_done(name) for name in names}
    barrier()   # every rank has the same lists before any rank writes
    shards = manifest.train.shards
    todo = [s for s in range(len(shards)) if views_todo[s] or any(t[s] for t in teacher_todo.values())]
    running = [n for n in names if teacher_todo[n].any()]
    if not todo:
        finish(writer, names, d.main)
        log(f"[export] {wd.cache} is complete for {', '.join(names)} ({len(shards)} shards); nothing to do "
            "(`cbd-cache cache verify` reads every chunk)")
        return wd.cache
    views_total = int(sum(counts[shards[s].start:shards[s].stop].sum() for s in todo))
    done_already = [n for n in names if n not in running]
    what = (f"running {', '.join(f'{n} ({int(teacher_todo[n].sum())} shards)' for n in running)}" if running
            else "writing the shared views only, no teacher runs")
    log(f"[export] {what}" + (f"; {', '.join(done_already)} complete, not run" if done_already else "")
        + f": {views_total} views of {sum(shards[s].rows for s in todo)} images ({e.allocation} allocation, "
        f"A = {e.views}), ({len(todo)}/{len(shards)} shards to go) on {runtime.device}"
        + (f", dealt over {d.world} ranks" if d.world > 1 else ""))
    todo = todo[d.rank::d.world]
    nets = {name: runtime.prepare_teacher(net) for name, net in zip(names, loaded) if name in running}
    need = {s: [n for n in running if teacher_todo[n][s]] for s in todo}
    stream = ExportStream(manifest, todo, spec, cfg.pipeline.seed, counts, e.batch_size)
    loader = DataLoader(stream, batch_size=None, **runtime.loader_kwargs())
    pending: dict[int, ShardBuffer] = {}
    progress = Progress("export", int(sum(counts[shards[s].start:shards[s].stop].sum() for s in todo)), unit="view")
    started = time.perf_counter()
    for s, rows, row_counts, views, images in loader:
        info = shards[s]
        dims = {n: records[n]["descriptor_dim"] for n in need[s]}
        buf = pending.setdefault(s, ShardBuffer(counts[info.start:info.stop], dims,
                                                {n: manifest.num_classes for n in need[s]} if e.logits else {}))
        local = (rows - info.start).numpy()
        flat = buf.flat(local, row_counts.numpy())
        buf.views[flat] = views.numpy()
        if need[s]:
            run_teachers(runtime, {n: nets[n] for n in need[s]}, images, buf, flat, e.logits)
        for name in need[s]:   # NaN is the cache's mark of a missing chunk, and no target for a student
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
    finish(writer, names, d.main)
    done = writer.views_done() & np.logical_and.reduce([writer.teacher_done(n) for n in names])
    log(f"[export] wrote {len(todo)} shards{' on rank 0' if d.world > 1 else ''} in "
        f"{time.perf_counter() - started:.0f}s to {wd.cache}; {int(done.sum())}/{len(shards)} shards done "
        f"for {', '.join(names)}")
    return wd.cache


def run_teachers(runtime: Runtime, nets: dict[str, torch.nn.Module], images: torch.Tensor, buf: ShardBuffer,
                 flat: np.ndarray, logits: bool) -> None:
    """The teachers on one batch of replayed views, into the shard's buffer."""
    x = runtime.to_device(images)
    with runtime.autocast():   # every teacher's work is queued before the first copy back waits for it
        outs = [(name, net, net.features(x)) for name, net in nets.items()]
        zs = {name: net.classifier(v) for name, net, v in outs} if logits else {}
    for name, _, v in outs:
        buf.descriptors[name][flat] = teacher_target(v).cpu().numpy()
    for name, z in zs.items():
        buf.logits[name][flat] = z.float().cpu().numpy()


def finish(writer: CacheWriter, names: list[str], main: bool) -> list[str]:
    """Rank 0: each teacher whose every shard is written gets its finish time, and a finished part's chunks
    are counted (a deleted one is named); returns the complete teachers."""
    views = writer.views_done().all()
    complete = [n for n in names if views and writer.teacher_done(n).all()]
    if main:
        for name in complete:
            writer.finish_teacher(name)
        writer.check_chunks()
    return complete
