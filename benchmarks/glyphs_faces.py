"""Does the glyph benchmark's test measure the long tail or new typefaces? Accuracy on test images whose
face the class's training images used, against faces they never used, per shot group.

    .venv/bin/python benchmarks/glyphs_faces.py --workdir runs/glyphs_design/H \
        --run students/<run> --set data.distortion=0.6 [--set ...]   # the overrides the data was prepared with

Writes results/glyphs_lt_faces.{md,json}. The test split draws from all of a class's faces, so a tail
class with one training image is tested mostly on faces it never saw, a head class almost only on
seen ones; this separates the two effects.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cbd_cache.config import load_config
from cbd_cache.data.longtail import SHOT_GROUPS, shot_group
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import decode_image, iter_shard
from cbd_cache.data.sources import open_source
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.runtime import to_unit
from cbd_cache.views import ViewSpec, eval_view

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="pipelines/glyphs_lt.toml")
    p.add_argument("--workdir", required=True)
    p.add_argument("--run", required=True, help="students/<run> or teachers/<name> under the workdir")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="results")
    a = p.parse_args()
    cfg = load_config(a.pipeline, a.overrides)
    source = open_source(cfg.data)
    manifest = Manifest.load(Path(a.workdir) / "data" / "manifest.json")
    if manifest.class_names != source.class_names:
        raise SystemExit("the workdir's data was prepared with other settings; pass the same --set items")
    counts = manifest.train.class_counts
    by_key = {r.key: r for r in source.records("train")}
    seen: dict[int, set[int]] = defaultdict(set)   # per class, the faces of the training images the profile kept
    for shard in manifest.train.shards:
        for sample in iter_shard(manifest.shard_path(shard)):
            record = by_key[sample.key]
            assert source.read(record)[0] == sample.data, f"{sample.key}: the source renders another image"
            seen[record.label].add(source.face_of(record))
    net, _ = load_checkpoint(Path(a.workdir) / a.run / "checkpoint.pt")
    net.eval()
    spec = ViewSpec.from_cfg(cfg.views)
    hits: dict[tuple[str, str], list[int]] = defaultdict(list)
    test = source.records("test")
    for lo in range(0, len(test), 500):
        batch = test[lo:lo + 500]
        x = torch.stack([eval_view(decode_image(source.read(r)[0], 1), spec) for r in batch])
        with torch.inference_mode():
            pred = net(to_unit(x))[0].argmax(1).numpy()
        for r, y in zip(batch, pred):
            where = "seen face" if source.face_of(r) in seen[r.label] else "unseen face"
            hits[(shot_group(counts[r.label]), where)].append(int(y == r.label))
    rows = [{"group": g, "face": f, "images": len(hits[(g, f)]),
             "top1": 100 * float(np.mean(hits[(g, f)])) if hits[(g, f)] else None}
            for g in SHOT_GROUPS for f in ("seen face", "unseen face")]
    command = "benchmarks/glyphs_faces.py " + " ".join(
        [f"--workdir {a.workdir}", f"--run {a.run}", *[f"--set {o}" for o in a.overrides]])
    out = ROOT / a.out
    (out / "glyphs_lt_faces.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = ["# glyphs_lt: test accuracy on faces a class was trained on, and on faces it never saw", "",
             f"`.venv/bin/python {command}`", "",
             "| shot group | test face | images | top-1 |", "|---|---|---:|---:|"]
    lines += [f"| {r['group']} | {r['face']} | {r['images']:,} | "
              + ("–" if r["top1"] is None else f"{r['top1']:.1f}") + " |" for r in rows]
    (out / "glyphs_lt_faces.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
