"""Does the cache make stage 2 cost what the student alone costs? Three variants of one student, in one
process, on the same data, with the real stream, loader, step functions and training loop:

    (a) none    cross-entropy only, same class-balanced sampler and loader
    (b) cache   targets read from the cache (and the cached views replayed)
    (c) online  the K teachers run on every batch (fresh views)

Each round trains every variant for `--warmup` then `--steps` steps (the loaders of the variants not
being measured sit idle with full queues); images/s is summed over `--rounds` rounds. The ideal b/c
is what b/c would be if data cost nothing: (t_step + K * t_teacher) / t_step, with the student's step
and each teacher's forward timed on one preloaded batch in this process.

    .venv/bin/python benchmarks/bench_student.py                # small (K = 1, 4) and rn50 (K = 4)
    .venv/bin/python benchmarks/bench_student.py --case small --rounds 2
    .venv/bin/python benchmarks/bench_student.py --case draws      # the small case on a draws-allocated cache,
                                                                   # with (b') a uniform cache in the same rounds

Writes results/bench_student.{md,json}. Run it on a quiet machine (here: under flock /tmp/cbd-cpu.lock).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Timer, bench_config, bench_workdir, runtime_info, train_images_per_s, write_results
from torch.utils.data import DataLoader

from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import CacheSpec, TrainStream
from cbd_cache.models.networks import Network, descriptor_dim, projection_dim
from cbd_cache.stages.export import export_cache, load_teachers
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime, make_runtime
from cbd_cache.system.seeding import seed_everything
from cbd_cache.train.engine import cosine_schedule, make_optimizer
from cbd_cache.train.steps import cross_entropy_step, distillation_step, online_step
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

CASES = {"small": dict(ks=(1, 4), warmup=8, steps=40, rounds=5),
         "draws": dict(ks=(4,), warmup=8, steps=40, rounds=5),      # small, on a draws-allocated (ragged) cache
         "rn50": dict(ks=(4,), warmup=1, steps=4, rounds=2)}


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    batches: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_fn: object
    rates: list


def make_variant(name: str, targets: str, cfg: Config, wd: Workdir, manifest: Manifest, runtime: Runtime,
                 teachers: list[str], teacher_nets: list[torch.nn.Module]) -> Variant:
    """The student as `train_student` builds it for `targets` = none | cache | online."""
    s = cfg.student
    cache, dims = None, []
    if targets == "none":
        step_fn = cross_entropy_step(runtime)
    elif targets == "cache":
        reader = CacheReader(wd.cache, manifest, teachers)
        dims, cache = reader.dims, CacheSpec(wd.cache, tuple(teachers), reader.views)
        step_fn = distillation_step(runtime, dims, s)
    else:
        dims = [n.dim for n in teacher_nets]
        step_fn = online_step(runtime, s, teacher_nets)
    seed_everything(s.seed)
    net = runtime.prepare_model(Network(s.arch, manifest.channels, manifest.num_classes, s.gamma,
                                        projection_dim(descriptor_dim(s.arch), dims)))
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=s.sampling, seed=s.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=s.shuffle_buffer, cache=cache)
    model = torch.compile(net) if runtime.compile else net
    batches = iter(DataLoader(stream, batch_size=s.batch_size, **runtime.loader_kwargs()))
    optimizer = make_optimizer(net, s)
    return Variant(name, model, batches, optimizer, cosine_schedule(optimizer, 10**6), step_fn, [])


def train_rate(v: Variant, steps: int, runtime: Runtime, batch_size: int) -> float:
    """images/s of `steps` steps of the real training loop on the variant's loader."""
    return train_rate_on(v, v.batches, steps, runtime, batch_size)


def step_seconds(v: Variant, batch: tuple, runtime: Runtime, steps: int, batch_size: int) -> float:
    """Seconds per step of the real training loop fed one preloaded batch over and over: all but the data."""
    train_rate_on(v, itertools.repeat(batch), 2, runtime, batch_size)
    return batch_size / train_rate_on(v, itertools.repeat(batch), steps, runtime, batch_size)


def train_rate_on(v: Variant, batches, steps: int, runtime: Runtime, batch_size: int) -> float:
    return train_images_per_s(v.model, batches, steps, v.optimizer, v.scheduler, v.step_fn, runtime, batch_size)


@torch.no_grad()
def forward_seconds(net: torch.nn.Module, images: torch.Tensor, runtime: Runtime, repeats: int) -> float:
    """Median seconds of one teacher's eval-mode forward (descriptor, normalised) on a preloaded batch."""
    x = runtime.to_device(images)
    times = []
    for i in range(repeats + 1):
        with Timer(runtime.device) as t, runtime.autocast():
            F.normalize(net.features(x).float(), dim=1)
        if i:
            times.append(t.seconds)
    return statistics.median(times)


def loader_rate(v: Variant, batches: int, batch_size: int) -> float:
    """images/s the variant's loader delivers with nothing else running (its queue drained first)."""
    for _ in range(8):
        next(v.batches)
    with Timer() as t:
        for _ in range(batches):
            next(v.batches)
    return batches * batch_size / t.seconds


def run_case(case: str, root: Path, rounds: int | None, steps: int | None, warmup: int | None,
             extra: tuple[str, ...]) -> list[dict]:
    opts = CASES[case]
    rounds, steps, warmup = rounds or opts["rounds"], steps or opts["steps"], warmup or opts["warmup"]
    cfg = bench_config(case, extra)
    wd = bench_workdir(case, root, cfg)
    runtime = make_runtime(cfg.pipeline)
    export_cache(cfg, wd, runtime)
    manifest = Manifest.load(wd.manifest)
    kmax = max(opts["ks"])
    names = [t.name for t in cfg.teachers][:kmax]
    nets, _ = load_teachers(cfg, wd, names)
    nets = [runtime.prepare_teacher(n) for n in nets]
    bs = cfg.student.batch_size
    variants = {"a": make_variant("a none", "none", cfg, wd, manifest, runtime, [], [])}
    for k in opts["ks"]:
        variants[f"b{k}"] = make_variant(f"b cache K={k}", "cache", cfg, wd, manifest, runtime, names[:k], [])
        if case == "draws":   # the same student on a uniform cache of the same data and teachers, in every round
            uniform = bench_config("small", extra)
            wd_u = Workdir(wd.root, cache_url=str(wd.root / "cache_uniform.zarr"))
            export_cache(uniform, wd_u, runtime)
            variants[f"u{k}"] = make_variant(f"b' uniform cache K={k}", "cache", uniform, wd_u, manifest, runtime,
                                             names[:k], [])
        variants[f"c{k}"] = make_variant(f"c online K={k}", "online", cfg, wd, manifest, runtime, names[:k], nets[:k])
    log(f"[bench {case}] {cfg.student.arch} student, batch {bs}, {runtime_info(runtime)}; "
        f"{rounds} rounds x {len(variants)} variants x ({warmup} warm-up + {steps} timed steps)")
    for r in range(rounds):
        for key, v in variants.items():
            train_rate(v, warmup, runtime, bs)
            v.rates.append(train_rate(v, steps, runtime, bs))
            log(f"[bench {case}] round {r + 1}: {v.name}: {v.rates[-1]:.1f} img/s")
    # compute alone, on one preloaded batch from the cache variant's loader
    repeats = max(3, steps // 2)
    big = variants[f"b{kmax}"]
    batch = next(big.batches)
    t_teacher = [forward_seconds(n, batch[0], runtime, repeats) for n in nets]
    t_a = step_seconds(variants["a"], batch, runtime, repeats, bs)
    loaders = {key: loader_rate(v, max(4, steps // 2), bs) for key, v in variants.items()}
    rows = []
    for k in opts["ks"]:
        b_batch = next(variants[f"b{k}"].batches)
        t_b = step_seconds(variants[f"b{k}"], b_batch, runtime, repeats, bs)
        rate = {x: sum(steps * bs for _ in variants[key].rates) / sum(steps * bs / q for q in variants[key].rates)
                for x, key in (("a", "a"), ("b", f"b{k}"), ("c", f"c{k}"))}
        ideal_bc = (t_b + sum(t_teacher[:k])) / t_b
        row = {"case": case, "K": k, "arch": cfg.student.arch, "image_px": cfg.views.image_px, "batch_size": bs,
               "images_per_s": rate, "per_round": {x: variants[key].rates for x, key in
                                                    (("a", "a"), ("b", f"b{k}"), ("c", f"c{k}"))},
               "b_over_a": rate["b"] / rate["a"], "b_over_c": rate["b"] / rate["c"], "ideal_b_over_c": ideal_bc,
               "b_over_c_vs_ideal": rate["b"] / rate["c"] / ideal_bc,
               "ideal_b_over_a": t_a / t_b,
               "step_s": {"a": t_a, "b": t_b}, "teacher_forward_s": t_teacher[:k],
               "loader_images_per_s": {x: loaders[key] for x, key in (("a", "a"), ("b", f"b{k}"), ("c", f"c{k}"))},
               "runtime": runtime_info(runtime), "rounds": rounds, "steps": steps, "warmup": warmup}
        if f"u{k}" in variants:
            u = variants[f"u{k}"].rates
            row["images_per_s"]["u"] = steps * bs * len(u) / sum(steps * bs / q for q in u)
            row["per_round"]["u"] = u
            row["b_over_u"] = rate["b"] / row["images_per_s"]["u"]
            row["per_round_ratios"] = {
                "b/a": [b / a for b, a in zip(row["per_round"]["b"], row["per_round"]["a"])],
                "u/a": [b / a for b, a in zip(u, row["per_round"]["a"])],
                "b/u": [b / a for b, a in zip(row["per_round"]["b"], u)]}
        rows.append(row)
        log(f"[bench {case}] K={k}: a {rate['a']:.1f}  b {rate['b']:.1f}  c {rate['c']:.1f} img/s;  "
            f"b/a {row['b_over_a']:.3f}  b/c {row['b_over_c']:.2f}  ideal b/c {ideal_bc:.2f}  "
            f"(b/c = {row['b_over_c_vs_ideal']:.3f} x ideal)")
    del variants
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Stage-2 throughput: no distillation (a), cached targets (b), online teachers (c)", "", "{head}",
             "Each variant is the real student (`TrainStream`, `DataLoader`, `engine.train_step`, the step functions "
             "of `student.py`); images/s summed over the rounds. Ideal b/c = (t_step + K t_teacher) / t_step from "
             "one preloaded batch; ideal b/a = t_step(a) / t_step(b) likewise: what the CBD student's own head "
             "(projection h, cosine loss, its optimiser state) costs with data for free. Targets: b/a >= 0.95, "
             "b/c >= 0.9 x ideal (K = 4).", "",
             "| case | K | batch | a img/s | b img/s | c img/s | b/a | ideal b/a | b/c | ideal b/c | b/c ÷ ideal | "
             "student step (b) | teacher fwd | loader img/s (a / b / c) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        q = r["images_per_s"]
        ld = r["loader_images_per_s"]
        lines.append(
            f"| {r['case']} ({r['arch']}, {r['image_px']} px) | {r['K']} | {r['batch_size']} | {q['a']:.1f} | "
            f"{q['b']:.1f} | {q['c']:.1f} | {r['b_over_a']:.3f} | {r['ideal_b_over_a']:.3f} | {r['b_over_c']:.2f} | {r['ideal_b_over_c']:.2f} | "
            f"{r['b_over_c_vs_ideal']:.3f} | {1000 * r['step_s']['b']:.1f} ms | "
            f"{1000 * statistics.mean(r['teacher_forward_s']):.1f} ms x {r['K']} | "
            f"{ld['a']:.0f} / {ld['b']:.0f} / {ld['c']:.0f} |")
    for r in rows:
        if "per_round_ratios" in r:
            lines += rounds_table(r)
    return "\n".join(lines) + "\n"


def rounds_table(r: dict) -> list[str]:
    """The draws case round by round: a, b on the draws cache, u (b on a uniform cache), c, and the ratios' spread."""
    pr, ratios = r["per_round"], r["per_round_ratios"]
    lines = ["", f"## {r['case']}: round by round (each round runs a, b, u, c in turn)", "",
             "b: the student on the draws cache; u: the same student on a uniform cache of the same data and teachers.",
             "", "| round | a img/s | b img/s | u img/s | c img/s | b/a | u/a | b/u |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(len(pr["a"])):
        lines.append(f"| {i + 1} | {pr['a'][i]:.1f} | {pr['b'][i]:.1f} | {pr['u'][i]:.1f} | {pr['c'][i]:.1f} | "
                     + " | ".join(f"{ratios[k][i]:.3f}" for k in ("b/a", "u/a", "b/u")) + " |")
    lines += ["", "| ratio | median | min | max | mean ± std over rounds |", "|---|---:|---:|---:|---:|"]
    for name, v in ratios.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {name} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} | "
                     f"{statistics.mean(v):.3f} ± {sd:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=(*CASES, "all"), default="all")
    ap.add_argument("--root", default="runs/bench", help="workdirs for the benchmark data, teachers and caches")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="bench_student", help="results/<name>.{md,json}")
    a = ap.parse_args()
    rows = []
    for case in (tuple(CASES) if a.case == "all" else (a.case,)):
        rows += run_case(case, Path(a.root), a.rounds, a.steps, a.warmup, tuple(a.overrides))
    write_results(a.name, {"rows": rows}, markdown(rows))
    print(markdown(rows).replace("{head}", ""))


if __name__ == "__main__":
    main()
