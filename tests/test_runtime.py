"""The GPU path's settings, exercised on CPU: bf16 autocast and channels_last change the numbers a little,
not the result; loader workers are sized from the machine."""
import shutil
import signal

import numpy as np
import torch

import cli
from cbd_cache.cache.reader import CacheReader
from cbd_cache.data.manifest import Manifest
from cbd_cache.stages.export import export_cache
from cbd_cache.system import allocator
from cbd_cache.system.runtime import loader_workers, make_runtime
from cbd_cache.system.signals import raise_on_signals

from .conftest import smoke_config


def test_loader_workers_are_sized_from_the_machine():
    assert loader_workers(cuda=True, cores=16) == 8 and loader_workers(cuda=True, cores=4) == 3
    assert loader_workers(cuda=False, cores=2) == 0          # the step's threads use both cores
    assert loader_workers(cuda=False, cores=16) == 4
    runtime = make_runtime(smoke_config("pipeline.workers=2").pipeline)
    kw = runtime.loader_kwargs()
    assert kw["num_workers"] == 2 and kw["persistent_workers"] and not kw["pin_memory"]   # pinned only on CUDA


class SignalHandlers(torch.utils.data.IterableDataset):
    """Yields, from inside a loader worker, what SIGTERM and SIGINT do there."""

    def __iter__(self):
        yield [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)]


def test_loader_workers_leave_sigterm_and_ctrl_c_to_their_parent():
    """The CLI's handlers raise Interrupted; a loader worker that inherited them would print a traceback on a
    SLURM step's SIGTERM or a Ctrl-C, or die before its parent has finished the step it is feeding."""
    raise_on_signals()
    try:
        runtime = make_runtime(smoke_config("pipeline.workers=1").pipeline)
        loader = torch.utils.data.DataLoader(SignalHandlers(), batch_size=None, **runtime.loader_kwargs())
        assert next(iter(loader)) == [str(signal.SIG_IGN)] * 2
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


class RecordingLibc:
    """Stands in for glibc: records the mallopt calls and answers as glibc does on success."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_keep_freed_memory_turns_off_mmap_and_trimming():
    """What the project asks of the allocator; what that saves is measured by benchmarks/bench_malloc.py."""
    lib = RecordingLibc()
    assert allocator.keep_freed_memory(lib)
    assert sorted(lib.calls) == sorted([(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, allocator.NEVER_TRIM)])
    assert (allocator.M_MMAP_MAX, allocator.M_TRIM_THRESHOLD) == (-4, -1)   # glibc's malloc.h numbers


def test_the_cli_applies_the_allocator_settings_once_per_runtime(monkeypatch, tmp_path):
    applied = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: applied.append(1))
    ctx = cli.Context(smoke_config(), tmp_path)
    ctx.runtime, ctx.runtime
    assert applied == [1]


def test_bf16_channels_last_export_matches_float32(smoke_copy):
    manifest = Manifest.load(smoke_copy.manifest)
    rows = manifest.train.num_samples
    block = CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"]).read(0, rows)
    fp32 = block.targets[block.every_view()].astype(np.float32)        # every view, no chunk padding
    cfg = smoke_config("pipeline.amp=bf16", "pipeline.channels_last=on")
    runtime = make_runtime(cfg.pipeline)
    assert runtime.amp_dtype == torch.bfloat16 and runtime.channels_last
    shutil.rmtree(smoke_copy.cache)
    export_cache(cfg, smoke_copy, runtime)
    block = CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"]).read(0, rows)
    bf16 = block.targets[block.every_view()].astype(np.float32)
    assert not np.array_equal(bf16, fp32)                    # autocast really ran in bf16
    for part in (slice(0, 64), slice(64, 128)):
        a, b = bf16[..., part], fp32[..., part]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.mean() > 0.995 and cos.min() > 0.95
