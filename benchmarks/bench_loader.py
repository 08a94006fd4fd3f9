"""The student's input pipeline alone at 224 px, per decode path: images per core, and pixels against the full decode.

The real training stream (`TrainStream`: class-balanced, a fresh view of area (0.05, 1) per draw, as
pipelines/imagenet_lt.toml draws them) through a DataLoader with 1 and 2 worker processes, batches of
64 put on the device (`Runtime.to_device`), over WebDataset shards that `prepare` wrote from synthetic
photos (`common.photo`: dead-leaves pictures shaded by 1/f noise, whose quality-90 JPEGs take about
ImageNet's bytes per pixel, at `common.photo_size`'s ImageNet-like sizes). The paths:

    full      views.decode = "full" (the default): the whole JPEG decoded, then the crop resized
    reduced   views.decode = "reduced": a crop >= 2 x 224 px on its short side decoded at 1/2..1/8
    bounded   views.decode = "full" over the same photos prepared with data.max_short_px = --bound-px
    gpu       views.decode = "gpu": nvJPEG in the main process, crop and resize on the GPU (with --device cpu:
              the same plumbing with libjpeg-turbo and the CPU, for run_gpu.sh's test; not a speed to quote)

Images per core = images per CPU-second of the loader (its workers' and the main process's user +
system time, read from /proc), so other processes on the machine inflate it less than the wall rate,
which is reported beside it. Every round measures each (path, workers) once, interleaved, and each
path's ratio to full is taken round by round; the tables give medians and ranges over the rounds.
A cached student reads its views from the cache instead of drawing them (bench_cache.py: >30x these
rates), so this is the cost that sets how many cores feed one GPU.

    .venv/bin/python benchmarks/bench_loader.py                     # CPU: full, reduced, bounded
    .venv/bin/python benchmarks/bench_loader.py --device cuda --paths full reduced bounded gpu

Writes results/bench_loader.{md,json} (--name). Run it on a quiet machine (here: under flock /tmp/cbd-cpu.lock).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, ROOT, PhotoJPEG, Timer, write_results
from torch.utils.data import DataLoader

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import prepare
from cbd_cache.data.shards import decode_image, decode_reduced, read_shard
from cbd_cache.loaders import TrainStream
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import make_runtime
from cbd_cache.views import ViewSpec, decode_scale, derive_views, render, replay
from cbd_cache.workdir import Workdir

PATHS = {"full": "whole JPEG decoded (libjpeg-turbo), crop resized (the default)",
         "reduced": "crop >= 2 x 224 px: JPEG decoded at 1/2, 1/4 or 1/8 (DCT scaling), box scaled",
         "bounded": "data.max_short_px = {bound}: photos stored with short side <= {bound} px, then as full",
         "gpu": "nvJPEG on the GPU (main process), crop and resize there",
         "gpu on cpu": "the gpu path's plumbing on the CPU: libjpeg-turbo and the crop and resize in the main process"}
CLOCK = 100   # /proc's clock ticks per second (os.sysconf("SC_CLK_TCK") on Linux)


def data_config(images: int, bound_px: int):
    classes = 8
    return load_config(ROOT / "pipelines" / "imagenet_lt.toml",
                       ("data.format=synthetic", "data.profile=none", f"data.num_classes={classes}",
                        f"data.n_max={images // classes}", "data.test_per_class=1", "data.shard_size=64",
                        f"data.max_short_px={bound_px}", "pipeline.device=cpu"))


def workdir(root: Path, images: int, bound_px: int) -> Workdir:
    cfg = data_config(images, bound_px)
    wd = Workdir(root / (f"bounded{bound_px}" if bound_px else "full") / str(images))
    prepare(cfg, wd, PhotoJPEG(cfg.data))
    return wd


def cpu_seconds(pids: list[int]) -> float:
    """user + system seconds of the processes `pids` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK


def measure(wd: Workdir, spec: ViewSpec, workers: int, device: str, batches: int, warmup: int) -> dict:
    """The stream through a DataLoader onto the device: wall images/s and images per loader CPU-second."""
    manifest = Manifest.load(wd.manifest)
    runtime = make_runtime(dataclasses.replace(load_config(ROOT / "pipelines" / "imagenet_lt.toml").pipeline,
                                               device=device, workers=workers))
    stream = TrainStream(manifest, spec, sampling="class_balanced", seed=0,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=256)
    batch = 64
    it = iter(DataLoader(stream, batch_size=batch, num_workers=workers, pin_memory=runtime.cuda,
                         prefetch_factor=4 if workers else None))
    for _ in range(warmup):
        runtime.to_device(next(it)[0])
    pids = [w.pid for w in getattr(it, "_workers", [])]   # (the DataLoader's worker processes)
    cpu0, main0 = cpu_seconds(pids), time.process_time()
    with Timer(runtime.device) as t:
        for _ in range(batches):
            runtime.to_device(next(it)[0])
    cpu = cpu_seconds(pids) - cpu0 + time.process_time() - main0
    del it
    n = batches * batch
    return {"images_per_s": n / t.seconds, "images_per_cpu_s": n / cpu, "cpu_s": cpu, "wall_s": t.seconds}


def pixel_differences(full_wd: Workdir, bounded_wd: Workdir | None, spec: ViewSpec, paths: list[str],
                      device: str, views_per_image: int = 2, images: int = 128) -> dict:
    """Mean |difference| (levels of 255), PSNR and the share of views changed, of each path's pixels against full's,
    on the same views (for bounded: each box scaled to the smaller stored photo)."""
    manifest = Manifest.load(full_wd.manifest)
    samples = [s for info in manifest.train.shards for s in read_shard(manifest.shard_path(info), info.start, info.stop)]
    samples = samples[:images]
    bounded = {}
    if bounded_wd is not None:
        m = Manifest.load(bounded_wd.manifest)
        bounded = {s.key: s for info in m.train.shards for s in read_shard(m.shard_path(info), info.start, info.stop)}
    diffs: dict[str, list[np.ndarray]] = {p: [] for p in paths if p != "full"}
    scales = []
    for s in samples:
        image = decode_image(s.data, 3)
        views = derive_views(0, s.key, views_per_image, image.shape[1], image.shape[2], spec)
        ref = render(s, views, spec, 3, image).int()
        scales += [decode_scale(v, dataclasses.replace(spec, decode="reduced"), "jpg") for v in views]
        for path in diffs:
            if path == "bounded":
                small = decode_image(bounded[s.key].data, 3)
                f = small.shape[1] / image.shape[1]
                boxes = [np.array([round(v[0] * f), round(v[1] * f), max(1, round(v[2] * f)), max(1, round(v[3] * f)),
                                   v[4]]) for v in views]
                boxes = [np.minimum(b, [small.shape[1] - 1, small.shape[2] - 1, small.shape[1] - b[0],
                                        small.shape[2] - b[1], 1]) for b in boxes]
                out = torch.stack([replay(small, b, spec.image_px) for b in boxes])
            else:
                out = render(s, views, dataclasses.replace(spec, decode=path), 3)
                if path == "gpu":
                    out = out.decode(torch.device(device)).cpu()
            diffs[path].append((out.int() - ref).abs().numpy())
    result = {}
    for path, d in diffs.items():
        d = np.stack(d).reshape(len(samples) * views_per_image, -1).astype(np.float64)
        mse = (d ** 2).mean()
        result[path] = {"mean_abs": float(d.mean()), "max_abs": int(d.max()),
                        "psnr_db": float(10 * np.log10(255 ** 2 / mse)) if mse else float("inf"),
                        "views_changed": float((d.max(axis=1) > 0).mean()), "views": int(d.shape[0])}
    result["reduced_scales"] = {str(k): float(np.mean(np.array(scales) == k)) for k in (1, 2, 4, 8)}
    return result


def decode_costs(wd: Workdir, rounds: int, images: int = 64) -> dict:
    """CPU ms per image of each decoder alone (whole image: torchvision; 1/2, 1/4, 1/8: PIL draft) and of one
    224 px replay, interleaved over rounds: how much of a decode the DCT scaling can remove."""
    manifest = Manifest.load(wd.manifest)
    info = manifest.train.shards[0]
    samples = read_shard(manifest.shard_path(info), info.start, info.stop)[:images]
    full = [decode_image(s.data, 3) for s in samples]
    spec = ViewSpec.from_cfg(load_config(ROOT / "pipelines" / "imagenet_lt.toml").views)
    views = [derive_views(0, s.key, 1, x.shape[1], x.shape[2], spec)[0] for s, x in zip(samples, full)]
    jobs = {"decode 1/1": lambda s, x, v: decode_image(s.data, 3),
            **{f"decode 1/{k}": (lambda k: lambda s, x, v: decode_reduced(s.data, 3, k))(k) for k in (2, 4, 8)},
            "replay 224 px": lambda s, x, v: replay(x, v, 224)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            t = time.process_time()
            for s, x, v in zip(samples, full, views):
                job(s, x, v)
            times[name].append(1000 * (time.process_time() - t) / len(samples))
    kb = float(np.mean([len(s.data) for s in samples]) / 1024)
    px = float(np.mean([x.shape[1] * x.shape[2] for x in full]))
    return {"ms_per_image": {k: statistics.median(v) for k, v in times.items()}, "rounds": times,
            "kib_per_image": kb, "pixels_per_image": px}


def gpu_rate() -> dict | None:
    """The 224 px ResNet-50 student's step rate on a GPU, from run_gpu.sh's results/bench_student_cuda.json."""
    path = RESULTS / "bench_student_cuda.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"] if r["case"] == "rn50"]
    if not rows:
        return None
    r = rows[0]
    return {"images_per_s": r["batch_size"] / r["step_s"]["b"], "gpu": json.loads(path.read_text())["machine"]["gpu"],
            "batch_size": r["batch_size"]}


def summarise(runs: list[dict], paths: list[str], workers: list[int]) -> dict:
    out = {}
    for p in paths:
        for w in workers:
            mine = [r for r in runs if r["path"] == p and r["workers"] == w]
            base = [r for r in runs if r["path"] == "full" and r["workers"] == w]
            ratio = [m["images_per_cpu_s"] / b["images_per_cpu_s"] for m, b in zip(mine, base)]
            out[f"{p}/{w}"] = {"images_per_s": statistics.median(r["images_per_s"] for r in mine),
                               "images_per_cpu_s": statistics.median(r["images_per_cpu_s"] for r in mine),
                               "per_core_range": [min(r["images_per_cpu_s"] for r in mine),
                                                  max(r["images_per_cpu_s"] for r in mine)],
                               "ratio_to_full": statistics.median(ratio), "ratio_range": [min(ratio), max(ratio)]}
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    s, px, dc = res["summary"], res["pixels"], res["decode_costs"]
    lines = ["# The student's loader at 224 px: images per core by decode path", "", "{head}",
             f"{res['images']} synthetic photos ({dc['kib_per_image']:.0f} KiB and {dc['pixels_per_image'] / 1e3:.0f} k "
             f"pixels per JPEG on average; bounded: {res['bounded_kib']:.0f} KiB), views of area (0.05, 1) at 224 px, "
             f"batches of 64 to {a['device']}, {a['rounds']} interleaved rounds of {a['batches']} batches per (path, "
             "workers). Per core: images per CPU-second of the workers and the main process (median over rounds, "
             "range in brackets); ratio: per core against full in the same round.", "",
             "| path | what | workers | img/s (wall) | img per core-second | ratio to full | mean abs diff vs full "
             "(of 255) | PSNR vs full | views changed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in a["paths"]:
        for w in a["workers"]:
            r = s[f"{p}/{w}"]
            d = px.get(p)
            diff = (f"{d['mean_abs']:.2f} | {d['psnr_db']:.1f} dB | {100 * d['views_changed']:.0f} %" if d
                    else "0 | identical | 0 %")
            what = PATHS["gpu on cpu" if p == "gpu" and not a["device"].startswith("cuda") else p]
            lines.append(f"| {p} | {what.format(bound=a['bound_px'])} | {w} | {r['images_per_s']:.0f} | "
                         f"{r['images_per_cpu_s']:.0f} [{r['per_core_range'][0]:.0f}-{r['per_core_range'][1]:.0f}] | "
                         f"{r['ratio_to_full']:.2f} [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}] | {diff} |")
    ratio = {p: s[f"{p}/1"]["ratio_to_full"] for p in a["paths"]}
    keeping = max((p for p in ("reduced", "gpu") if p in ratio), key=ratio.get, default=None)
    verdict = ["**The default path.** `full` (`views.decode = \"full\"`) stays the default."]
    if keeping:
        verdict.append(f"Of the other paths that decode the photo as stored, `{keeping}` is the faster per core: "
                       f"{ratio[keeping]:.2f}x full (1 worker, median of the rounds), "
                       + ("so 1.5x is reached." if ratio[keeping] >= 1.5 else
                          "short of the 1.5x asked of a faster default; the decode costs below say why."))
    if "bounded" in ratio:
        verdict.append(f"`bounded` gives {ratio['bounded']:.2f}x by storing fewer pixels, at "
                       f"{px['bounded']['psnr_db']:.1f} dB against the full photo's views: an option "
                       "(`data.max_short_px`), since every view, the teachers' and the student's alike, then "
                       "loses the full photo's detail.")
    lines += ["", " ".join(verdict)]
    sc = px["reduced_scales"]
    ms = dc["ms_per_image"]
    lines += ["", "## Where a decode's time goes (CPU ms per image, one process, median of the rounds)", "",
              "| " + " | ".join(ms) + " |", "|" + "---:|" * len(ms), "| " + " | ".join(f"{v:.2f}" for v in ms.values()) + " |",
              "", f"Under `reduced`, {100 * sc['1']:.0f} % of these views decode whole, {100 * sc['2']:.0f} % at 1/2, "
              f"{100 * sc['4']:.0f} % at 1/4 and {100 * sc['8']:.0f} % at 1/8: a 224 px view may decode at 1/2 only when "
              "its crop is at least 448 px on its short side, which a 500 x 375 photo never has. And decoding at 1/8 "
              f"still costs {ms['decode 1/8'] / ms['decode 1/1']:.0%} of a whole decode here: the entropy (Huffman) "
              "decoding of every coefficient, which DCT scaling does not skip, is most of a photo's decode at these "
              "bytes per pixel."]
    g = res["gpu_rate"]
    best = max((p for p in a["paths"] if p != "gpu"), key=lambda p: s[f"{p}/1"]["images_per_cpu_s"])
    lines += ["", "## Cores per GPU", ""]
    if g:
        lines.append(f"The 224 px ResNet-50 student steps at {g['images_per_s']:.0f} img/s on {g['gpu']} "
                     f"(results/bench_student_cuda.json, batch {g['batch_size']}, data preloaded), so it needs "
                     + ", ".join(f"{g['images_per_s'] / s[f'{p}/1']['images_per_cpu_s']:.1f} cores under {p}"
                                 for p in a["paths"]) + ".")
    else:
        lines.append("No GPU step rate yet (`benchmarks/run_gpu.sh` writes results/bench_student_cuda.json). One GPU "
                     "that trains the student at R img/s with data for free needs R / r cores of loading, r the images "
                     "per core-second above: " + ", ".join(f"R / {s[f'{p}/1']['images_per_cpu_s']:.0f} under {p}"
                                                           for p in a["paths"])
                     + f" (1 worker); for example R = 2,000 img/s needs "
                       f"{2000 / s[f'{best}/1']['images_per_cpu_s']:.0f} cores under {best}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024, help="training photos (a multiple of 8)")
    ap.add_argument("--paths", nargs="+", default=["full", "reduced", "bounded"], choices=["full", "reduced", "bounded", "gpu"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 64 per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bound-px", type=int, default=256, help="bounded: short side at most this (the eval resize)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default="runs/bench_loader")
    ap.add_argument("--name", default="bench_loader", help="results/<name>.{md,json}")
    a = ap.parse_args()
    if "full" not in a.paths:
        ap.error("--paths must include full (the reference)")
    root = Path(a.root)
    full_wd = workdir(root, a.images, 0)
    bounded_wd = workdir(root, a.images, a.bound_px) if "bounded" in a.paths else None
    spec = ViewSpec.from_cfg(load_config(ROOT / "pipelines" / "imagenet_lt.toml").views)
    runs = []
    for r in range(a.rounds):
        for p in a.paths:
            for w in a.workers:
                wd = bounded_wd if p == "bounded" else full_wd
                m = measure(wd, dataclasses.replace(spec, decode="full" if p == "bounded" else p), w, a.device,
                            a.batches, a.warmup)
                runs.append({"round": r, "path": p, "workers": w, **m})
                log(f"[loader] round {r + 1}: {p}, {w} worker(s): {m['images_per_s']:.0f} img/s, "
                    f"{m['images_per_cpu_s']:.0f} img per CPU-second")
    res = {"args": vars(a), "images": Manifest.load(full_wd.manifest).train.num_samples, "runs": runs,
           "summary": summarise(runs, a.paths, a.workers),
           "pixels": pixel_differences(full_wd, bounded_wd, spec, a.paths, a.device),
           "decode_costs": decode_costs(full_wd, a.rounds), "gpu_rate": gpu_rate(),
           "bounded_kib": 0.0}
    if bounded_wd is not None:
        m = Manifest.load(bounded_wd.manifest)
        res["bounded_kib"] = float(np.mean([len(s.data) for info in m.train.shards[:2]
                                            for s in read_shard(m.shard_path(info), info.start, info.stop)]) / 1024)
    write_results(a.name, res, markdown(res))
    print(markdown(res).replace("{head}", ""))


if __name__ == "__main__":
    main()
