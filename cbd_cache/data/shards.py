"""WebDataset shards: one tar per `data.shard_size` samples, each sample `<key>.{png|jpg,cls,row}`.

`row` is the sample's index in the manifest (and so its row in the cache); readers check it, so a
shard that drifted out of alignment with the cache fails loudly instead of training on wrong targets.
A reader also checks each shard against the manifest's content hash the first time its process opens
it: a truncated, deleted or changed shard stops a run with `ShardDamaged`, which names the repair.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cbd_cache.errors import ShardDamaged
from cbd_cache.system.storage import open_file

try:  # torchvision 0.29 deprecates its decoders (for torchcodec); PIL takes over where they are gone
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.io import decode_image as decode_tv
except ImportError:  # pragma: no cover
    decode_tv = decode_jpeg = None


IMAGE_EXTS = ("jpg", "png")


REPAIR = "run `cbd-cache prepare` (same --pipeline and --workdir) to rebuild it"


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    row: int
    data: bytes   # encoded image
    ext: str
    shard: str = field(default="", compare=False)   # where it was read from, for error messages


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def hash_sample(h: "hashlib._Hash", sample: Sample) -> None:
    """Add one sample to a shard's content hash (the manifest's ShardInfo.sha256)."""
    h.update(f"{sample.key}\0{sample.label}\0{sample.ext}\0".encode())
    h.update(hashlib.sha256(sample.data).digest())


def content_hash(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for sample in samples:
        hash_sample(h, sample)
    return h.hexdigest()


class ShardWriter:
    """Writes one shard with reproducible bytes (fixed mtime), hashing the samples' content as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.file = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=0)   # an int: a float adds a pax header per member
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, sample: Sample) -> None:
        self.tar.write({"__key__": sample.key, sample.ext: sample.data,
                        "cls": str(sample.label).encode(), "row": str(sample.row).encode()})
        hash_sample(self.hash, sample)
        self.count += 1

    def close(self) -> str:
        """Finish the tar, move it under its final name, and return the content hash."""
        self.tar.close()
        self.file.close()
        self.tmp.replace(self.path)
        return self.hash.hexdigest()


def tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file of an uncompressed tar, in order: ustar, pax and GNU long names.

    The student re-reads every shard each epoch, and `tarfile` spends ~100 us per member on header
    objects (three members per sample, plus a pax header each when mtime is a float); slicing the
    bytes directly costs a few us, and each header's checksum is still verified.
    """
    pos, end = 0, len(data)
    pending: dict[str, str] = {}
    while pos + 512 <= end:
        header = data[pos:pos + 512]
        if header[0] == 0:                                      # end-of-archive blocks
            break
        if sum(header[:148]) + 256 + sum(header[156:]) != _number(header[148:156]):
            raise ValueError(f"tar header at byte {pos}: bad checksum (truncated or corrupt shard)")
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending else _number(header[124:136])
        body = pos + 512
        content = data[body:body + size]
        pos = body + (size + 511) // 512 * 512
        if kind == b"x":                                        # pax header: applies to the next member
            pending = _pax_records(content)
        elif kind == b"L":                                      # GNU long name: applies to the next member
            pending = {"path": content.rstrip(b"\0").decode()}
        elif kind == b"g":                                      # pax global header: nothing we use
            continue
        else:
            if kind in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
                yield pending.get("path") or (f"{prefix}/{name}" if prefix else name), content
            pending = {}


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the high bit of the first byte is set."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(content: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(content):
        space = content.index(b" ", pos)
        length = int(content[pos:space])
        key, _, value = content[space + 1:pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        pos += length
    return records


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """The samples of one shard (a path or an fsspec URL), in order: consecutive members `<key>.<ext>`
    grouped by key, as webdataset does."""
    with open_file(path, "rb") as f:
        data = f.read()
    key, fields = None, {}
    for name, content in tar_members(data):
        base, dot, ext = name.rpartition("/")[2].partition(".")
        if not dot:
            continue
        base = name[:len(name) - len(ext) - 1]
        if base != key:
            if key is not None:
                yield _sample(path, key, fields)
            key, fields = base, {}
        fields[ext] = content
    if key is not None:
        yield _sample(path, key, fields)


def _sample(path, key: str, fields: dict[str, bytes]) -> Sample:
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if ext is None or "cls" not in fields or "row" not in fields:
        raise ValueError(f"{path}: sample {key} lacks an image, cls or row ({sorted(fields)})")
    return Sample(key, int(fields["cls"]), int(fields["row"]), fields[ext], ext, str(path))


_verified: set[tuple[str, str]] = set()   # (shard, content hash) pairs this process has checked: once each


def read_shard(path: str | Path, start: int, stop: int, sha256: str = "") -> list[Sample]:
    """All samples of a shard, checked against the manifest's row range for it and, when given, its
    content hash (the first time this process reads it). Any damage raises ShardDamaged."""
    try:
        samples = list(iter_shard(path))
    except FileNotFoundError:
        raise ShardDamaged(f"{path}: the shard is missing; {REPAIR}") from None
    except (OSError, ValueError, KeyError) as e:   # a truncated or corrupt tar
        raise ShardDamaged(f"{path}: the shard is damaged ({str(e).removeprefix(f'{path}: ')}); {REPAIR}") from None
    rows = [s.row for s in samples]
    if rows != list(range(start, stop)):
        raise ShardDamaged(f"{path}: rows {rows[:3]}..{rows[-3:]} do not match the manifest's range [{start}, {stop}) "
                           f"(truncated or replaced); {REPAIR}")
    if sha256 and (str(path), sha256) not in _verified:
        if content_hash(samples) != sha256:
            raise ShardDamaged(f"{path}: the shard's content no longer matches the manifest's hash; {REPAIR}")
        _verified.add((str(path), sha256))
    return samples


def shard_intact(path: Path, start: int, stop: int, sha256: str) -> bool:
    """The shard at `path` holds exactly what the manifest says: rows [start, stop) with this content hash."""
    try:
        return content_hash(read_shard(path, start, stop)) == sha256   # (not read_shard's once-per-process check)
    except ShardDamaged:
        return False


def read_labels(manifest, split: str = "train") -> np.ndarray:
    """Every sample's label, by manifest row, read from the shards without decoding an image."""
    info = manifest.splits[split]
    return np.array([s.label for sh in info.shards for s in read_shard(manifest.shard_path(sh), sh.start, sh.stop,
                                                                       sh.sha256)], dtype=np.int64)


def read_images(manifest, split: str, rows) -> dict[int, torch.Tensor]:
    """{row: uint8 image (C, H, W)} of a few rows of a split: only the shards that hold them are read, only
    those images decoded (the figures' nearest-neighbour grid)."""
    wanted, out = set(int(r) for r in rows), {}
    for sh in manifest.splits[split].shards:
        if any(sh.start <= r < sh.stop for r in wanted):
            for sample in read_shard(manifest.shard_path(sh), sh.start, sh.stop, sh.sha256):
                if sample.row in wanted:
                    out[sample.row] = decode_sample(sample, manifest.channels)
    return out


def decode_sample(sample: Sample, channels: int, scale: int = 1) -> torch.Tensor:
    """`decode_image` of a shard's sample (`decode_reduced` when `scale` > 1); a failure names the shard and
    the key (prepare decodes every image with the same decoder, so only a shard written before that check can hold one)."""
    try:
        return decode_image(sample.data, channels) if scale == 1 else decode_reduced(sample.data, channels, scale)
    except Exception as e:   # PIL raises many types on corrupt input
        raise ShardDamaged(f"{sample.shard}: sample {sample.key} (row {sample.row}) cannot be decoded ({e}); "
                           "prepare the data again: remove the data folder, then run `cbd-cache prepare`") from None


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded bytes -> uint8 tensor (C, H, W).

    torchvision's decoder (libjpeg-turbo / libpng, straight into a CHW tensor) takes a quarter of
    PIL's time on a 28 px PNG and three quarters on a 300 px JPEG; PIL reads whatever it refuses.
    """
    try:
        if decode_tv is None:
            raise RuntimeError("no torchvision decoder")
        image = decode_tv(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                          mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
        if image.dtype == torch.uint8 and image.shape[0] == channels:
            return image
    except RuntimeError:
        pass
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        array = np.asarray(img)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes from the header alone: what `decode_image` would give, no pixel decoded."""
    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def decode_reduced(data: bytes, channels: int, scale: int) -> torch.Tensor:
    """JPEG bytes decoded at 1/`scale` (2, 4 or 8) of their size by libjpeg's DCT scaling (PIL's `draft`)
    -> uint8 (C, ceil(H / scale), ceil(W / scale)).

    The scaled inverse DCT skips the high frequencies that a downscaled crop would drop anyway; the
    entropy decoding (most of a photo's decode time at ImageNet's bytes per pixel) is not reduced.
    """
    with Image.open(io.BytesIO(data)) as img:
        height, width = img.height, img.width
        img.draft("L" if channels == 1 else "RGB", (width // scale, height // scale))
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (-(-width // scale), -(-height // scale)):
            raise ValueError(f"reduced decode gave {img.size}, not 1/{scale} of {(width, height)} (not a JPEG?)")
        array = np.asarray(img)
    return torch.from_numpy(np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1)))


def decode_on_device(data: list[torch.Tensor], jpeg: list[bool], channels: int,
                     device: torch.device) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D tensors on the CPU) -> uint8 (C, H, W) tensors on `device`.

    JPEGs decode in one batched call on `device` (nvJPEG on CUDA; libjpeg-turbo on the CPU, the
    plumbing's test); PNGs, and a JPEG that nvJPEG refuses, decode with `decode_image` and are copied.
    """
    out: list[torch.Tensor | None] = [None] * len(data)
    batch = [i for i, j in enumerate(jpeg) if j]
    if batch and decode_jpeg is not None:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        try:
            for i, image in zip(batch, decode_jpeg([data[i] for i in batch], mode=mode, device=device)):
                out[i] = image if image.shape[0] == channels else None
        except RuntimeError:
            pass
    return [image if image is not None else decode_image(data[i].numpy().tobytes(), channels).to(device)
            for i, image in enumerate(out)]
