"""WebDataset shards: one tar per `data.shard_size` samples, each sample `<key>.{png|jpg,cls,row}`.

`row` is the sample's index in the manifest (and so its row in the cache); readers check it, so a
shard that drifted out of alignment with the cache fails loudly instead of training on wrong targets.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

IMAGE_EXTS = ("jpg", "png")


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    row: int
    data: bytes   # encoded image
    ext: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardWriter:
    """Writes one shard with reproducible bytes (fixed mtime), hashing the samples' content as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.file = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=0.0)
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, sample: Sample) -> None:
        self.tar.write({"__key__": sample.key, sample.ext: sample.data,
                        "cls": str(sample.label).encode(), "row": str(sample.row).encode()})
        self.hash.update(f"{sample.key}\0{sample.label}\0{sample.ext}\0".encode())
        self.hash.update(hashlib.sha256(sample.data).digest())
        self.count += 1

    def close(self) -> str:
        """Finish the tar, move it under its final name, and return the content hash."""
        self.tar.close()
        self.file.close()
        self.tmp.replace(self.path)
        return self.hash.hexdigest()


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """The samples of one shard, in order, through webdataset's tar reader."""
    with open(path, "rb") as stream:
        for s in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                raise ValueError(f"{path}: sample {s['__key__']} has no image ({sorted(s)})")
            yield Sample(s["__key__"], int(s["cls"]), int(s["row"]), s[ext], ext)


def read_shard(path: str | Path, start: int, stop: int) -> list[Sample]:
    """All samples of a shard, checked against the manifest's row range for it."""
    samples = list(iter_shard(path))
    rows = [s.row for s in samples]
    if rows != list(range(start, stop)):
        raise ValueError(f"{path}: rows {rows[:3]}..{rows[-3:]} do not match the manifest's range [{start}, {stop})")
    return samples


def read_labels(manifest, split: str = "train") -> np.ndarray:
    """Every sample's label, by manifest row, read from the shards without decoding an image."""
    info = manifest.splits[split]
    return np.array([s.label for sh in info.shards for s in read_shard(manifest.shard_path(sh), sh.start, sh.stop)],
                    dtype=np.int64)


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded bytes -> uint8 tensor (C, H, W)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        array = np.asarray(img)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))
