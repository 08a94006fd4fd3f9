"""A generated dataset for tests and the smoke pipeline: no files needed."""
from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np

from cbd_cache.data.sources.base import Record, Source, encode_png

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg


class Synthetic(Source):
    """A learnable toy: class c is an oriented colour grating (hue c/C, angle pi*c/C) with random phase and noise.

    Generated from `data.seed` alone, so tests and the smoke pipeline need no files. The training
    split has n_max + `data.val_per_class` images per class and is cut to the long-tail profile by
    `prepare` like any other; the val split is then held out of what the cut leaves (`prepare.hold_out_val`).
    """

    channels = 3
    balanced_train = True

    def __init__(self, cfg: DataCfg):
        self.cfg = cfg
        self.class_names = [f"class{c:02d}" for c in range(cfg.num_classes)]
        self.description = {"format": "synthetic", "num_classes": cfg.num_classes, "image_px": cfg.image_px}

    def records(self, split: str) -> list[Record]:
        per_class = self.cfg.n_max + self.cfg.val_per_class if split == "train" else self.cfg.test_per_class
        return [Record(f"{split}-{c:03d}-{j:05d}", c, (split, c, j))
                for c in range(self.cfg.num_classes) for j in range(per_class)]

    def read(self, record: Record) -> tuple[bytes, str]:
        split, c, j = record.ref
        C, px = self.cfg.num_classes, self.cfg.image_px
        rng = np.random.default_rng([self.cfg.seed, 0 if split == "train" else 1, c, j])
        yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
        angle = np.pi * c / C
        freq = 2.0 + (c % 3)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        colour = np.array(colorsys.hsv_to_rgb(c / C, 0.8, 0.9), dtype=np.float32)
        img = 0.5 + 0.35 * wave[..., None] * colour[None, None, :] + rng.normal(0, 0.12, (px, px, 3))
        return encode_png((np.clip(img, 0, 1) * 255).astype(np.uint8)), "png"
