"""What the benchmarks share: their workdirs (real prepare and export, untrained teachers), synthetic
JPEG data at ImageNet sizes, the machine's description, and the results files.

Teachers here are untrained networks of the pipeline's architectures: a forward pass costs the same
whatever the weights, so speed and bytes are measured without spending minutes training them.
Accuracy claims (results/int8.md) use trained teachers instead.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbd_cache.config import Config, DataCfg, load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import prepare
from cbd_cache.data.sources import Record, Synthetic
from cbd_cache.models.checkpoints import network_spec, save_checkpoint
from cbd_cache.models.networks import Network
from cbd_cache.system.allocator import keep_freed_memory
from cbd_cache.system.logs import log
from cbd_cache.system.machine import code_commit, machine, machine_text
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.engine import train_step
from cbd_cache.workdir import Workdir

RESULTS = Path(os.environ.get("CBD_RESULTS", ROOT / "results"))   # a test points it elsewhere
keep_freed_memory()   # the benchmarks time what the CLI runs, and the CLI applies it (allocator.py)

# The 224 px case: ImageNet-LT's recipe (ResNet-50, 224 px views of area (0.05, 1), K = 4) on
# synthetic JPEGs, with batch and dataset sizes a 2-core CPU gets through in a few minutes.
RN50_OVERRIDES = ("data.format=synthetic", "data.profile=none", "data.num_classes=8", "data.n_max=8",
                  "data.test_per_class=1", "data.shard_size=32", "export.views=2", "export.batch_size=32",
                  "student.batch_size=16", "student.shuffle_buffer=64", "eval.batch_size=32")


class SyntheticJPEG(Synthetic):
    """RGB JPEGs at ImageNet's typical sizes (short side 256..400, aspect 3/4..4/3), quality 90.

    The `synthetic` reader's records; class c is a colour grating (angle pi*c/C) plus noise, so
    decode and crop cost what ImageNet's photos cost.
    """

    def __init__(self, cfg: DataCfg):
        super().__init__(cfg)
        self.description = {"format": "synthetic_jpeg", "num_classes": cfg.num_classes}

    def read(self, record: Record) -> tuple[bytes, str]:
        split, c, j = record.ref
        C = self.cfg.num_classes
        rng = np.random.default_rng([self.cfg.seed, 0 if split == "train" else 1, c, j])
        short = int(rng.integers(256, 401))
        long = int(short * rng.uniform(1.0, 4 / 3))
        h, w = (short, long) if rng.random() < 0.5 else (long, short)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        angle = np.pi * c / C
        wave = np.sin(2 * np.pi * 6 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        hue = np.array([np.cos(2 * np.pi * c / C), np.cos(2 * np.pi * (c / C + 1 / 3)), np.cos(2 * np.pi * (c / C + 2 / 3))])
        img = 0.5 + 0.3 * wave[..., None] * hue[None, None, :] + rng.normal(0, 0.08, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"


def photo(rng: np.random.Generator, width: int, height: int, texture: float = 0.2) -> Image.Image:
    """A synthetic photo whose JPEG costs what a photo's does: a dead-leaves picture (opaque discs of random
    colours with radii ~ 1/r^3, the scale-invariant occlusion statistics of natural images), blurred
    slightly, shaded by 1/f noise (`texture`, relative amplitude) and given sensor noise (sigma 2.5).

    At quality 90 a 500 x 375 one takes about 100 KB (0.55 bytes per pixel; texture 0.1: 78 KB, 0.3: 114 KB),
    about ImageNet's average (ILSVRC-2012's 1.28 M training JPEGs take 138 GiB, ~110 KB each). Flat or
    noise-free pictures compress several times smaller and decode faster than photos.
    """
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    rmin, rmax = 2.0, max(width, height) / 3
    n = int(2.5 * width * height / (np.pi * rmin * rmax))
    r = rmin * rmax / (rmax - rng.random(n) * (rmax - rmin))
    xs, ys = rng.uniform(-rmax / 4, width, n), rng.uniform(-rmax / 4, height, n)
    for x, y, rr, c in zip(xs, ys, r, rng.integers(0, 256, (n, 3))):
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=tuple(int(v) for v in c))
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** 0.9
    spectrum[0, 0] = 0
    shade = np.fft.irfft2(spectrum, s=(height, width))
    a = a * (1 + texture * (shade / shade.std())[..., None]) + rng.normal(0, 2.5, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like ImageNet's: most photos 500 px on the long side (4:3 or 3:2, a quarter
    portrait), 15 % smaller (long side 300..499) and 15 % larger (640..1024). An assumed mixture
    around ImageNet's typical 500 x 375 / 500 x 333, not a measured histogram."""
    u = rng.random()
    long = 500 if u < 0.7 else int(rng.integers(300, 500)) if u < 0.85 else int(rng.integers(640, 1025))
    short = int(round(long / (4 / 3 if rng.random() < 0.6 else 1.5)))
    return (long, short) if rng.random() < 0.75 else (short, long)


class PhotoJPEG(Synthetic):
    """The synthetic reader's records as `photo`s at `photo_size`s, JPEG quality 90."""

    def __init__(self, cfg: DataCfg):
        super().__init__(cfg)
        self.description = {"format": "photo_jpeg", "num_classes": cfg.num_classes}

    def read(self, record: Record) -> tuple[bytes, str]:
        split, c, j = record.ref
        rng = np.random.default_rng([self.cfg.seed, 0 if split == "train" else 1, c, j, 0xF070])
        buf = io.BytesIO()
        photo(rng, *photo_size(rng)).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"


def bench_config(case: str, extra: tuple[str, ...] = ()) -> Config:
    """`small`: the embedded default (Fashion-MNIST-LT, ResNet-8, 28 px); `draws`: the same on a draws-allocated
    cache. `rn50`: 224 px ResNet-50, K = 4."""
    if case == "small":
        return load_config(ROOT / "pipelines" / "fashion_mnist_lt.toml", extra)
    if case == "draws":   # the small case on a ragged cache: views where the class-balanced student draws them
        return load_config(ROOT / "pipelines" / "fashion_mnist_lt.toml", ("export.allocation=draws", *extra))
    if case == "rn50":
        return load_config(ROOT / "pipelines" / "imagenet_lt.toml", RN50_OVERRIDES + tuple(extra))
    raise ValueError(f"unknown case {case!r}")


def untrained_teachers(cfg: Config, wd: Workdir, runtime: Runtime | None = None) -> None:
    """A checkpoint per teacher of the pipeline: its architecture and seed, weights at initialisation."""
    manifest = Manifest.load(wd.manifest)
    for t in cfg.teachers:
        path = wd.teacher_checkpoint(t.name)
        if path.is_file():
            continue
        torch.manual_seed(t.seed)
        net = Network(t.arch, manifest.channels, manifest.num_classes, t.gamma)
        spec = network_spec(net, t.arch, manifest.channels, manifest.num_classes, t.gamma)
        save_checkpoint(path, net, spec, {"name": t.name, "seed": t.seed, "untrained": True,
                                          "manifest_fingerprint": manifest.fingerprint})


def bench_workdir(case: str, root: Path, cfg: Config) -> Workdir:
    """Prepared data and untrained teachers for `case` under `root/case` (reused when already there)."""
    wd = Workdir(Path(root) / case)
    prepare(cfg, wd, SyntheticJPEG(cfg.data) if case == "rn50" else None)
    untrained_teachers(cfg, wd)
    return wd


def runtime_info(runtime: Runtime) -> dict:
    return {"device": str(runtime.device), "amp": str(runtime.amp_dtype), "channels_last": runtime.channels_last,
            "workers": runtime.workers, "compile": runtime.compile}


def command() -> str:
    """How this script was run, from the repository root."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def write_results(name: str, payload: dict, markdown: str) -> None:
    """results/<name>.json and results/<name>.md, each naming the command, the commit and the machine."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"command": command(), "commit": code_commit(ROOT), "machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    m = payload["machine"]
    head = (f"Command: `{payload['command']}` at commit {payload['commit']}  \n"
            f"Machine: {machine_text(m)} ({m['torch_threads']} threads), {m['date_utc']} UTC\n\n")
    (RESULTS / f"{name}.md").write_text(markdown.replace("{head}", head))
    log(f"wrote {RESULTS / name}.md and .json")


class Timer:
    """Wall seconds of a block; `torch.cuda.synchronize` at both ends on CUDA."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def train_images_per_s(model: torch.nn.Module, batches, steps: int, optimizer, scheduler, step_fn, runtime,
               batch_size: int) -> float:
    """images/s of `steps` steps of `engine.train_step` (fit's step) on batches from an iterator."""
    model.train()
    with Timer(runtime.device) as t:
        for _ in range(steps):
            loss, _ = train_step(model, [next(batches)], step_fn, optimizer, scheduler, runtime)
        loss.item()   # the last step has finished
    return steps * batch_size / t.seconds


def env_threads() -> None:
    """Honour CBD_BENCH_THREADS (torch intra-op threads in the main process), for thread-count experiments."""
    n = os.environ.get("CBD_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
