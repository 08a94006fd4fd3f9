"""`cbd-cache predict`: a trained model's top-k classes for image files, as a CSV.

Each file goes through what a training image goes through: prepare's check (`shard_image`: JPEG and
PNG kept as they are, other formats re-encoded losslessly, unreadable ones refused with the reason),
the workdir's `data.max_short_px` bound and the shards' decoder, all in worker processes as prepare
runs them (`data.isolated`: a file that kills the decoder, such as a PNG with a bad CRC, is
unreadable, not the end of the command), then the workdir's evaluation view (`views.eval_view`), so
a file gets the prediction `evaluate` gives the same image. A file that cannot be read is a row with
its error.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Sequence

import torch

from cbd_cache.data.isolated import Handed, read_in_order
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import decode_image
from cbd_cache.data.sources.base import Record, Unreadable
from cbd_cache.data.sources.images import bounded, is_image_file, shard_image
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


class ImageFiles(Handed):
    """The files given to `predict`, read as prepare reads a source's files (a record's ref is its path)."""

    def read(self, record: Record) -> tuple[bytes, str]:
        try:
            data = Path(record.ref).read_bytes()
        except OSError as e:
            raise Unreadable(f"cannot read the file: {e.strerror or e}") from None
        return shard_image(data)


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
    rows = [{"path": str(path), "error": "", "classes": [], "scores": []} for path in files]
    batch: list[tuple[dict, torch.Tensor]] = []
    records = [Record(str(i), 0, str(path)) for i, path in enumerate(files)]
    source = bounded(ImageFiles(manifest.channels), manifest.data_config.get("max_short_px", 0))
    for record, data, why in read_in_order(source, records, runtime.workers):
        row = rows[int(record.key)]
        if data is None:
            row["error"] = why
        else:    # decoded once in a worker already: this decoder survives these bytes
            batch.append((row, eval_view(decode_image(data, manifest.channels), spec)))
        if len(batch) == batch_size or (batch and int(record.key) == len(files) - 1):
            with runtime.autocast():
                logits, _ = net(runtime.to_device(torch.stack([view for _, view in batch])))
            scores, classes = logits.float().softmax(1).topk(k, dim=1)
            for (r, _), s, c in zip(batch, scores.cpu().tolist(), classes.cpu().tolist()):
                r["classes"], r["scores"] = [manifest.class_names[i] for i in c], s
            batch = []
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
