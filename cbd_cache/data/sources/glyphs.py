"""Printed Chinese characters rendered from the installed CJK fonts: a many-class set built on this machine.

Classes are `data.num_classes` characters drawn by `data.seed` from GB2312 level 1 (the 3,755 common
hanzi). Each image is a pure function of (data.seed, split, character, index): a face, drawn from
the faces that have the character, an affine warp, a stroke weight, blur, contrast and noise, all
scaled by `data.distortion`. Faces whose rendering of a character is pixel-identical count once, and
a face that lacks a character (its `.notdef` box) is never used for it. Every font file used is in
the manifest with its SHA-256, so data made from another font set is named, never silently alike.

The val and test splits are balanced (`data.test_per_class` each), drawn from the same faces as
training, at indices training never uses: the benchmark measures the long tail of classes, not
generalisation to a new typeface (docs/datasets.md).
"""
from __future__ import annotations

import hashlib
import math
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cbd_cache.data.sources.base import Record, Source, encode_png
from cbd_cache.errors import ConfigError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg

FONT_SUFFIXES = (".ttf", ".ttc", ".otf", ".otc")
FONT_PACKAGES = ("fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp fonts-arphic-bsmi00lp "
                 "fonts-arphic-gbsn00lp fonts-arphic-gkai00mp fonts-wqy-zenhei fonts-wqy-microhei "
                 "fonts-ipafont-gothic fonts-ipafont-mincho fonts-hanazono")   # = the Makefile's (a test checks)
FONT_HINT = (f"install the CJK fonts: sudo apt-get update && sudo apt-get install {FONT_PACKAGES} "
             "(or `make data`), or point --set data.root=DIR at a font folder")
MIN_FACES = 4            # a class needs this many distinct faces
RENDER_PX = 64           # glyphs are drawn and warped at this size, then reduced to data.image_px
FONT_PX = 48
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
NOTDEF_PROBE = "\U0010fffd"   # a private-use code point no font maps: what the face draws for a missing glyph


def gb2312_level1() -> list[str]:
    """The 3,755 level-1 hanzi of GB2312 in code order (rows 0xB0..0xD7; row 0xD7 stops at 0xF9)."""
    chars = []
    for row in range(0xB0, 0xD8):
        for col in range(0xA1, 0xFA if row == 0xD7 else 0xFF):
            chars.append(bytes([row, col]).decode("gb2312"))
    return chars


def font_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_faces(path: Path, size: int) -> list[ImageFont.FreeTypeFont]:
    """Every face of a font file (a .ttc / .otc collection holds several)."""
    faces = []
    while True:
        try:
            faces.append(ImageFont.truetype(str(path), size, index=len(faces)))
        except OSError:
            return faces
        if path.suffix.lower() not in (".ttc", ".otc"):
            return faces


def glyph_bitmap(face: ImageFont.FreeTypeFont, char: str) -> tuple[tuple[int, int], bytes]:
    mask = face.getmask(char)
    return mask.size, bytes(mask)


class Glyphs(Source):
    """`data.format = "glyphs"`: `data.root` is the font folder (default pipelines: /usr/share/fonts)."""

    channels = 1
    splits = ("train", "val", "test")

    def __init__(self, cfg: DataCfg):
        self.cfg = cfg
        root = Path(cfg.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={cfg.root}: no such font folder; {FONT_HINT}")
        pool = gb2312_level1()
        if not 2 <= cfg.num_classes <= len(pool):
            raise ConfigError(f"data.num_classes={cfg.num_classes}: glyphs draws 2..{len(pool)} characters")
        rng = np.random.default_rng([cfg.seed, 0x6C7F])
        self.chars = [pool[i] for i in sorted(rng.choice(len(pool), cfg.num_classes, replace=False))]
        self.class_names = [f"U+{ord(c):04X} {c}" for c in self.chars]
        self.faces, self.class_faces = self._find_faces(root)
        self.files = sorted({path for path, _ in self.faces})
        self.description = {
            "format": "glyphs", "num_classes": cfg.num_classes, "image_px": cfg.image_px,
            "distortion": cfg.distortion,
            "fonts": [{"file": str(p), "sha256": file_sha256(Path(p)),
                       "faces": sorted(i for q, i in self.faces if q == p)} for p in self.files],
            "faces_per_class": [len(f) for f in self.class_faces],
        }

    def _find_faces(self, root: Path) -> tuple[list[tuple[str, int]], list[list[int]]]:
        """(every face that draws one of the classes, per class the distinct faces that draw it)."""
        faces: list[tuple[str, int]] = []
        fonts: list[ImageFont.FreeTypeFont] = []
        for path in font_files(root):
            for i, face in enumerate(open_faces(path, FONT_PX)):
                faces.append((str(path), i))
                fonts.append(face)
        notdef = [glyph_bitmap(f, NOTDEF_PROBE) for f in fonts]
        used: set[int] = set()
        class_faces = []
        for char in self.chars:
            seen, mine = set(), []
            for k, face in enumerate(fonts):
                bitmap = glyph_bitmap(face, char)
                if bitmap == notdef[k] or bitmap[0][0] == 0 or bitmap in seen:
                    continue
                seen.add(bitmap)
                mine.append(k)
            if len(mine) < MIN_FACES:
                raise ConfigError(f"data.root={root}: {len(mine)} font face(s) draw {char} (U+{ord(char):04X}), "
                                  f"glyphs needs {MIN_FACES}; {FONT_HINT}")
            used.update(mine)
            class_faces.append(mine)
        keep = sorted(used)
        index = {k: j for j, k in enumerate(keep)}
        return [faces[k] for k in keep], [[index[k] for k in mine] for mine in class_faces]

    def records(self, split: str) -> list[Record]:
        per_class = self.cfg.n_max if split == "train" else self.cfg.test_per_class
        return [Record(f"{split}-{c:04d}-{j:05d}", c, (split, c, j))
                for c in range(self.cfg.num_classes) for j in range(per_class)]

    @cached_property
    def _fonts(self) -> dict[int, ImageFont.FreeTypeFont]:
        return {}

    def _font(self, k: int) -> ImageFont.FreeTypeFont:
        if k not in self._fonts:
            path, index = self.faces[k]
            self._fonts[k] = ImageFont.truetype(path, FONT_PX, index=index)
        return self._fonts[k]

    def __getstate__(self) -> dict[str, Any]:   # loader processes open their own fonts
        state = dict(self.__dict__)
        state.pop("_fonts", None)
        return state

    def _draw(self, record: Record) -> tuple[int, np.random.Generator]:
        """(the face of a record, the generator its distortions continue from): the one place both come from."""
        split, c, j = record.ref
        rng = np.random.default_rng([self.cfg.seed, SPLIT_IDS[split], ord(self.chars[c]), j])
        return self.class_faces[c][rng.integers(len(self.class_faces[c]))], rng

    def face_of(self, record: Record) -> int:
        """Which face (an index into `faces`) draws a record's image."""
        return self._draw(record)[0]

    def read(self, record: Record) -> tuple[bytes, str]:
        face, rng = self._draw(record)
        image = render(self.chars[record.label], self._font(face), rng, self.cfg.image_px, self.cfg.distortion)
        return encode_png(image), "png"

    def summary(self) -> list[str]:
        per_class = self.description["faces_per_class"]
        return [f"fonts: {len(self.faces)} faces in {len(self.files)} files under {self.cfg.root}; distinct faces "
                f"per class {min(per_class)}..{max(per_class)} (median {int(np.median(per_class))})",
                "classes: " + " ".join(self.chars[:40]) + (" ..." if len(self.chars) > 40 else "")]


def render(char: str, face: ImageFont.FreeTypeFont, rng: np.random.Generator, image_px: int,
           distortion: float) -> np.ndarray:
    """One image of `char` in `face`: stroke weight, affine warp and blur at RENDER_PX, then reduced to
    `image_px`, with random contrast and noise. Draws its parameters from `rng` in a fixed order."""
    d = distortion
    weight = int(rng.integers(-1, 3)) if d > 0 else 0          # -1 thins, 1..2 thicken (pixels at RENDER_PX)
    canvas = Image.new("L", (RENDER_PX, RENDER_PX), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=face, stroke_width=max(weight, 0))
    origin = ((RENDER_PX - (right - left)) / 2 - left, (RENDER_PX - (bottom - top)) / 2 - top)
    draw.text(origin, char, fill=255, font=face, stroke_width=max(weight, 0), stroke_fill=255)
    if weight < 0:
        canvas = canvas.filter(ImageFilter.MinFilter(3))
    angle = math.radians(rng.uniform(-12, 12) * d)
    shear = rng.uniform(-0.25, 0.25) * d
    scale = 1.0 + rng.uniform(-0.15, 0.1) * d
    shift = rng.uniform(-0.08, 0.08, 2) * d * RENDER_PX
    # output -> input map about the centre: (rotation x shear x scale)^-1, then the shift
    a, b = math.cos(angle), -math.sin(angle)
    forward = np.array([[a, b], [-b, a]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inverse = np.linalg.inv(forward)
    centre = np.array([RENDER_PX / 2, RENDER_PX / 2])
    offset = centre - inverse @ (centre + shift)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE,
                              (*inverse[0], offset[0], *inverse[1], offset[1]), resample=Image.Resampling.BILINEAR)
    blur = rng.uniform(0, 1.5) * d
    if blur > 0.05:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    small = np.asarray(canvas.resize((image_px, image_px), Image.Resampling.BOX), dtype=np.float32) / 255
    ink, paper = rng.uniform(1 - 0.5 * min(d, 1), 1.0), rng.uniform(0, 0.4 * min(d, 1))
    img = paper + (ink - paper) * small + rng.normal(0, 0.08 * d, small.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
