"""Readers: each dataset format lists its records per split and reads one record's encoded bytes.

A reader never decides what is long-tailed or how shards look; `prepare` does. This keeps a new
format down to two methods: `records(split)` and `read(record)`.
"""
from __future__ import annotations

import colorsys
import gzip
import io
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import ConfigError, DataCfg


@dataclass(frozen=True)
class Record:
    key: str      # stable, unique within the dataset; seeds each image's views, so never reuse one
    label: int
    ref: Any      # the reader's handle: an array index, a file path


class Source(ABC):
    class_names: list[str]
    channels: int                       # 1: grey, 3: RGB; what images decode to
    splits: tuple[str, ...] = ("train", "test")
    description: dict[str, Any]         # recorded in the manifest

    @abstractmethod
    def records(self, split: str) -> list[Record]:
        """Every record of a split, in a stable order."""

    @abstractmethod
    def read(self, record: Record) -> tuple[bytes, str]:
        """(encoded image bytes, extension): JPEG passes through untouched, anything else becomes PNG."""


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_HINT = ("install Debian's package: sudo apt-get update && sudo apt-get install dataset-fashion-mnist "
                      "(or `make data`), or point --set data.root=DIR at the four IDX .gz files")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): big-endian header of dims, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(root: Path, name: str) -> Path:
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"data.root={root}: missing {name}; {FASHION_MNIST_HINT}")


class FashionMNIST(Source):
    class_names = FASHION_MNIST_CLASSES
    channels = 1

    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"data.root={root}: no such directory; {FASHION_MNIST_HINT}")
        self.paths = {s: tuple(find_idx(self.root, n) for n in names) for s, names in FASHION_MNIST_FILES.items()}
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.description = {"format": "fashion_mnist", "root": str(self.root)}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self.arrays:
            images, labels = (read_idx(p) for p in self.paths[split])
            self.arrays[split] = (images, labels.astype(np.int64))
        return self.arrays[split]

    def records(self, split: str) -> list[Record]:
        _, labels = self._load(split)
        return [Record(f"{split}-{i:05d}", int(y), i) for i, y in enumerate(labels)]

    def read(self, record: Record) -> tuple[bytes, str]:
        images, _ = self._load(record.key.split("-")[0])
        return encode_png(images[record.ref]), "png"


# ------------------------------------------------------------------------------------- synthetic
class Synthetic(Source):
    """A learnable toy: class c is an oriented colour grating (hue c/C, angle pi*c/C) with random phase and noise.

    Generated from `data.seed` alone, so tests and the smoke pipeline need no files. The training
    split has n_max images per class and is cut to the long-tail profile by `prepare` like any other.
    """

    channels = 3

    def __init__(self, cfg: DataCfg):
        self.cfg = cfg
        self.class_names = [f"class{c:02d}" for c in range(cfg.num_classes)]
        self.description = {"format": "synthetic", "num_classes": cfg.num_classes, "image_px": cfg.image_px}

    def records(self, split: str) -> list[Record]:
        per_class = self.cfg.n_max if split == "train" else self.cfg.test_per_class
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


def open_source(cfg: DataCfg) -> Source:
    if cfg.format == "fashion_mnist":
        return FashionMNIST(cfg.root)
    if cfg.format == "synthetic":
        return Synthetic(cfg)
    raise ConfigError(f"data.format={cfg.format!r}: no reader yet for this format")
