"""An image file's bytes -> what a shard stores, after decoding it once to prove it decodes.

JPEG (and MPO, a JPEG with extra frames) passes through byte for byte: the check decodes a copy
and keeps the original bytes. PNG passes through too. Any other format is decoded and re-encoded
as PNG in its own mode, which is lossless. What cannot be stored without loss or cannot be decoded
raises `Unreadable` with the reason: zero bytes, not an image, truncated or corrupt data, 16-bit
samples (the shards and the networks hold 8 bits), CMYK outside JPEG (PNG has no CMYK).

`data.max_short_px` > 0 stores photos at a bounded size, as FFCV does (`bound_image`): one whose short
side is longer is resized to it and encoded again. Decoding a smaller photo costs less on every draw
(benchmarks/bench_loader.py), at the price of the detail a crop of the full photo would have kept.
"""
from __future__ import annotations

import io

from PIL import Image, ImageFile

from cbd_cache.data.sources.base import Record, Source, Unreadable

JPEG_FORMATS = ("JPEG", "MPO")
JPEG_MODES = ("L", "RGB", "CMYK")                       # what libjpeg gives; CMYK converts to RGB at decode
PNG_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # 8 bits or fewer per sample
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# What counts as an image file by its name: torchvision's ImageFolder extensions (0.29), case-insensitive.
# ImageFolder datasets and `predict`'s folders both go by this list.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_BITS_PER_SAMPLE = 258

ImageFile.LOAD_TRUNCATED_IMAGES = False   # a truncated file must fail the check, never decode half an image


def shard_image(data: bytes) -> tuple[bytes, str]:
    """(bytes to store, "jpg" | "png") for an encoded image file, or `Unreadable`."""
    if not data:
        raise Unreadable("zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()   # decodes every pixel: a truncated or corrupt file fails here
            return _store(img, data)
    except Unreadable:
        raise
    except Image.UnidentifiedImageError:
        raise Unreadable("not an image (no image format recognises it)") from None
    except Exception as e:  # PIL raises many types on corrupt input (OSError, SyntaxError, ValueError, ...)
        raise Unreadable(f"cannot decode (corrupt or truncated): {e}") from None


def _store(img: Image.Image, data: bytes) -> tuple[bytes, str]:
    fmt, mode = img.format, img.mode
    if mode in HIGH_BIT_MODES or _bits_per_sample(img, data) > 8:
        raise Unreadable(f"16-bit {fmt} ({mode}): shards hold 8 bits per sample, converting would lose bits")
    if fmt in JPEG_FORMATS:
        if mode not in JPEG_MODES:
            raise Unreadable(f"JPEG in mode {mode}: cannot be decoded to RGB")
        return data, "jpg"
    if fmt == "PNG":
        return data, "png"
    if mode == "CMYK":
        raise Unreadable(f"CMYK {fmt}: PNG has no CMYK, converting to RGB would lose colour")
    if mode == "RGBX":
        img = img.convert("RGB")   # the fourth byte is padding
    elif mode not in PNG_MODES:
        raise Unreadable(f"{fmt} in mode {mode}: cannot be stored losslessly as PNG")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "png"


def _bits_per_sample(img: Image.Image, data: bytes) -> int:
    """The file's own sample depth where PIL reduces it silently (16-bit RGB PNG and TIFF open as 8-bit RGB)."""
    if data.startswith(PNG_SIGNATURE) and len(data) > 24:
        return data[24]   # IHDR bit depth
    if img.format == "TIFF":
        bits = img.tag_v2.get(TIFF_BITS_PER_SAMPLE, 8)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


BOUNDED_JPEG_QUALITY = 90   # a bounded JPEG's quality (FFCV's default)


def bound_image(data: bytes, ext: str, max_short_px: int) -> bytes:
    """Stored bytes with the image's short side at most `max_short_px` (0: unchanged): a larger image is
    resized (Lanczos) and encoded again, a JPEG at quality 90, a PNG losslessly; a smaller one is kept as it is."""
    if max_short_px <= 0:
        return data
    with Image.open(io.BytesIO(data)) as img:
        short = min(img.size)
        if short <= max_short_px:
            return data
        size = (max(1, round(img.width * max_short_px / short)), max(1, round(img.height * max_short_px / short)))
        img = img.convert("RGB" if img.mode == "CMYK" else img.mode).resize(size, Image.LANCZOS)
        buf = io.BytesIO()
        if ext == "jpg":
            img.save(buf, format="JPEG", quality=BOUNDED_JPEG_QUALITY)
        else:
            img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


class Bounded(Source):
    """`source` with its images stored at `data.max_short_px` at most (`images.bound_image`)."""

    def __init__(self, source: Source, max_short_px: int):
        self.source, self.max_short_px = source, max_short_px
        self.class_names, self.channels, self.splits = source.class_names, source.channels, source.splits
        self.description = {**source.description, "max_short_px": max_short_px}
        self.skipped = source.skipped

    def records(self, split: str) -> list[Record]:
        return self.source.records(split)

    def summary(self) -> list[str]:
        return self.source.summary()

    def item(self, record: Record) -> str:
        return self.source.item(record)

    def read(self, record: Record) -> tuple[bytes, str]:
        data, ext = self.source.read(record)
        return bound_image(data, ext, self.max_short_px), ext


def bounded(source: Source, max_short_px: int) -> Source:
    """`source`, its images bounded to `max_short_px` when that is > 0 (once: a Bounded source stays as it is)."""
    return source if max_short_px <= 0 or isinstance(source, Bounded) else Bounded(source, max_short_px)
