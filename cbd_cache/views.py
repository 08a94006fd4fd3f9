"""Views: the crop box and flip that turn a training image into what a network sees.

One view is five integers, `VIEW_FIELDS` = (top, left, height, width, flip), in the decoded image's
pixels. Export derives view a of image `key` from (pipeline seed, key, a) alone, stores the five
integers in the cache, and the student replays them, so both see the same tensor bit for bit: export,
the student and `cache verify` all turn a sample and its views into pixels through `render`, under
the decode policy `views.decode` that the cache records. The photometric augmentation of
data-augmentation teachers lives here too.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data._utils.collate import default_collate_fn_map
from torchvision.transforms.v2 import functional as TF

from cbd_cache.config import TeacherCfg, ViewsCfg
from cbd_cache.data.shards import Sample, decode_on_device, decode_sample, image_size
from cbd_cache.system.runtime import to_unit

VIEW_FIELDS = ("top", "left", "height", "width", "flip")
CROP_ATTEMPTS = 10   # as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class ViewSpec:
    image_px: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool
    eval_resize_px: int
    decode: str = "full"     # full | reduced | gpu: how a training view's pixels are made (`render`)

    @classmethod
    def from_cfg(cls, cfg: ViewsCfg) -> "ViewSpec":
        return cls(cfg.image_px, tuple(cfg.scale), tuple(cfg.ratio), cfg.flip, cfg.eval_resize_px, cfg.decode)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def view_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of image `key`'s views: a pure function of the seed and the key."""
    h = key_hash(key)
    return np.random.default_rng([seed & 0xFFFFFFFF, h & 0xFFFFFFFF, h >> 32])


def sample_view(rng: np.random.Generator, height: int, width: int, spec: ViewSpec) -> np.ndarray:
    """Random-resized crop (area in `spec.scale`, aspect in `spec.ratio`) plus a coin flip, as int32[5]."""
    area = height * width
    (s0, s1), (r0, r1) = spec.scale, (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    box = None
    for _ in range(CROP_ATTEMPTS):   # lo + (hi - lo) * random() is rng.uniform(lo, hi) to the bit, with less call overhead
        target = area * (s0 + (s1 - s0) * rng.random())
        aspect = math.exp(r0 + (r1 - r0) * rng.random())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:  # fall back to the largest centred crop within the ratio range
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            h, w = height, int(round(height * spec.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = int(spec.flip and rng.random() < 0.5)
    return np.array([*box, flip], dtype=np.int32)


def derive_views(seed: int, key: str, count: int, height: int, width: int, spec: ViewSpec) -> np.ndarray:
    """Views 0..count-1 of one image, int32[count, 5], drawn in order from `view_rng(seed, key)`.

    View a depends on (seed, key, a) only, never on count: the first 4 views of an A = 16 export are
    those of an A = 4 export. One generator per image, not per view: seeding one costs ~15 us, as
    much as replaying a 28 px view, and export derives A views of every image.
    """
    rng = view_rng(seed, key)
    return np.stack([sample_view(rng, height, width, spec) for _ in range(count)])


def replay(image: torch.Tensor, view: np.ndarray | torch.Tensor, image_px: int) -> torch.Tensor:
    """uint8 (C, H, W) image + view -> uint8 (C, image_px, image_px). Deterministic on CPU.

    The crop is resized in uint8 (antialiased bilinear, as torchvision resizes uint8 images): about
    half the time of resizing in float32 at 224 px, where each loader worker replays every sample.
    Views stay uint8 until `to_unit` on the device: a quarter of the bytes through the loader's
    shared memory and the host-to-device copy, and one conversion per batch instead of per view.
    """
    top, left, h, w, flip = view.tolist()
    x = resize(image[None, :, top:top + h, left:left + w], image_px)
    return x[0].flip(-1) if flip else x[0]


def replay_flat(images: torch.Tensor, views: np.ndarray, image_of: np.ndarray, image_px: int) -> torch.Tensor:
    """`replay` of views (m, 5) of same-sized images (n, C, H, W), view j of image `image_of[j]`, bit for bit
    -> uint8 (m, C, image_px, image_px).

    Export replays every view of every image. At 28 px one resize call costs more in dispatch than in
    arithmetic, so the crops of one size are gathered (numpy fancy indexing) and resized in one call;
    the kernel resizes each plane on its own, so the pixels are those of `replay`.
    """
    pixels = images.numpy()
    flat = np.asarray(views).reshape(-1, len(VIEW_FIELDS))
    out = np.empty((len(flat), pixels.shape[1], image_px, image_px), np.uint8)
    size = flat[:, 2].astype(np.int64) * (pixels.shape[3] + 1) + flat[:, 3]
    order = np.argsort(size, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(size[order])) + 1):
        top, left, h, w = (flat[group, i, None] for i in range(4))
        rows = (top + np.arange(h[0, 0]))[:, :, None]
        cols = (left + np.arange(w[0, 0]))[:, None, :]
        crops = pixels[image_of[group, None, None], :, rows, cols]          # (g, h, w, C)
        out[group] = resize(torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))), image_px).numpy()
    flipped = flat[:, 4] == 1
    out[flipped] = out[flipped, ..., ::-1]
    return torch.from_numpy(out)


def resize(x: torch.Tensor, image_px: int) -> torch.Tensor:
    """uint8 (n, C, h, w) -> (n, C, image_px, image_px): antialiased bilinear, as torchvision resizes uint8."""
    if x.shape[-2:] == (image_px, image_px):
        return x
    return F.interpolate(x, size=(image_px, image_px), mode="bilinear", align_corners=False, antialias=True)


DECODE_SCALES = (8, 4, 2)   # the JPEG scalings of libjpeg's DCT that `decode = "reduced"` uses


def decode_scale(view: np.ndarray, spec: ViewSpec, ext: str) -> int:
    """1/scale at which `decode = "reduced"` decodes a JPEG for this view: the smallest the crop can be
    decoded at and still be downsampled (or kept) to image_px on both sides; 1 for the other policies and PNG."""
    if spec.decode != "reduced" or ext != "jpg":
        return 1
    short = min(int(view[2]), int(view[3]))
    return next((s for s in DECODE_SCALES if short >= s * spec.image_px), 1)


def scaled_view(view: np.ndarray, scale: int) -> np.ndarray:
    """A source-pixel view in an image decoded at 1/scale: each edge of the box at the nearest whole pixel there."""
    top, left, h, w, flip = (int(v) for v in view)
    t0, l0 = (2 * top + scale) // (2 * scale), (2 * left + scale) // (2 * scale)
    t1, l1 = (2 * (top + h) + scale) // (2 * scale), (2 * (left + w) + scale) // (2 * scale)
    return np.array([t0, l0, t1 - t0, l1 - l0, flip], dtype=np.int32)


def render(sample: Sample, views: np.ndarray, spec: ViewSpec, channels: int,
           image: torch.Tensor | None = None) -> "torch.Tensor | EncodedBatch":
    """The pixels of a sample's views (m, 5) as the networks get them, under `spec.decode`: the one
    function export, the student and `cache verify` replay views through, so the teacher's view and the
    student's are the same pixels whatever the policy.

    - full: decode the whole image (`image` when the caller has it already), `replay` each view -> uint8 (m, C, px, px);
    - reduced: a JPEG view whose crop is at least 2 x image_px on its short side is decoded at 1/2,
      1/4 or 1/8 (`decode_scale`, libjpeg's DCT scaling) and its box scaled to match; other views as full;
    - gpu: nothing decoded here: an `EncodedBatch` of the bytes and views, which `Runtime.to_device`
      decodes and replays on the device (nvJPEG on CUDA).
    """
    views = np.asarray(views, dtype=np.int32).reshape(-1, len(VIEW_FIELDS))
    if spec.decode == "gpu":
        return EncodedBatch.of(sample.data, sample.ext == "jpg", views, channels, spec.image_px)
    decoded = {} if image is None else {1: image}
    out = []
    for view in views:
        scale = decode_scale(view, spec, sample.ext)
        if scale not in decoded:
            decoded[scale] = decode_sample(sample, channels, scale)
        out.append(replay(decoded[scale], view if scale == 1 else scaled_view(view, scale), spec.image_px))
    return torch.stack(out)


def image_dims(sample: Sample, spec: ViewSpec, channels: int) -> tuple[int, int, torch.Tensor | None]:
    """(height, width, the decoded image or None): what views are derived from. The full policy decodes
    the image (its replay needs it); the others read the header only."""
    if spec.decode == "full":
        image = decode_sample(sample, channels)
        return image.shape[1], image.shape[2], image
    return (*image_size(sample.data), None)


def concat(parts: list) -> "torch.Tensor | EncodedBatch":
    """`render`'s outputs, one after another."""
    return EncodedBatch.cat(parts) if isinstance(parts[0], EncodedBatch) else torch.cat(parts)


def replay_float(image: torch.Tensor, view: np.ndarray, image_px: int) -> torch.Tensor:
    """`replay` for the device: the crop resized in float32 (CUDA has no uint8 antialiased resize) and
    rounded back to uint8. On the CPU it is within one level of `replay` (tests pin it)."""
    top, left, h, w, flip = (int(v) for v in view)
    x = image[None, :, top:top + h, left:left + w]
    if (h, w) != (image_px, image_px):
        x = F.interpolate(x.float(), size=(image_px, image_px), mode="bilinear", align_corners=False,
                          antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return x[0].flip(-1) if flip else x[0]


@dataclass
class EncodedBatch:
    """Views not yet decoded (`views.decode = "gpu"`): images' encoded bytes and their views, view j of
    image `image_of[j]`. The loader collates them like tensors; `decode` makes the pixels on the device.

    The images' bytes travel as one flat tensor with offsets: a batch is four tensors through the
    loader's shared memory, however many images it holds.
    """

    data: torch.Tensor               # every image's encoded bytes, one after another, uint8 1-D, on the CPU
    offsets: torch.Tensor            # (n + 1,) int64: image i is data[offsets[i]:offsets[i + 1]]
    jpeg: torch.Tensor               # (n,) bool
    image_of: torch.Tensor           # (m,) int64
    views: torch.Tensor              # (m, 5) int32, source pixels
    channels: int
    image_px: int

    @classmethod
    def of(cls, data: bytes, jpeg: bool, views: np.ndarray, channels: int, image_px: int) -> "EncodedBatch":
        """One image's views."""
        return cls(torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([0, len(data)]),
                   torch.tensor([jpeg]), torch.zeros(len(views), dtype=torch.int64), torch.from_numpy(views),
                   channels, image_px)

    def __len__(self) -> int:
        return len(self.views)

    def image(self, i: int) -> torch.Tensor:
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __getitem__(self, index: slice) -> "EncodedBatch":
        used, image_of = torch.unique(self.image_of[index], return_inverse=True)
        images = [self.image(i) for i in used.tolist()]
        return EncodedBatch(torch.cat(images), torch.tensor([0, *np.cumsum([len(x) for x in images])]),
                            self.jpeg[used], image_of.reshape(-1), self.views[index], self.channels, self.image_px)

    @staticmethod
    def cat(parts: list["EncodedBatch"]) -> "EncodedBatch":
        images = np.cumsum([0] + [len(p.jpeg) for p in parts])
        nbytes = np.cumsum([0] + [len(p.data) for p in parts])
        return EncodedBatch(torch.cat([p.data for p in parts]),
                            torch.cat([torch.zeros(1, dtype=torch.int64)] + [p.offsets[1:] + int(b) for p, b in
                                                                              zip(parts, nbytes)]),
                            torch.cat([p.jpeg for p in parts]),
                            torch.cat([p.image_of + int(o) for p, o in zip(parts, images)]),
                            torch.cat([p.views for p in parts]), parts[0].channels, parts[0].image_px)

    def pin_memory(self) -> "EncodedBatch":
        return self      # nvJPEG reads the bytes from pageable memory itself

    def decode(self, device: torch.device) -> torch.Tensor:
        """uint8 (m, C, px, px) on `device`: each image decoded once (`shards.decode_on_device`), each view replayed
        there (`replay_float`)."""
        images = decode_on_device([self.image(i) for i in range(len(self.jpeg))], self.jpeg.tolist(), self.channels,
                                  device)
        return torch.stack([replay_float(images[i], v, self.image_px)
                            for i, v in zip(self.image_of.tolist(), self.views.tolist())])


def _collate_encoded(batch: list[EncodedBatch], *, collate_fn_map=None) -> EncodedBatch:
    return EncodedBatch.cat(batch)


default_collate_fn_map[EncodedBatch] = _collate_encoded   # DataLoader's documented extension point


def eval_view(image: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """uint8 evaluation view: resize the short side to eval_resize_px and centre-crop image_px (or resize to image_px)."""
    _, height, width = image.shape
    if spec.eval_resize_px == 0:
        return replay(image, np.array([0, 0, height, width, 0]), spec.image_px)
    scale = spec.eval_resize_px / min(height, width)
    crop = spec.image_px / scale                      # the crop, in source pixels
    h, w = min(height, round(crop)), min(width, round(crop))
    return replay(image, np.array([(height - h) // 2, (width - w) // 2, h, w, 0]), spec.image_px)


def photometric(x: torch.Tensor, rng: np.random.Generator, teacher: TeacherCfg) -> torch.Tensor:
    """Data-augmentation teachers' extra noise on a uint8 view -> float32 in [0, 1].

    paper: colour jitter of strength `jitter` (brightness, contrast, saturation) in random order,
    then Gaussian noise of `noise_std`. official: SimCLR jitter (0.8, 0.8, 0.8, 0.2) with p=0.8,
    then grayscale with p=0.2, no noise.
    """
    x = to_unit(x)
    official = teacher.aug_style == "official"
    strength = (0.8, 0.8, 0.8, 0.2) if official else (teacher.jitter, teacher.jitter, teacher.jitter, 0.0)
    rgb = x.shape[0] == 3
    if not official or rng.random() < 0.8:
        for op in rng.permutation(4):
            s = strength[op]
            if s == 0 or (op >= 2 and not rgb):   # saturation and hue need colour
                continue
            if op == 0:
                x = TF.adjust_brightness(x, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
            elif op == 1:
                x = TF.adjust_contrast(x, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
            elif op == 2:
                x = TF.adjust_saturation(x, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
            else:
                x = TF.adjust_hue(x, float(rng.uniform(-s, s)))
    if official and rgb and rng.random() < 0.2:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if not official and teacher.noise_std > 0:
        noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
        x = (x + teacher.noise_std * noise).clamp_(0.0, 1.0)
    return x
