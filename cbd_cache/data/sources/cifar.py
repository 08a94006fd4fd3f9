"""CIFAR-10 / CIFAR-100 from the python-pickle folders torchvision and the Toronto page ship.

`data.root` is `cifar-10-batches-py/`, `cifar-100-python/`, or a folder holding one of them. The
long-tailed training split is cut by `data.profile = "cifar_lt"` (Cao et al. 2019's cut, in
data/longtail.py), the test split is the full balanced 10,000 images. The pickles are read with
`pickle` as the format requires: point `data.root` only at copies you trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbd_cache.data.sources.base import Record, Source, encode_png
from cbd_cache.errors import ConfigError, DataError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg

# folder -> (train files, test files, meta file, label key, names key)
LAYOUTS = {
    "cifar-10-batches-py": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                            b"labels", b"label_names"),
    "cifar-100-python": (["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}
CIFAR_HINT = ("download CIFAR-10 or CIFAR-100 (python version) from https://www.cs.toronto.edu/~kriz/cifar.html "
              "on a machine with a network, untar it, and point --set data.root=DIR at the folder")


def find_layout(root: Path) -> tuple[Path, tuple]:
    for folder in (root, *(root / name for name in LAYOUTS)):
        if folder.name in LAYOUTS and folder.is_dir():
            return folder, LAYOUTS[folder.name]
    raise ConfigError(f"data.root={root}: no cifar-10-batches-py/ or cifar-100-python/ folder; {CIFAR_HINT}")


def load_pickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise ConfigError(f"data.root: missing {path}; {CIFAR_HINT}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e}); download it again") from None


class CIFAR(Source):
    channels = 3
    balanced_train = True

    def __init__(self, cfg: DataCfg):
        folder, (train, test, meta, self.label_key, names_key) = find_layout(Path(cfg.root))
        self.folder = folder
        self.files = {"train": [folder / f for f in train], "test": [folder / f for f in test]}
        self.class_names = [n.decode() for n in load_pickle(folder / meta)[names_key]]
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.description = {"format": "cifar", "root": str(folder), "classes": len(self.class_names)}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(N x 32 x 32 x 3 uint8 images, N labels) of a split, its batch files in order."""
        if split not in self.arrays:
            images, labels = [], []
            for path in self.files[split]:
                batch = load_pickle(path)
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[self.label_key], dtype=np.int64))
            self.arrays[split] = (np.concatenate(images), np.concatenate(labels))
            if not self.arrays[split][1].size or self.arrays[split][1].max() >= len(self.class_names):
                raise DataError(f"{self.folder}: {split} labels do not fit the {len(self.class_names)} classes "
                                "of the meta file; download it again")
        return self.arrays[split]

    def records(self, split: str) -> list[Record]:
        _, labels = self._load(split)
        return [Record(f"{split}-{i:05d}", int(y), (split, i)) for i, y in enumerate(labels)]

    def read(self, record: Record) -> tuple[bytes, str]:
        split, i = record.ref
        return encode_png(self._load(split)[0][i]), "png"
