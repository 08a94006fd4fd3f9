"""How export time, cache bytes and student throughput grow with N (images), A (views) and K (teachers),
three sizes each around the embedded default (Fashion-MNIST-LT, ResNet-8, 28 px: N = 2773, A = 8,
K = 4), and what that projects to for ImageNet-LT and iNaturalist18 at their default settings.

Each point is its own workdir: `prepare` (N through data.n_max), untrained teachers (speed does not
depend on the weights), `export_cache` timed end to end, `cache info` for the bytes, and the real
student loop on cached targets (TrainStream, DataLoader, engine.train_step) for its images/s.

The projection uses the cache schema (bytes = N * A * (K * d * bytes_per_value + 20 view bytes), int8
adding 2 bytes of scale per vector), checked here against every measured cache, and the ResNet-50
export rate that benchmarks/bench_cache.py measured on this machine (results/bench_cache.json).

The second part (`--parts lt`, benchmarks/scaling_lt.py) times every stage, with its peak memory, at
ImageNet-LT's size and shape (N = 115,846, C = 1,000) and at N/8, N/4 and N/2, to show each stays linear.

    .venv/bin/python benchmarks/bench_scaling.py                 # both parts
    .venv/bin/python benchmarks/bench_scaling.py --parts lt --lt-fractions 0.0156 0.0313   # a quick look

Writes results/scaling.{md,json}. Run it on a quiet machine (here: under flock /tmp/cbd-cpu.lock).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import (
    RESULTS,
    ROOT,
    Timer,
    bench_config,
    runtime_info,
    train_images_per_s,
    untrained_teachers,
    write_results,
)
from scaling_lt import FRACTIONS, lt_markdown, run_lt
from torch.utils.data import DataLoader

from cbd_cache.cache.info import cache_info
from cbd_cache.cache.reader import CacheReader
from cbd_cache.cache.schema import default_chunk_views, make_layout
from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import prepare
from cbd_cache.data.shards import read_labels
from cbd_cache.loaders import CacheSpec, TrainStream
from cbd_cache.models.networks import Network, descriptor_dim, projection_dim
from cbd_cache.stages.export import export_cache
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.seeding import seed_everything
from cbd_cache.tools.dryrun import projected_cache_bytes
from cbd_cache.train.engine import cosine_schedule, make_optimizer
from cbd_cache.train.steps import distillation_step
from cbd_cache.views import VIEW_FIELDS, ViewSpec
from cbd_cache.workdir import Workdir

N_MAX = {320: "N/4", 640: "N/2", 1280: "N"}
POINTS = [("N", 320, 8, 4), ("N", 640, 8, 4), ("N", 1280, 8, 4),
          ("A", 1280, 2, 4), ("A", 1280, 4, 4), ("A", 1280, 8, 4),
          ("K", 1280, 8, 1), ("K", 1280, 8, 2), ("K", 1280, 8, 4)]
# ImageNet-LT (Liu et al. 2019) and iNaturalist 2018 training-set sizes; pipelines/{imagenet_lt,inat18}.toml
DATASETS = {"ImageNet-LT": ("imagenet_lt.toml", 115_846), "iNaturalist18": ("inat18.toml", 437_513)}


def schema_bytes(cfg, n: int, dtype: str) -> int:
    """Bytes of a uniform cache's chunks by the schema (`cache.Layout`), before the CRC32C per chunk; metadata not counted."""
    size, a = cfg.data.shard_size, cfg.export.views
    layout = make_layout([[lo, min(lo + size, n)] for lo in range(0, n, size)], np.full(n, a),
                         cfg.export.chunk_views or default_chunk_views(size, a))
    return sum(layout.array_bytes({t.name: descriptor_dim(t.arch) for t in cfg.teachers}, dtype, 0, False).values())


def chunk_file_bytes(cfg, manifest: Manifest) -> int:
    """What the cache's chunk files hold by the schema: every array's bytes (`dryrun.projected_cache_bytes`),
    a 4-byte CRC32C per chunk, and a done-mark byte (with its CRC) per shard for the views and each teacher."""
    arrays = projected_cache_bytes(cfg, read_labels(manifest, "train"), manifest.train.class_counts)
    e, shards = cfg.export, len(manifest.train.shards)
    views_total = arrays["views"] // (len(VIEW_FIELDS) * 4)          # V, padding included
    chunk_views = e.chunk_views or default_chunk_views(cfg.data.shard_size, e.views)
    chunks = (len(arrays) - 2) * views_total // chunk_views + 2     # the per-view arrays, then view_count, view_offset
    return sum(arrays.values()) + 4 * chunks + (1 + len(cfg.teachers)) * shards * (1 + 4)


def student_rate(cfg, wd: Workdir, runtime, teachers: list[str], warmup: int, steps: int) -> float:
    s = cfg.student
    manifest = Manifest.load(wd.manifest)
    reader = CacheReader(wd.cache, manifest, teachers)
    seed_everything(s.seed)
    net = runtime.prepare_model(Network(s.arch, manifest.channels, manifest.num_classes, s.gamma,
                                        projection_dim(descriptor_dim(s.arch), reader.dims)))
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=s.sampling, seed=s.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=s.shuffle_buffer,
                         cache=CacheSpec(wd.cache, tuple(teachers), reader.views))
    batches = iter(DataLoader(stream, batch_size=s.batch_size, **runtime.loader_kwargs()))
    opt = make_optimizer(net, s)
    sched = cosine_schedule(opt, 10**6)
    step = distillation_step(runtime, reader.dims, s)
    train_images_per_s(net, batches, warmup, opt, sched, step, runtime, s.batch_size)
    return train_images_per_s(net, batches, steps, opt, sched, step, runtime, s.batch_size)


def run_point(root: Path, n_max: int, a: int, k: int, warmup: int, steps: int) -> dict:
    cfg = bench_config("small", (f"data.n_max={n_max}", f"export.views={a}"))
    cfg.teachers = cfg.teachers[:k]
    data = Workdir(root / f"data_nmax{n_max}")
    prepare(cfg, data)
    untrained_teachers(cfg, data)
    wd = Workdir(root / f"nmax{n_max}_A{a}_K{k}")
    wd.root.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "teachers"):
        if not (wd.root / sub).exists():
            (wd.root / sub).symlink_to((data.root / sub).resolve())
    runtime = make_runtime(cfg.pipeline)
    info = cache_info(wd.cache) if wd.cache.exists() else None
    if info is None or not info["complete"]:
        with Timer() as t:
            export_cache(cfg, wd, runtime)
        export_s = t.seconds
        (wd.root / "export_s.json").write_text(json.dumps(export_s))
    export_s = json.loads((wd.root / "export_s.json").read_text())
    info = cache_info(wd.cache)
    manifest = Manifest.load(wd.manifest)
    n = manifest.train.num_samples
    rate = student_rate(cfg, wd, runtime, [t.name for t in cfg.teachers], warmup, steps)
    chunk_bytes = sum(f.stat().st_size for f in wd.cache.rglob("*") if f.is_file() and "/c/" in str(f))
    r = {"N": n, "A": a, "K": k, "export_s": export_s, "export_us_per_ivt": 1e6 * export_s / (n * a * k),
         "cache_bytes": info["bytes_on_disk"], "chunk_bytes": chunk_bytes,
         "schema_bytes": chunk_file_bytes(cfg, manifest),
         "student_images_per_s": rate,
         "runtime": runtime_info(runtime)}
    log(f"[scaling] N={n} A={a} K={k}: export {export_s:.1f}s ({r['export_us_per_ivt']:.1f} us per image.view.teacher), "
        f"cache {info['bytes_on_disk'] / 2**20:.2f} MiB, student {rate:.0f} img/s")
    return r


def projections(points: list[dict]) -> list[dict]:
    """Cache bytes by the schema; CPU export time from bench_cache's ResNet-50 rate (K = 4 teachers)."""
    bench = RESULTS / "bench_cache.json"
    rn50 = None
    if bench.is_file():
        rn50 = next((e for e in json.loads(bench.read_text()).get("export", []) if e["case"] == "rn50"), None)
    out = []
    for name, (toml, n) in DATASETS.items():
        cfg = load_config(ROOT / "pipelines" / toml)
        a, k, d = cfg.export.views, len(cfg.teachers), descriptor_dim(cfg.teacher.arch)
        row = {"dataset": name, "N": n, "A": a, "K": k, "d": d, "teacher_arch": cfg.teacher.arch,
               "bytes": {dt: schema_bytes(cfg, n, dt) for dt in ("float16", "int8")}}
        if rn50:
            per_view = 1.0 / rn50["export_views_per_s"] * k / rn50["K"]     # seconds per view for K teachers
            row["cpu_export_s"] = n * a * per_view
            row["cpu_export_basis"] = (f"{rn50['export_views_per_s']:.2f} views/s for {rn50['K']} x "
                                       f"{rn50['teacher_arch']} at 224 px (results/bench_cache.json)")
        out.append(row)
    return out


def markdown(res: dict) -> str:
    lines = ["# Scaling: export time, cache bytes and student throughput against N, A and K", "", "{head}"]
    if res.get("points"):
        lines += small_markdown(res)
    if res.get("lt"):
        lines += lt_markdown(res["lt"])
    return "\n".join(lines) + "\n"


def small_markdown(res: dict) -> list[str]:
    lines = ["Embedded default (Fashion-MNIST-LT, 28 px, untrained ResNet-8 teachers, d = 64, float16), one axis "
             "varied at a time. Export: `export_cache` end to end. Student: the CBD student on cached targets, real "
             "loop, images/s. Schema bytes, chunk files only: V·(20 + K·d·2) + 12·N by the layout (V: the flat views, "
             "each shard's block padded to whole chunks; `dryrun.projected_cache_bytes`), a 4-byte CRC32C per chunk, "
             "and a done-mark byte (with its CRC) per shard for the views and for each teacher.", "",
             "| varied | N | A | K | export (s) | µs per image·view·teacher | cache on disk (MiB) | chunk bytes = "
             "schema? | student img/s |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for axis, r in zip([p[0] for p in POINTS], res["points"]):
        lines.append(f"| {axis} | {r['N']} | {r['A']} | {r['K']} | {r['export_s']:.1f} | {r['export_us_per_ivt']:.1f} | "
                     f"{r['cache_bytes'] / 2**20:.2f} | {'yes' if r['chunk_bytes'] == r['schema_bytes'] else 'no'} "
                     f"({r['chunk_bytes']:,}) | {r['student_images_per_s']:.0f} |")
    lines += ["", "## Projection at the default settings (A = 8, K = 4, ResNet-50, d = 2048)", "",
              "| dataset | N | cache float16 | cache int8 | export on this CPU |", "|---|---:|---:|---:|---:|"]
    for p in res["projections"]:
        cpu = f"{p['cpu_export_s'] / 86400:.1f} days" if "cpu_export_s" in p else "run bench_cache.py first"
        lines.append(f"| {p['dataset']} | {p['N']:,} | {p['bytes']['float16'] / 1e9:.1f} GB | "
                     f"{p['bytes']['int8'] / 1e9:.1f} GB | {cpu} |")
    basis = next((p["cpu_export_basis"] for p in res["projections"] if "cpu_export_basis" in p), None)
    if basis:
        lines += ["", f"CPU export time = N·A / ({basis}); the export is linear in N·A·K (table above)."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/bench/scaling")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--parts", nargs="+", choices=("small", "lt"), default=["small", "lt"])
    ap.add_argument("--lt-fractions", nargs="+", type=float, default=list(FRACTIONS),
                    help="fractions of ImageNet-LT's N for the lt part")
    a = ap.parse_args()
    root = Path(a.root)
    res: dict = {}
    if "small" in a.parts:
        points = {}
        for _, n_max, views, k in POINTS:
            if (n_max, views, k) not in points:
                points[(n_max, views, k)] = run_point(root, n_max, views, k, a.warmup, a.steps)
        res = {"points": [points[(n, v, k)] for _, n, v, k in POINTS], "projections": projections(list(points.values()))}
    if "lt" in a.parts:
        res["lt"] = run_lt(root / "lt", tuple(a.lt_fractions))
    write_results("scaling", res, markdown(res))
    print(markdown(res).replace("{head}", ""))


if __name__ == "__main__":
    main()
