"""What the cache costs: target reads in the student's access pattern (page cache warm and cold), export
against plain teacher inference on the same batches, and bytes on disk per (image . view . teacher).

    reads    Caches of two row shapes written by the real `CacheWriter` (random unit descriptors):
             the embedded default's (A = 8, K = 4, d = 64) and ImageNet-LT's (A = 8, K = 4, d = 2048),
             in float16 and int8. One process reads them as a `TrainStream` worker does: its shards in
             the epoch's permuted order, one contiguous `CacheReader.read` per shard, then one stored
             view and its targets per class-balanced copy. Warm: the files were just read. Cold: each
             file is fsync'ed and dropped from the page cache (posix_fadvise DONTNEED, checked with
             fincore) before the pass. Compared with the student's step rate (compute alone, one
             preloaded batch) for the same shapes, on this machine.
    export   `export_cache` (loader, K teachers, Zarr writes) on the benchmark workdirs, against the
             same K teachers' forward passes over the same batches, preloaded; the two alternate for
             --export-rounds rounds and the median of the rounds' ratios is reported.
    bytes    bytes on disk of each cache, per (image . view . teacher), descriptors only and in total.

    .venv/bin/python benchmarks/bench_cache.py                      # everything, both cases
    .venv/bin/python benchmarks/bench_cache.py --parts reads bytes

Writes results/bench_cache.{md,json}. Run it on a quiet machine (here: under flock /tmp/cbd-cpu.lock).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import Timer, bench_config, bench_workdir, runtime_info, write_results

from cbd_cache.cache.info import cache_info
from cbd_cache.cache.reader import CacheReader
from cbd_cache.cache.schema import TeacherRecord, default_chunk_views, make_layout, provenance
from cbd_cache.cache.writer import CacheWriter
from cbd_cache.config import TrainCfg
from cbd_cache.data.manifest import Manifest, ShardInfo, SplitInfo
from cbd_cache.data.sampling import copies, repeat_factors
from cbd_cache.loaders import ExportStream
from cbd_cache.models.losses import cbd_loss, normalize_per_teacher
from cbd_cache.models.networks import Network, descriptor_dim, projection_dim
from cbd_cache.stages.export import export_cache, load_teachers
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime, make_runtime
from cbd_cache.train.engine import make_optimizer
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

# (name, rows, shard rows, A, K, d, student arch, image px, channels, student batch)
SHAPES = {"small": (2773, 256, 8, 4, 64, "resnet8", 28, 1, 64),
          "imagenet": (3000, 1000, 8, 4, 2048, "resnet50", 224, 3, 16)}


# ------------------------------------------------------------------------------------------- reads
def synthetic_manifest(name: str, rows: int, shard_rows: int, classes: int = 10) -> Manifest:
    """A manifest with a long-tailed label count and shard ranges, no image files: what CacheReader checks."""
    counts = np.maximum(1, (rows * 0.46 * 0.55 ** np.arange(classes))).astype(int)
    counts[0] += rows - counts.sum()
    shards = [ShardInfo(f"train-{i:06d}.tar", s, min(s + shard_rows, rows), "0" * 64)
              for i, s in enumerate(range(0, rows, shard_rows))]
    m = Manifest(name=name, class_names=[f"c{c}" for c in range(classes)], channels=1,
                 splits={"train": SplitInfo(rows, counts.tolist(), shards)}, source={}, data_config={})
    m.fingerprint = m.compute_fingerprint()
    return m


def write_synthetic_cache(path: Path, manifest: Manifest, views: int, teachers: int, dim: int, dtype: str) -> None:
    """A complete cache of random unit descriptors, written shard by shard by the real CacheWriter."""
    if path.exists() and cache_info(path)["complete"]:
        return
    shutil.rmtree(path, ignore_errors=True)
    counts = np.full(manifest.train.num_samples, views, dtype=np.int64)
    layout = make_layout([[s.start, s.stop] for s in manifest.train.shards], counts,
                         default_chunk_views(manifest.train.shards[0].rows, views))
    writer = CacheWriter(path, provenance(manifest, 0, {}, views, "uniform", 1, dtype, layout, False), layout)
    records = [TeacherRecord(f"t{k}", "standard", "synthetic", k, "0" * 64, dim, [0.0], [1.0]) for k in range(teachers)]
    for r in records:
        writer.add_teacher(r.to_dict())
    rng = np.random.default_rng(0)
    for s, info in enumerate(manifest.train.shards):
        d = {}
        for r in records:
            x = rng.standard_normal((info.rows * views, dim), dtype=np.float32)
            d[r.name] = x / np.linalg.norm(x, axis=-1, keepdims=True)
        v = rng.integers(1, 28, (info.rows * views, 5)).astype(np.int32)
        writer.write_shard(s, v, d)


def cache_files(path: Path) -> list[Path]:
    return [f for f in Path(path).rglob("*") if f.is_file()]


def drop_page_cache(path: Path) -> float:
    """fsync and POSIX_FADV_DONTNEED every file of the cache; returns the fraction still resident (fincore)."""
    files = cache_files(path)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(files)


def resident_fraction(files: list[Path]) -> float:
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    res, size = np.array(out, dtype=np.int64).reshape(-1, 2).sum(axis=0)
    return float(res / max(size, 1))


def read_pass(reader: CacheReader, manifest: Manifest, epoch: int) -> tuple[int, int, float]:
    """One worker's epoch of cache reads, as TrainStream.expand does them: (rows, copies, seconds)."""
    factors = repeat_factors(manifest.train.class_counts, "class_balanced")
    rng = np.random.default_rng([0, epoch, 0])
    labels = np.repeat(np.arange(len(factors)), manifest.train.class_counts)
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    order = np.random.default_rng([0, epoch, 0x5EED]).permutation(len(manifest.train.shards))
    rows = n_copies = 0
    with Timer() as t:
        for s in order:
            info = manifest.train.shards[s]
            block = reader.read(info.start, info.stop)
            for i in range(info.rows):
                for _ in range(copies(factors[labels[info.start + i]], rng.random())):
                    v = int(block.offset[i]) + int(rng.integers(block.count[i]))
                    torch.from_numpy(np.asarray(block.views[v])), torch.from_numpy(np.asarray(block.targets[v]))
                    n_copies += 1
            rows += info.rows
    return rows, n_copies, t.seconds


def bench_reads(root: Path, runtime: Runtime) -> list[dict]:
    out = []
    for shape, (rows, shard_rows, a, k, d, arch, px, ch, bs) in SHAPES.items():
        manifest = synthetic_manifest(shape, rows, shard_rows)
        student = student_rate(arch, px, ch, 4 * bs if runtime.cuda else bs, k, d, runtime)
        for dtype in ("float16", "int8"):
            path = root / f"reads-{shape}-{dtype}.zarr"
            write_synthetic_cache(path, manifest, a, k, d, dtype)
            reader = CacheReader(path, manifest, [f"t{j}" for j in range(k)])
            read_pass(reader, manifest, 0)                                   # warm the page cache
            warm = [read_pass(reader, manifest, e) for e in (1, 2)]
            cold, resident = [], []
            for e in (3, 4):
                resident.append(drop_page_cache(path))
                cold.append(read_pass(reader, manifest, e))
            row_bytes = a * k * d * (1 if dtype == "int8" else 2) + (a * k * 2 if dtype == "int8" else 0) + a * 20
            r = {"shape": shape, "dtype": dtype, "rows": rows, "shard_rows": shard_rows, "A": a, "K": k, "d": d,
                 "row_bytes": row_bytes,
                 "warm_rows_per_s": sum(x[0] for x in warm) / sum(x[2] for x in warm),
                 "cold_rows_per_s": sum(x[0] for x in cold) / sum(x[2] for x in cold),
                 "copies_per_row": sum(x[1] for x in warm) / sum(x[0] for x in warm),
                 "resident_after_drop": resident, "student": student}
            r["warm_vs_student"] = r["warm_rows_per_s"] / student["images_per_s"]
            r["cold_vs_student"] = r["cold_rows_per_s"] / student["images_per_s"]
            out.append(r)
            log(f"[reads {shape} {dtype}] warm {r['warm_rows_per_s']:,.0f} rows/s, cold {r['cold_rows_per_s']:,.0f} "
                f"rows/s ({100 * max(resident):.1f}% resident after the drop); student {arch} "
                f"{student['images_per_s']:.1f} img/s -> {r['warm_vs_student']:.0f}x / {r['cold_vs_student']:.0f}x")
    return out


def student_rate(arch: str, px: int, channels: int, batch: int, k: int, d: int, runtime: Runtime,
                 steps: int = 3) -> dict:
    """images/s of the CBD student's training step alone (K cached teachers of size d), on one random batch."""
    torch.manual_seed(0)
    net = runtime.prepare_model(Network(arch, channels, 10, 20.0, projection_dim(descriptor_dim(arch), [d] * k)))
    opt = make_optimizer(net, TrainCfg(lr=0.01))
    x = runtime.to_device(torch.rand(batch, channels, px, px))
    y = torch.randint(0, 10, (batch,), device=runtime.device)
    t = normalize_per_teacher(torch.randn(batch, k * d, device=runtime.device), [d] * k)
    times = []
    for i in range(steps + 1):
        with Timer(runtime.device) as tm:
            with runtime.autocast():
                logits, e = net(x)
                loss, _ = cbd_loss(logits, y, e, t, 0.4, 100.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i:
            times.append(tm.seconds)
    return {"arch": arch, "image_px": px, "batch_size": batch, "step_s": float(np.median(times)),
            "images_per_s": batch / float(np.median(times))}


# ------------------------------------------------------------------------------------------ export
def bench_export(case: str, root: Path, runtime: Runtime, rounds: int, extra: tuple[str, ...] = ()) -> dict:
    """export_cache wall time against the same teachers' forward over the same batches, preloaded.

    The two alternate for `rounds` rounds (export first in rounds 1, 3, ..., plain first in 2, 4, ...)
    and each round gives one ratio: this machine's speed drifts by +-10 % over minutes, so a ratio
    of two timings taken side by side is the stable quantity, and the median of the rounds' ratios
    is what is reported (with every round's).
    """
    cfg = bench_config(case, extra)
    wd = bench_workdir(case, root, cfg)
    fresh = Workdir(root / f"{case}-export")                 # same data and teachers, a cache of its own
    fresh.root.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "teachers"):
        link = fresh.root / sub
        if not link.exists():
            link.symlink_to((wd.root / sub).resolve())
    manifest = Manifest.load(wd.manifest)
    e = cfg.export
    views = manifest.train.num_samples * e.views
    # the same batches, decoded and replayed beforehand, through the same teachers
    names = [t.name for t in cfg.teachers]
    nets = [runtime.prepare_teacher(n) for n in load_teachers(cfg, wd, names)[0]]
    stream = ExportStream(manifest, list(range(len(manifest.train.shards))), ViewSpec.from_cfg(cfg.views),
                          cfg.pipeline.seed, e.views, e.batch_size)
    with Timer() as t_load:
        batches = [images for *_, images in stream]

    def plain() -> None:
        with torch.no_grad():
            for images in batches:
                x = runtime.to_device(images)
                with runtime.autocast():
                    for net in nets:
                        F.normalize(net.features(x).float(), dim=1).cpu()

    plain()   # warm-up: kernel selection and allocator caches for every batch shape, for both timings below

    def export() -> None:
        shutil.rmtree(fresh.cache, ignore_errors=True)
        export_cache(cfg, fresh, runtime)

    export_s, plain_s = [], []
    for r in range(rounds):
        t_export, t_plain = Timer(runtime.device), Timer(runtime.device)
        for timer, run in ((t_export, export), (t_plain, plain))[::1 if r % 2 == 0 else -1]:   # ABBA: drift cancels
            with timer:
                run()
        export_s.append(t_export.seconds)
        plain_s.append(t_plain.seconds)
        log(f"[export {case}] round {r + 1}/{rounds}: export {t_export.seconds:.2f}s, plain {t_plain.seconds:.2f}s "
            f"-> {t_plain.seconds / t_export.seconds:.3f}")
    ratios = [p / x for p, x in zip(plain_s, export_s)]
    # what any inference over the images pays too: decoding and replaying the views
    with_loading = [(p + t_load.seconds) / x for p, x in zip(plain_s, export_s)]
    r = {"case": case, "images": manifest.train.num_samples, "A": e.views, "K": len(nets), "batch_size": e.batch_size,
         "teacher_arch": cfg.teacher.arch, "rounds": rounds, "export_s": export_s, "plain_s": plain_s,
         "export_views_per_s": views / statistics.median(export_s), "plain_views_per_s": views / statistics.median(plain_s),
         "loader_alone_s": t_load.seconds, "export_vs_plain_per_round": ratios,
         "export_vs_plain": statistics.median(ratios),
         "export_vs_plain_with_loading": statistics.median(with_loading), "runtime": runtime_info(runtime)}
    log(f"[export {case}] export {r['export_views_per_s']:.1f} views/s, plain inference "
        f"{r['plain_views_per_s']:.1f} views/s -> median ratio {r['export_vs_plain']:.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f}); loader alone {t_load.seconds:.1f}s")
    return r


# ------------------------------------------------------------------------------------------- bytes
def bench_bytes(root: Path) -> list[dict]:
    out = []
    for shape, (_, shard_rows, a, k, d, *_rest) in SHAPES.items():
        rows = 2 * shard_rows
        manifest = synthetic_manifest(shape, rows, shard_rows)
        for dtype in ("float32", "float16", "int8"):
            path = root / f"bytes-{shape}-{dtype}.zarr"
            write_synthetic_cache(path, manifest, a, k, d, dtype)
            info = cache_info(path)
            desc = sum(v["bytes_stored"] for n, v in info["arrays"].items() if n.endswith(("/descriptors", "/scales")))
            per = rows * a * k
            out.append({"shape": shape, "dtype": dtype, "A": a, "K": k, "d": d, "rows": rows,
                        "descriptor_bytes_per_ivt": desc / per, "total_bytes_per_ivt": info["bytes_on_disk"] / per})
        f16 = next(x for x in out if x["shape"] == shape and x["dtype"] == "float16")
        for x in out:
            if x["shape"] == shape:
                x["descriptor_vs_float16"] = x["descriptor_bytes_per_ivt"] / f16["descriptor_bytes_per_ivt"]
                x["total_vs_float16"] = x["total_bytes_per_ivt"] / f16["total_bytes_per_ivt"]
    return out


# ---------------------------------------------------------------------------------------- markdown
def markdown(res: dict) -> str:
    lines = ["# Cache benchmarks", "", "{head}"]
    if res.get("reads"):
        lines += ["## Target reads in the student's access pattern (one process = one loader worker)", "",
                  "Shards in the epoch's order, one contiguous `CacheReader.read` per shard, one stored view and its "
                  "targets per class-balanced copy. Cold: fsync + POSIX_FADV_DONTNEED on every file before the pass "
                  "(fraction still resident per fincore in brackets). Student: the CBD student's training step alone "
                  "on one preloaded batch, same machine. Target: reads >= 10x the student's rate with 1 worker.", "",
                  "| row shape | dtype | bytes/row | warm rows/s | cold rows/s (resident) | student | student img/s | "
                  "warm ÷ student | cold ÷ student |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for r in res["reads"]:
            s = r["student"]
            lines.append(f"| {r['shape']} (A={r['A']}, K={r['K']}, d={r['d']}) | {r['dtype']} | {r['row_bytes']:,} | "
                         f"{r['warm_rows_per_s']:,.0f} | {r['cold_rows_per_s']:,.0f} "
                         f"({100 * max(r['resident_after_drop']):.1f}%) | {s['arch']} {s['image_px']} px, batch "
                         f"{s['batch_size']} | {s['images_per_s']:.1f} | {r['warm_vs_student']:,.0f}x | "
                         f"{r['cold_vs_student']:,.0f}x |")
        lines.append("")
    if res.get("export"):
        lines += ["## Export against plain teacher inference on the same batches", "",
                  "`export_cache` wall time (loader, K teachers, normalisation, Zarr writes, resumable bookkeeping) "
                  "against the same teachers' forward passes over the same batches, decoded and replayed beforehand. "
                  "The two alternate, round by round, in ABBA order (export first in odd rounds, plain first in even "
                  "ones); views/s from the median times, export ÷ plain the median of the "
                  "rounds' ratios. Target: export >= 0.9x plain inference. Last column: against plain inference "
                  "plus the loader alone (decoding and replaying the views, which any inference over the images pays), "
                  "i.e. what writing the cache itself costs.", "",
                  "| case | teachers | images x A | batch | export views/s | plain views/s | export ÷ plain | "
                  "per round | loader alone (s) | export ÷ (loader + plain) |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in res["export"]:
            rounds = ", ".join(f"{q:.3f}" for q in r["export_vs_plain_per_round"])
            lines.append(f"| {r['case']} | {r['K']} x {r['teacher_arch']} | {r['images']} x {r['A']} | {r['batch_size']} | "
                         f"{r['export_views_per_s']:.1f} | {r['plain_views_per_s']:.1f} | {r['export_vs_plain']:.3f} | "
                         f"{rounds} | {r['loader_alone_s']:.1f} | {r['export_vs_plain_with_loading']:.3f} |")
        lines.append("")
    if res.get("bytes"):
        lines += ["## Bytes on disk per (image · view · teacher)", "",
                  "From `cache info` of caches written by `CacheWriter`. Descriptors: `teachers/<t>/descriptors` (+ `scales` "
                  "for int8); total: the whole group (views, done-marks, metadata) divided by N·A·K.", "",
                  "| row shape | dtype | descriptor bytes | ÷ float16 | total bytes | ÷ float16 |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in res["bytes"]:
            lines.append(f"| {r['shape']} (A={r['A']}, K={r['K']}, d={r['d']}) | {r['dtype']} | "
                         f"{r['descriptor_bytes_per_ivt']:.2f} | {r['descriptor_vs_float16']:.4f} | "
                         f"{r['total_bytes_per_ivt']:.2f} | {r['total_vs_float16']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=("reads", "export", "bytes"), default=["reads", "export", "bytes"])
    ap.add_argument("--cases", nargs="+", choices=("small", "rn50"), default=["small", "rn50"], help="export cases")
    ap.add_argument("--export-rounds", type=int, default=5, help="alternating export / plain rounds per case")
    ap.add_argument("--root", default="runs/bench")
    ap.add_argument("--name", default="bench_cache")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for the export cases")
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    runtime = make_runtime(bench_config("small").pipeline)
    res: dict = {"runtime": runtime_info(runtime)}
    started = time.perf_counter()
    if "bytes" in a.parts:
        res["bytes"] = bench_bytes(root)
    if "reads" in a.parts:
        res["reads"] = bench_reads(root, runtime)
    if "export" in a.parts:
        res["export"] = [bench_export(case, root, runtime, a.export_rounds, tuple(a.overrides)) for case in a.cases]
    res["wall_s"] = time.perf_counter() - started
    write_results(a.name, res, markdown(res))
    print(markdown(res).replace("{head}", ""))


if __name__ == "__main__":
    main()
