"""`cbd-cache sweep --jobs 1` against `--jobs 2` on the smoke cache: wall time of the same grid, side by side.

One prepared smoke workdir (untrained teachers: a forward pass costs the same whatever the weights)
with its export is copied twice; each copy trains the same grid of students from scratch, once one
run after another in one process holding every core, once J runs at a time, one process each with
cores // J threads (what `sweep --jobs` gives them). Writes results/bench_sweep_jobs.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, untrained_teachers, write_results

from cbd_cache.config import load_config
from cbd_cache.data.prepare import prepare
from cbd_cache.stages.export import export_cache
from cbd_cache.system.runtime import cpu_count, make_runtime
from cbd_cache.workdir import Workdir

SMOKE = ROOT / "pipelines" / "smoke.toml"
ALPHAS = ("0", "0.2", "0.4", "0.6", "0.8", "1")


def sweep(wd: Path, jobs: int, alphas: list[str], epochs: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one `cbd-cache sweep` process, and each run's test top-1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(cpu_count())}
    args = [sys.executable, "-m", "cli", "sweep", "--pipeline", str(SMOKE), "--workdir", str(wd), "--jobs", str(jobs),
            "--set", f"student.epochs={epochs}", "--grid", f"student.alpha={','.join(alphas)}", "--seeds", "0",
            "--name", "bench"]
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rows = json.loads((wd / "sweeps" / "bench.json").read_text())["rows"]
    return seconds, {r["label"]: r["top1"]["mean"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_sweep_jobs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="grid points (student.alpha values), one seed each")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once in the parallel sweep")
    parser.add_argument("--epochs", type=int, default=2, help="student.epochs of every run")
    args = parser.parse_args()
    alphas = list(ALPHAS[:args.runs])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(SMOKE)
        base = Workdir(Path(tmp) / "base")
        prepare(cfg, base)
        untrained_teachers(cfg, base)
        export_cache(cfg, base, make_runtime(cfg.pipeline))
        results = {}
        for jobs in (1, args.jobs):
            wd = Path(tmp) / f"jobs{jobs}"
            shutil.copytree(base.root, wd)
            before = os.getloadavg()[0]
            seconds, top1 = sweep(wd, jobs, alphas, args.epochs)
            results[jobs] = {"wall_s": round(seconds, 1), "top1": top1,
                             "load_1min_before_after": [round(before, 1), round(os.getloadavg()[0], 1)]}
    one, many = results[1], results[args.jobs]
    cores = cpu_count()
    payload = {"runs": args.runs, "epochs": args.epochs, "cores": cores, "jobs": args.jobs,
               "jobs_1": one, f"jobs_{args.jobs}": many, "speedup": round(one["wall_s"] / many["wall_s"], 2)}
    same = one["top1"] == many["top1"]
    md = ("# `sweep --jobs`: wall time on the smoke cache\n\n{head}"
          f"{args.runs} student runs (`student.alpha` = {', '.join(alphas)}, seed 0, {args.epochs} epochs each) "
          "on a copy of one smoke workdir (prepared, untrained teachers, exported), timed as the whole "
          "`cbd-cache sweep` process, Python start-up included.\n\n"
          "| sweep | processes | threads each | wall s | machine load (1 min) before, after |\n|---|---:|---:|---:|---|\n"
          f"| `--jobs 1` | 1 | {cores} | {one['wall_s']} | {one['load_1min_before_after']} |\n"
          f"| `--jobs {args.jobs}` | {args.jobs} at a time (+ the sweep) | {max(1, cores // args.jobs)} | {many['wall_s']} "
          f"| {many['load_1min_before_after']} |\n\n"
          f"`--jobs {args.jobs}` / `--jobs 1`: {payload['speedup']}x. Per-run top-1 "
          f"{'identical' if same else 'differs in some runs (different thread counts round differently)'}.\n")
    write_results("bench_sweep_jobs", payload, md)


if __name__ == "__main__":
    main()
