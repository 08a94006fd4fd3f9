"""Prepare throughput and memory on photo-sized JPEGs: img/s, MB/s and peak RSS, by dataset size and workers.

Generates an ImageFolder of 500x375 JPEGs (ImageNet's typical size; smoothed noise so they compress
like photos, ~40-60 KB), then times `cbd-cache prepare` on the first N of them. Peak RSS of the
prepare process and of its largest worker should not grow with N: prepare streams.

    .venv/bin/python benchmarks/prepare_throughput.py --sizes 1000 4000 --workers 0 2 --out results/prepare_throughput.md
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "cbd-cache")
CLASSES = 10


def make_folder(root: Path, count: int) -> int:
    """`count` training JPEGs (plus 50 test ones) under root; returns the training bytes."""
    total = 0
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("test", 50)):
        for i in range(n):
            folder = root / split / f"class{i % CLASSES:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 256, (375 // 4, 500 // 4, 3), dtype=np.uint8)
            img = Image.fromarray(noise).resize((500, 375), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            (folder / f"{i:06d}.JPEG").write_bytes(buf.getvalue())
            total += len(buf.getvalue()) if split == "train" else 0
    return total


# Runs the command and prints the peak RSS (KiB) of its largest process, reader processes included.
PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)")


def run_prepare(root: Path, workdir: Path, workers: int) -> tuple[float, str]:
    args = [sys.executable, "-c", PEAK_RSS, CLI, "prepare", "--pipeline", str(ROOT / "pipelines/smoke.toml"), "--workdir", str(workdir),
            "--set", "data.format=imagefolder", "--set", f"data.root={root}", "--set", "data.profile=none",
            "--set", "data.shard_size=256", "--set", f"pipeline.workers={workers}"]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cbd-prepare-bench-"))
    rows = []
    try:
        for n in args.sizes:
            src = tmp / f"src{n}"
            nbytes = make_folder(src, n)
            for workers in args.workers:
                wd = tmp / f"wd{n}_{workers}"
                wall, log = run_prepare(src, wd, workers)
                peak_kib = int(re.search(r"peak_rss_kib (\d+)", log).group(1))
                rate = re.search(r"\[prepare train\] \d+/\d+ img \(100%\)\s+([\d,]+) img/s", log).group(1)
                rows.append((n, workers, nbytes / n / 1024, rate, nbytes / 2**20 / wall, wall, peak_kib / 1024))
                shutil.rmtree(wd)
                print(rows[-1], flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| train images | workers | KiB / image | train img/s (progress line) | MB/s (whole command) "
             "| wall s | peak RSS MiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {w} | {kib:.0f} | {rate} | {mbs:.1f} | {wall:.1f} | {rss:.0f} |"
              for n, w, kib, rate, mbs, wall, rss in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = " ".join([".venv/bin/python", "benchmarks/prepare_throughput.py", *sys.argv[1:]])
        args.out.write_text(f"# prepare throughput ({os.cpu_count()} CPUs)\n\n`{cmd}`\n\n{table}\n"
                            "Peak RSS: the largest of the prepare process and its reader processes. "
                            "MB/s: training JPEG bytes over the whole command's wall time (start-up included).\n")


if __name__ == "__main__":
    main()
