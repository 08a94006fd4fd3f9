"""`cbd-cache prepare --dry-run`: what prepare and export would cost, from the listing alone. Writes nothing.

It lists the source (so label problems surface here too), applies the long-tail profile, and
prints the class-count histogram, the shard count, the cache size for the pipeline's A, teachers
and descriptor sizes, and an export-time estimate from timing the teachers' forward pass here.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from cbd_cache.cache.schema import default_chunk_views, make_layout
from cbd_cache.config import Config
from cbd_cache.data.longtail import SHOT_GROUPS, shot_group
from cbd_cache.data.prepare import plan_splits, val_origin
from cbd_cache.data.sampling import view_counts
from cbd_cache.data.sources import open_source
from cbd_cache.models.networks import Network, descriptor_dim
from cbd_cache.system.logs import format_seconds
from cbd_cache.system.runtime import Runtime

SHOW_CLASSES = 5         # head and tail classes named


CPU_TIMING_PIXELS = 2 ** 20   # the timing batch on CPU holds at most this many pixels per channel


def projected_cache_bytes(cfg: Config, labels: np.ndarray, class_counts: list[int]) -> dict[str, int]:
    """Bytes of each cache array (uncompressed, as cache.py writes them) for this pipeline and these training labels.

    The layout is cache.py's own (`make_layout`): the export's allocation, shards of data.shard_size
    rows in order, each shard's block padded to a whole chunk.
    """
    e, n = cfg.export, len(labels)
    counts = view_counts(labels, class_counts, e.views, e.allocation, e.min_views)
    shards = [[lo, min(lo + cfg.data.shard_size, n)] for lo in range(0, n, cfg.data.shard_size)]
    layout = make_layout(shards, counts, e.chunk_views or default_chunk_views(cfg.data.shard_size, e.views))
    dims = {t.name: descriptor_dim(t.arch) for t in cfg.teachers}
    return layout.array_bytes(dims, e.dtype, len(class_counts), e.logits)


def time_forward(arch: str, channels: int, num_classes: int, cfg: Config, runtime: Runtime) -> tuple[float, int]:
    """(images per second, batch size) of eval-mode forward passes of an untrained `arch`, as export runs them.

    The batch is export.batch_size, on CPU at most 2^20 pixels (16 images at 224 px) to keep this quick;
    passes repeat for about a second after one warm-up pass (allocations, cuDNN autotuning).
    """
    net = runtime.prepare_model(Network(arch, channels, num_classes, 20.0)).eval()
    px = cfg.views.image_px

    def seconds_per_pass(batch: int) -> float:
        x = runtime.to_device(torch.randn(batch, channels, px, px))
        with torch.inference_mode(), runtime.autocast():
            if runtime.cuda:
                torch.cuda.synchronize(runtime.device)
            t0 = time.perf_counter()
            net.features(x)
            if runtime.cuda:
                torch.cuda.synchronize(runtime.device)
        return time.perf_counter() - t0

    batch = cfg.export.batch_size
    if not runtime.cuda:
        batch = min(batch, 2 ** max(0, int(math.log2(CPU_TIMING_PIXELS / px ** 2))))
    seconds_per_pass(batch)   # warm-up
    times: list[float] = []
    while len(times) < 2 or (sum(times) < 1.0 and len(times) < 20):
        times.append(seconds_per_pass(batch))
    return batch * len(times) / sum(times), batch


def histogram_lines(counts: list[int], names: list[str]) -> list[str]:
    """Classes per power-of-two bin of training images, with bars, then the head and tail classes by name."""
    bins = [(0, 1)] + [(2 ** k, 2 ** (k + 1)) for k in range(int(math.log2(max(max(counts), 1))) + 1)]
    per_bin = [sum(lo <= n < hi for n in counts) for lo, hi in bins]
    used = [i for i, n in enumerate(per_bin) if n]
    lines = []
    for (lo, hi), n in list(zip(bins, per_bin))[used[0]:used[-1] + 1]:
        label = "0" if lo == 0 else f"{lo}..{hi - 1}"
        lines.append(f"  {label:>13} images  {n:>6} classes  {'#' * math.ceil(40 * n / max(per_bin))}")
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))

    def show(cs: list[int]) -> str:
        return ", ".join(f"{names[c]} {counts[c]}" for c in cs)

    if len(order) <= 2 * SHOW_CLASSES:
        return lines + [f"  all, largest first: {show(order)}"]
    return lines + [f"  head: {show(order[:SHOW_CLASSES])}", f"  tail: {show(order[-SHOW_CLASSES:])}"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def dry_run(cfg: Config, runtime: Runtime) -> str:
    """The report `prepare --dry-run` prints."""
    source = open_source(cfg.data)
    plans = plan_splits(source, cfg)
    names, train = source.class_names, plans["train"]
    counts = [0] * len(names)
    for r in train.records:
        counts[r.label] += 1
    groups = [shot_group(n) for n in counts]
    out = [f"dry run: {cfg.data.format} at {cfg.data.root}; nothing is written",
           "images listed: " + ", ".join(f"{s} {p.listed:,}" for s, p in plans.items())
           + (f"; {len(source.skipped)} label problems skipped (data.on_error=skip)" if source.skipped else ""),
           f"val: {val_origin(source, cfg)}",
           f"training images after data.profile={cfg.data.profile}: {len(train.records):,} in {len(names)} classes "
           f"({', '.join(f'{groups.count(g)} {g}-shot' for g in SHOT_GROUPS)})",
           *source.summary(), "class counts (training images per class):", *histogram_lines(counts, names)]
    size = cfg.data.shard_size
    out.append("shards: " + ", ".join(f"{s} {math.ceil(len(p.records) / size)}" for s, p in plans.items())
               + f" ({size} images each; fewer if images turn out unreadable)")
    labels = np.array([r.label for r in train.records], dtype=np.int64)
    sizes = projected_cache_bytes(cfg, labels, counts)
    dims = sorted({descriptor_dim(t.arch) for t in cfg.teachers})
    views = view_counts(labels, counts, cfg.export.views, cfg.export.allocation, cfg.export.min_views)
    out.append(f"cache: {human_bytes(sum(sizes.values()))} for N={len(train.records):,} x A={cfg.export.views} "
               f"views ({cfg.export.allocation} allocation: {int(views.min()) if len(views) else 0}.."
               f"{int(views.max()) if len(views) else 0} per image) x K={len(cfg.teachers)} teachers, "
               f"d={'/'.join(map(str, dims))}, {cfg.export.dtype}"
               f"{', with logits' if cfg.export.logits else ''} (views {human_bytes(sizes['views'])})")
    total_s = 0.0
    for arch in sorted({t.arch for t in cfg.teachers}):
        k = sum(t.arch == arch for t in cfg.teachers)
        rate, batch = time_forward(arch, source.channels, len(names), cfg, runtime)
        seconds = k * int(views.sum()) / rate
        total_s += seconds
        out.append(f"export {k} x {arch}: {rate:,.0f} img/s measured on {runtime.device} "
                   f"({cfg.views.image_px} px, batch {batch}) -> {format_seconds(seconds)}")
    out.append(f"export estimate: {format_seconds(total_s)} of teacher forward passes "
               f"({len(cfg.teachers)} teachers x {int(views.sum()):,} views of {len(train.records):,} images); "
               "decoding runs in the loader workers alongside")
    return "\n".join(out)
