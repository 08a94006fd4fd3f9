"""Fashion-MNIST from its four IDX files (Debian's dataset-fashion-mnist, or any folder holding them)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbd_cache.data.sources.base import Record, Source, encode_png
from cbd_cache.errors import ConfigError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg

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
    balanced_train = True

    def __init__(self, cfg: DataCfg):
        self.root = Path(cfg.root)
        if not self.root.is_dir():
            raise ConfigError(f"data.root={cfg.root}: no such directory; {FASHION_MNIST_HINT}")
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
