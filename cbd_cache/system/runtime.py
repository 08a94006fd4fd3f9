"""The machine a stage runs on: device, mixed precision, memory format, loader workers."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cbd_cache.config import PipelineCfg
from cbd_cache.errors import ConfigError
from cbd_cache.system import distributed
from cbd_cache.system.distributed import Dist
from cbd_cache.system.signals import loader_worker_signals

if TYPE_CHECKING:   # a type only: views sit above system
    from cbd_cache.views import EncodedBatch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype, None for full precision
    channels_last: bool
    workers: int
    compile: bool
    dist: Dist = Dist()              # this process's rank in a torchrun job (a world of one without torchrun)
    checkpoint_steps: int = 0
    checkpoint_minutes: float = 10.0
    accumulate: int = 1              # micro-batches per optimiser step (pipeline.accumulate)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: "torch.Tensor | EncodedBatch") -> torch.Tensor:
        """A loader's batch on the device, in [0, 1] floats (`to_unit`) and the model's memory format;
        views still encoded (`views.decode = "gpu"`) are decoded and replayed there first."""
        if not isinstance(images, torch.Tensor):    # an EncodedBatch: it decodes itself on the device
            images = images.decode(self.device)
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
            kw.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=loader_worker_signals)
        return kw


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; float tensors (photometrically augmented views) pass through.

    A multiply, not a divide: CUDA divides by a scalar as a multiply by its reciprocal and the CPU
    divides, so only the multiply gives the same bits on both, wherever a batch is converted.
    """
    return x.float().mul_(1 / 255) if x.dtype == torch.uint8 else x


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
    rank = distributed.init(device, cfg.rank_timeout_minutes)
    cuda = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if cuda else None, "bf16": torch.bfloat16, "off": None}[cfg.amp]
    channels_last = {"auto": cuda, "on": True, "off": False}[cfg.channels_last]
    cores = cpu_count()
    workers = cfg.workers if cfg.workers >= 0 else loader_workers(cuda, cores)
    if cuda:   # fixed input sizes: let cuDNN pick its fastest kernels; TF32 for whatever runs outside bf16
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:   # the step's threads get the cores the loader workers leave
        torch.set_num_threads(max(1, cores - workers))
    return Runtime(device, amp, channels_last, workers, cfg.compile, rank, cfg.checkpoint_steps,
                   cfg.checkpoint_minutes, cfg.accumulate)
