"""The machine a stage runs on: device, mixed precision, memory format, loader workers, progress lines."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .config import ConfigError, PipelineCfg
from .distributed import Dist
from .views import to_unit


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype, None for full precision
    channels_last: bool
    workers: int
    compile: bool
    dist: Dist = Dist()              # this process's rank in a torchrun job (a world of one without torchrun)
    resume: bool = False             # training continues from the run folder's resume checkpoint
    checkpoint_steps: int = 0
    checkpoint_minutes: float = 10.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A loader's batch on the device, in [0, 1] floats (`views.to_unit`) and the model's memory format."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:    # permuted while still uint8: a quarter of the bytes
            images = images.contiguous(memory_format=torch.channels_last)
        return to_unit(images)    # .float() keeps the memory format

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_teacher(self, net: torch.nn.Module) -> torch.nn.Module:
        """A frozen teacher for export or online targets: eval mode, device, memory format, and with
        `pipeline.compile` a compiled feature extractor (only `features` runs, so only it is compiled)."""
        net = self.prepare_model(net.eval().requires_grad_(False))
        if self.compile and hasattr(net, "backbone"):
            net.backbone = torch.compile(net.backbone)
        return net

    def loader_kwargs(self) -> dict:
        """Worker processes feed the step; on CUDA they copy into pinned memory for asynchronous transfers."""
        kw: dict = {"num_workers": self.workers, "pin_memory": self.cuda}
        if self.workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=4)
        return kw


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def loader_workers(cuda: bool, cores: int) -> int:
    """Loader processes for `pipeline.workers = -1`.

    CUDA: up to 8, leaving the main process a core to launch kernels. CPU: the step's own threads
    already use every core, and a worker beside them only steals those cores (on 2 cores the
    embedded default's export was slower with one worker, niced or not, than without), so small
    machines load in the main process between steps and larger ones give a quarter of their cores
    to loading.
    """
    if cuda:
        return min(8, max(cores - 1, 1))
    return 0 if cores <= 2 else min(8, cores // 4)


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks for the next batch instead of handing them back to the OS.

    PyTorch allocates CPU tensors with plain malloc, and glibc serves large blocks with fresh
    mappings and trims the freed top of the heap: then every batch page-faults its activations in
    again, and the kernel zero-fills them page by page (README, Performance). So: no mappings at all
    (every block comes from the heap, where a freed one is reused) and no trimming. Memory stays at
    its peak, as under CUDA's caching allocator. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:   # pragma: no cover - not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def make_runtime(cfg: PipelineCfg) -> Runtime:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"pipeline.device={cfg.device}: CUDA is not available on this machine")
    world = distributed.from_env()
    if world.world > 1 and device.type == "cuda":   # torchrun: one GPU per process, cuda:LOCAL_RANK
        if device.index is not None:
            raise ConfigError(f"pipeline.device={cfg.device}: under torchrun each process takes cuda:LOCAL_RANK; "
                              "use auto or cuda")
        device = torch.device("cuda", world.local_rank)
    rank = distributed.init(device)
    cuda = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if cuda else None, "bf16": torch.bfloat16, "off": None}[cfg.amp]
    channels_last = {"auto": cuda, "on": True, "off": False}[cfg.channels_last]
    cores = cpu_count()
    workers = cfg.workers if cfg.workers >= 0 else loader_workers(cuda, cores)
    keep_freed_memory()
    if cuda:   # fixed input sizes: let cuDNN pick its fastest kernels; TF32 for whatever runs outside bf16
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:   # the step's threads get the cores the loader workers leave
        torch.set_num_threads(max(1, cores - workers))
    return Runtime(device, amp, channels_last, workers, cfg.compile, rank, False, cfg.checkpoint_steps,
                   cfg.checkpoint_minutes)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log(message: str) -> None:
    """A progress line on stderr; under torchrun only rank 0 speaks (errors still surface from every rank)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Prints `[tag] done/total unit  N unit/s  eta` at most every `every_s` seconds, and at the end."""

    def __init__(self, tag: str, total: int, unit: str = "img", every_s: float = 10.0):
        self.tag, self.total, self.unit, self.every_s = tag, total, unit, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every_s or self.done >= self.total

    def report(self, extra: str = "") -> None:
        self.last = time.perf_counter()
        log(self.line(extra))

    def update(self, n: int, extra: str = "") -> None:
        self.advance(n)
        if self.due():
            self.report(extra)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self, extra: str = "") -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / max(self.total, 1)
        tail = f"  {extra}" if extra else ""
        return (f"[{self.tag}] {self.done}/{self.total} {self.unit} ({pct:.0f}%)  {rate:,.0f} {self.unit}/s  "
                f"eta {format_seconds(eta)}{tail}")
