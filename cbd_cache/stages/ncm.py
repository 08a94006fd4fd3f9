"""NCM (nearest class mean): how good a model's features are, without its classifier.

Features are L2-normalised (the cache stores them so), centred on the training mean and
L2-normalised again; each class is the mean of its training features; a test image goes to the nearest class mean (L2). The training
features come either from the cache (a teacher's stored descriptors, every stored view of every
image: no training image is decoded; under a "draws" allocation a class's images all have the same
number of views, so each class mean still weighs its images equally) or from running any trained model over the training images
(evaluation view). Test features always come from the model, on the evaluation view.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_labels
from cbd_cache.errors import FileDamaged
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import atomic_write_bytes, write_json
from cbd_cache.train.evaluation import accuracy_report, eval_loader, predict
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import CHECKPOINT, Workdir, kept_features, read_run_json
from cbd_cache.workdir import ncm_report as ncm_report_path

SOURCES = ("images", "cache")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ncm_fit(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(centre, class means): the training mean, and per class the mean of centred, L2-normalised features."""
    features = _normalize(np.asarray(features, dtype=np.float64))
    center = features.mean(axis=0)
    f = _normalize(features - center)
    means = np.zeros((num_classes, f.shape[1]))
    for c in range(num_classes):
        if (labels == c).any():
            means[c] = f[labels == c].mean(axis=0)
        else:
            means[c] = np.inf       # a class with no training image is never the nearest
    return center, means


def ncm_predict(features: np.ndarray, center: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The index of the nearest class mean (L2) of each centred, normalised feature."""
    f = _normalize(_normalize(np.asarray(features, dtype=np.float64)) - center)
    empty = ~np.isfinite(means).all(axis=1)
    m = np.where(empty[:, None], 0.0, means)
    # |f - m|^2 less the per-row constant |f|^2, by one matmul: no (images x classes x d) array at ImageNet scale
    distances = (m ** 2).sum(axis=1)[None, :] - 2.0 * f @ m.T
    distances[:, empty] = np.inf
    return distances.argmin(axis=1)


def _model_features(net, manifest: Manifest, split: str, cfg: Config, runtime: Runtime) -> dict[str, np.ndarray]:
    loader = eval_loader(manifest, split, ViewSpec.from_cfg(cfg.views), cfg.eval.batch_size, runtime)
    return predict(runtime.prepare_model(net), loader, runtime, features=True)


def load_kept_features(folder: Path, key: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
    """The features `ncm_report(keep_features=True)` kept for the model in `folder` (float32), if they match `key`."""
    path = kept_features(folder)
    if not path.is_file():
        return None
    with np.load(path) as f:
        if key is not None and json.loads(str(f["key"])) != json.loads(json.dumps(key)):
            return None
        return {k: (f[k].astype(np.float32) if k.endswith("_features") else f[k]) for k in f.files if k != "key"}


def ncm_report(cfg: Config, wd: Workdir, runtime: Runtime, ref: str, source: str = "images",
               keep_features: bool = False) -> dict[str, Any]:
    """NCM test accuracy (top-1, many / medium / few, per class) of the model `ref` (teachers/<name>, students/<run>).

    Written to `<model>/ncm_<source>.json` and reused while the checkpoint, data and cache are unchanged.
    `keep_features` (images only) also keeps the pass's features of every split, val included, in
    `<model>/features_images.npz` (float16): what the paper table's figures are drawn from.
    """
    if source not in SOURCES:
        raise ValueError(f"NCM features from {source!r}; expected one of {SOURCES}")
    if source == "cache" and not ref.startswith("teachers/"):
        raise FileNotFoundError(f"{ref}: only teachers have cached descriptors; use --features images")
    folder = wd.model_dir(ref)
    ckpt = folder / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ref}: no checkpoint at {ckpt}")
    manifest = Manifest.load(wd.manifest)
    key = {"checkpoint_sha256": file_sha256(ckpt), "manifest_fingerprint": manifest.fingerprint, "source": source}
    reader = None
    if source == "cache":
        name = ref.split("/", 1)[1]
        reader = CacheReader(wd.cache, manifest, [name], checkpoint_hashes={name: key["checkpoint_sha256"]})
        key["views_per_image"] = reader.views
        key["allocation"] = reader.prov["allocation"]
    keep = keep_features and source == "images"
    out = ncm_report_path(folder, source)
    if out.is_file():
        try:
            report = read_run_json(out)
        except FileDamaged as e:        # only a record of what NCM gives: compute it again
            log(f"[ncm] {str(e).split('; write it again')[0]}; computing it again")
            report = {}
        if all(report.get(k) == v for k, v in key.items()) and (not keep or load_kept_features(folder, key)):
            return report
    net, _ = load_checkpoint(ckpt)
    if reader is not None:
        block = reader.read(0, manifest.train.num_samples)
        train = block.targets[block.every_view()]
        train_labels = np.repeat(read_labels(manifest, "train"), block.count)
    else:
        out_train = _model_features(net, manifest, "train", cfg, runtime)
        train, train_labels = out_train["features"], out_train["labels"]
    center, means = ncm_fit(train, train_labels, manifest.num_classes)
    test = _model_features(net, manifest, manifest.eval_split, cfg, runtime)
    preds = ncm_predict(test["features"], center, means)
    report = {**accuracy_report(test["labels"], preds, manifest.train.class_counts), **key, "model": ref}
    if keep:
        splits = {"train": out_train, manifest.eval_split: test}
        for split in [s for s in manifest.eval_splits if s not in splits]:   # val: Figure 1's PCA
            splits[split] = _model_features(net, manifest, split, cfg, runtime)
        arrays = {f"{s}_{k}": (v[k].astype(np.float16) if k == "features" else v[k])
                  for s, v in splits.items() for k in ("features", "labels")}
        buf = io.BytesIO()
        np.savez(buf, key=json.dumps(key), **arrays)
        atomic_write_bytes(kept_features(folder), buf.getvalue())
    write_json(out, report)
    log(f"[ncm] {ref} ({source} features): top-1 {report['top1']:.2f}")
    return report
