"""The cost curve at ImageNet-LT's shape: time and peak memory of each stage at N/8, N/4, N/2 and N.

A synthetic source with ImageNet-LT's size and shape (N = 115,846 training images in C = 1,000
classes, 1,280 -> 5 images per class: `lt_profile`) and tiny images (8 px PNG gratings, so that the
bookkeeping, not the pixels, is what grows), cut to a fraction f of every class (at least one image
each). Each stage runs in a process of its own, so its peak RSS is its own:

    prepare   `prepare` (source read in worker processes, shards, manifest)
    export    one untrained ResNet-8 teacher (d = 64) over the draws allocation's A = 8 views per image
    stream    one epoch of the student's class-balanced stream on that draws cache (decode, replay,
              targets; no network), batches of 256 in the main process
    verify    `cache verify` (every chunk read and checked, 64 rows recomputed)
    evaluate  `evaluate_network` of the teacher over the test split (20 f images per class)

Time per image is each stage's seconds (after its imports) over the images it handles (the training
images; the test images for evaluate). A stage is linear if that stays within +-25 % from N/8 to N.

    .venv/bin/python benchmarks/bench_scaling.py --parts lt       # (bench_scaling.py writes the results)
    .venv/bin/python benchmarks/scaling_lt.py STAGE ROOT FRACTION # one stage, in a process of its own
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, untrained_teachers
from torch.utils.data import DataLoader

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import prepare
from cbd_cache.data.sources import Record, Synthetic
from cbd_cache.loaders import CacheSpec, TrainStream
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.stages.export import export_cache
from cbd_cache.system.runtime import make_runtime
from cbd_cache.tools.verify import verify_cache
from cbd_cache.train.evaluation import evaluate_network
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

N_IMAGENET_LT, C_IMAGENET_LT = 115_846, 1_000
STAGES = ("prepare", "export", "stream", "verify", "evaluate")
FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def lt_profile(total: int = N_IMAGENET_LT) -> np.ndarray:
    """ImageNet-LT's class counts in shape, summing to `total`: 1,280 -> 5 over 1,000 classes, with 383 many-shot
    (> 100), 483 medium and 134 few-shot (< 20) classes (Liu et al.'s split: 385 / 479 / 136).

    log n is piecewise linear in log rank through (1, 1280), (385.5, 100), (864.5, 20), (1000, 5), the head's
    segment bent by an exponent (found by bisection) so that the counts sum to `total`; the rounding's
    remainder goes one image each to the classes after the first. (data.longtail's profiles at 1,280 -> 5
    over 1,000 classes hold more: exponential 229,853 images, imagenet_lt_shape 204,111.)
    """
    logr = np.log(np.arange(1, C_IMAGENET_LT + 1))
    knots = np.log([1, 385.5, 864.5, 1000]), np.log([1280, 100, 20, 5])

    def counts(p: float) -> np.ndarray:
        t = np.clip(logr / knots[0][1], 0, 1)
        head = knots[1][0] + (knots[1][1] - knots[1][0]) * t ** p
        log_n = np.where(logr < knots[0][1], head, np.interp(logr, *knots))
        return np.floor(np.exp(log_n) + 0.5).astype(np.int64)
    lo, hi = 1.0, 20.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() < total else (lo, mid)
    c = counts(lo)
    c[1:1 + total - int(c.sum())] += 1
    assert c.sum() == total and c[0] == 1280 and c[-1] == 5
    return c


def stage_config(fraction: float):
    cfg = load_config(ROOT / "pipelines" / "imagenet_lt.toml",
                      ("data.format=synthetic", "data.profile=none", f"data.num_classes={C_IMAGENET_LT}",
                       "data.image_px=8", f"data.test_per_class={max(1, round(20 * fraction))}",
                       f"data.n_max={int(round(1280 * fraction))}", "views.image_px=8", "views.eval_resize_px=0",
                       "teacher.arch=resnet8", "student.arch=resnet8", "export.allocation=draws",
                       "pipeline.device=cpu", "pipeline.workers=-1"))
    cfg.teachers = cfg.teachers[:1]
    return cfg


def source(cfg, fraction: float) -> Synthetic:
    counts = np.maximum(1, np.floor(lt_profile() * fraction + 0.5)).astype(int).tolist()

    class LongTail(Synthetic):
        """The synthetic reader with `counts[c]` training images in class c."""

        def records(self, split: str) -> list[Record]:
            if split != "train":
                return super().records(split)
            return [Record(f"train-{c:04d}-{j:05d}", c, ("train", c, j)) for c in range(len(counts))
                    for j in range(counts[c])]
    return LongTail(cfg.data)


def own_peak_kib() -> int:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux keeps that across fork and exec, so
    a stage started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_stage(stage: str, root: Path, fraction: float) -> dict:
    """One stage at one fraction, in this process: {"seconds", "images", "peak_rss_mib"}."""
    cfg = stage_config(fraction)
    wd = Workdir(root / f"f{fraction:g}")
    runtime = make_runtime(cfg.pipeline)
    name = cfg.teachers[0].name
    rss0 = own_peak_kib() / 1024
    t0 = time.perf_counter()
    if stage == "prepare":
        prepare(cfg, wd, source(cfg, fraction))
    manifest = Manifest.load(wd.manifest)
    images = manifest.train.num_samples
    if stage == "export":
        untrained_teachers(cfg, wd)
        t0 = time.perf_counter()
        export_cache(cfg, wd, runtime)
    elif stage == "stream":
        stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="class_balanced", seed=0,
                             samples_per_epoch=images, shuffle_buffer=cfg.student.shuffle_buffer,
                             cache=CacheSpec(wd.cache, (name,), cfg.export.views))
        batches = iter(DataLoader(stream, batch_size=256, num_workers=0))
        for _ in range(images // 256):
            next(batches)
    elif stage == "verify":
        report = verify_cache(wd.cache, manifest, {name: wd.teacher_checkpoint(name)}, runtime)
        assert not report["problems"], report["problems"]
    elif stage == "evaluate":
        net, _ = load_checkpoint(wd.teacher_checkpoint(name))
        report = evaluate_network(net, manifest, cfg, runtime)
        images = report["num_test"]
    seconds = time.perf_counter() - t0
    peak = max(own_peak_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"stage": stage, "fraction": fraction, "N": manifest.train.num_samples, "images": images,
            "seconds": seconds, "us_per_image": 1e6 * seconds / images, "peak_rss_mib": peak / 1024,
            "rss_after_imports_mib": rss0}


def run_lt(root: Path, fractions: tuple[float, ...] = FRACTIONS, stages: tuple[str, ...] = STAGES) -> list[dict]:
    """Every stage at every fraction, smallest first, each in a fresh process."""
    rows = []
    for f in fractions:
        for stage in stages:
            out = subprocess.run([sys.executable, __file__, stage, str(root), str(f)], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
            if out.returncode != 0:
                raise RuntimeError(f"{stage} at N x {f} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"[scaling lt] N={r['N']} {stage}: {r['seconds']:.1f}s, {r['us_per_image']:.1f} us/image, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def lt_markdown(rows: list[dict]) -> list[str]:
    fractions = sorted({r["fraction"] for r in rows})
    ns = {f: next(r["N"] for r in rows if r["fraction"] == f) for f in fractions}
    lines = ["", "## At ImageNet-LT's shape: N up to 115,846, C = 1,000", "",
             "Synthetic source, 1,280 -> 5 images per class (`scaling_lt.lt_profile`), 8 px images, cut to N/8 .. N "
             "(each class to the fraction, at least one image); one untrained ResNet-8 teacher (d = 64), draws "
             "allocation, A = 8; each stage in a process of its own (benchmarks/scaling_lt.py says what each "
             "does). µs per image: the stage's seconds over its images (training images; the test split's, "
             "20 per class at N, for evaluate). Linear: µs per image at N within ±25 % of N/8's.", "",
             "| stage | " + " | ".join(f"N = {ns[f]:,}" for f in fractions) + " | µs per image, largest N ÷ smallest "
             "| peak RSS MiB |",
             "|---|" + "---:|" * len(fractions) + "---:|---|"]
    for stage in STAGES:
        mine = {r["fraction"]: r for r in rows if r["stage"] == stage}
        if not mine:
            continue
        cells = [f"{mine[f]['seconds']:.1f} s ({mine[f]['us_per_image']:.0f} µs)" if f in mine else "" for f in fractions]
        lo, hi = mine[fractions[0]], mine[fractions[-1]]
        change = hi["us_per_image"] / lo["us_per_image"]
        verdict = f"{change:.2f}" + (" (linear)" if abs(change - 1) <= 0.25 else " (grows faster than N)"
                                     if change > 1 else " (fixed costs show at the small end)")
        rss = " / ".join(f"{mine[f]['peak_rss_mib']:.0f}" for f in fractions if f in mine)
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {verdict} | {rss} |")
    return lines


if __name__ == "__main__":
    stage_name, root_dir, frac = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(run_stage(stage_name, root_dir, frac)))
