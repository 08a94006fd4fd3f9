"""Readers: each dataset format lists its records per split and reads one record's encoded bytes.

A reader never decides what is long-tailed or how shards look; `prepare` does. This keeps a new
format down to two methods: `records(split)` and `read(record)`. `data.format` picks the reader and
`data.root` points it at the files:

    fashion_mnist   the four IDX files                      train, test
    synthetic       generated from data.seed, no files      train, test
    glyphs          installed CJK fonts (data.root)         train, val, test
    cifar           cifar-10-batches-py / cifar-100-python  train, test
    imagenet_lt     <prefix>_{train,val,test}.txt lists     ImageNet-LT, Places-LT
    inat            train<year>.json, val<year>.json        iNaturalist 2017 / 2018
    imagefolder     train/<class>/..., val/..., test/...
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cbd_cache.data.sources.base import SPLITS, Record, Source, Unreadable, encode_png
from cbd_cache.data.sources.cifar import CIFAR
from cbd_cache.data.sources.fashion_mnist import FashionMNIST
from cbd_cache.data.sources.glyphs import Glyphs
from cbd_cache.data.sources.imagefolder import ImageFolder
from cbd_cache.data.sources.imagenet_lt import SplitLists
from cbd_cache.data.sources.inat import INaturalist
from cbd_cache.data.sources.synthetic import Synthetic
from cbd_cache.errors import ConfigError, DataError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg

__all__ = ["SPLITS", "DataError", "Record", "Source", "Unreadable", "encode_png", "open_source"]

# data.format -> reader: a new format is one new file, registered here and named in config's FORMATS
READERS = {"fashion_mnist": FashionMNIST, "synthetic": Synthetic,
           "imagenet_lt": SplitLists, "inat": INaturalist, "imagefolder": ImageFolder, "glyphs": Glyphs,
           "cifar": CIFAR}


def open_source(cfg: DataCfg) -> Source:
    if cfg.format not in READERS:
        raise ConfigError(f"data.format={cfg.format!r}: no reader for this format")
    return READERS[cfg.format](cfg)


def has_balanced_train(cfg: DataCfg) -> bool:
    """The source's training split is a whole balanced set that the long-tail profile cuts (`Source.balanced_train`)."""
    return READERS[cfg.format].balanced_train and cfg.profile != "none"
