"""`cbd-cache predict`: a trained model's top-k classes for image files, as a CSV.

Each file goes through what a training image goes through: prepare's check (`shard_image`: JPEG and
PNG kept as they are, other formats re-encoded losslessly, unreadable ones refused with the reason),
the workdir's `data.max_short_px` bound, the shards' decoder, and the workdir's evaluation view (`views.eval_view`), so a file gets the
prediction `evaluate` gives the same image. A file that cannot be read is a row with its error.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Sequence

import torch

from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import decode_image
from cbd_cache.data.sources.base import Unreadable
from cbd_cache.data.sources.images import bound_image, is_image_file, shard_image
from cbd_cache.errors import ConfigError
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.runtime import Runtime
from cbd_cache.views import ViewSpec, eval_view
from cbd_cache.workdir import CHECKPOINT

LIST_SUFFIXES = (".txt", ".lst")


def list_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a folder's image files (by suffix, recursively, sorted); a .txt / .lst file's lines
    (one path each, relative to the list's folder). A missing path stays, to become a row with its error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f.name))
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            out += [p.parent / line.strip() for line in p.read_text().splitlines() if line.strip()]
        else:
            out.append(p)
    return out


def view_of(path: Path, channels: int, spec: ViewSpec, max_short_px: int = 0) -> torch.Tensor:
    """The uint8 evaluation view of an image file, read as prepare and the evaluation read it."""
    stored, ext = shard_image(path.read_bytes())
    return eval_view(decode_image(bound_image(stored, ext, max_short_px), channels), spec)


def model_checkpoint(root: Path, ref: str) -> Path:
    ckpt = root / ref / CHECKPOINT
    if not ref.startswith(("teachers/", "students/")) or not ckpt.is_file():
        raise FileNotFoundError(f"--run {ref}: no checkpoint at {ckpt}; give teachers/<name> or students/<run> "
                                f"of this workdir (`cbd-cache logs {root}` lists them)")
    return ckpt


@torch.no_grad()
def predict_files(ckpt: Path, files: Sequence[Path], manifest: Manifest, spec: ViewSpec, runtime: Runtime,
                  top_k: int, batch_size: int) -> list[dict]:
    """One row per file, in order: {path, error, classes, scores}; scores are softmax probabilities."""
    net, meta = load_checkpoint(ckpt)
    if meta["network"]["num_classes"] != manifest.num_classes or meta["network"]["in_channels"] != manifest.channels:
        raise ConfigError(f"{ckpt}: the model has {meta['network']['num_classes']} classes and "
                          f"{meta['network']['in_channels']} channels, this workdir's data {manifest.num_classes} and "
                          f"{manifest.channels}; use the --workdir it was trained in")
    net = runtime.prepare_model(net).eval()
    k = min(top_k, manifest.num_classes)
    rows = []
    for start in range(0, len(files), batch_size):
        chunk, views = [], []
        for path in files[start:start + batch_size]:
            row = {"path": str(path), "error": "", "classes": [], "scores": []}
            try:
                views.append(view_of(path, manifest.channels, spec, manifest.data_config.get("max_short_px", 0)))
                chunk.append(row)
            except (Unreadable, OSError, ValueError, RuntimeError) as e:
                row["error"] = str(e) or type(e).__name__
            rows.append(row)
        if not views:
            continue
        with runtime.autocast():
            logits, _ = net(runtime.to_device(torch.stack(views)))
        scores, classes = logits.float().softmax(1).topk(k, dim=1)
        for row, s, c in zip(chunk, scores.cpu().tolist(), classes.cpu().tolist()):
            row["classes"], row["scores"] = [manifest.class_names[i] for i in c], s
    return rows


def predictions_csv(rows: Sequence[dict], top_k: int) -> str:
    """path, error, class_1, score_1, ..., class_k, score_k (blank where a file had an error)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "error", *[f"{x}_{i}" for i in range(1, top_k + 1) for x in ("class", "score")]])
    for r in rows:
        pairs = [v for c, s in zip(r["classes"], r["scores"]) for v in (c, f"{s:.6f}")]
        writer.writerow([r["path"], r["error"], *pairs, *[""] * (2 * top_k - len(pairs))])
    return out.getvalue()
