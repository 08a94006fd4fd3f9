"""The GPU path's settings, exercised on CPU: bf16 autocast and channels_last change the numbers a little,
not the result; loader workers are sized from the machine."""
import resource
import shutil
import subprocess
import sys

import numpy as np
import torch

from cbd_cache.cache import CacheReader
from cbd_cache.data.manifest import Manifest
from cbd_cache.export import export_cache
from cbd_cache.runtime import loader_workers, make_runtime

from .conftest import smoke_config


def test_loader_workers_are_sized_from_the_machine():
    assert loader_workers(cuda=True, cores=16) == 8 and loader_workers(cuda=True, cores=4) == 3
    assert loader_workers(cuda=False, cores=2) == 0          # the step's threads use both cores
    assert loader_workers(cuda=False, cores=16) == 4
    runtime = make_runtime(smoke_config("pipeline.workers=2").pipeline)
    kw = runtime.loader_kwargs()
    assert kw["num_workers"] == 2 and kw["persistent_workers"] and not kw["pin_memory"]   # pinned only on CUDA


FAULTS_PER_BATCH = """
import resource, sys, torch
from cbd_cache.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(96 << 18).fill_(1.0)      # a 96 MiB activation, freed after each batch
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))                        # after the heap has grown to the peak
"""


def test_freed_activations_are_reused_without_page_faults():
    """glibc maps a 96 MiB block afresh on every allocation, so each batch page-faults it in again
    (24,576 faults); under keep_freed_memory the freed block is reused. In a fresh process each,
    since how a long-lived heap is fragmented decides where the next block lands."""
    pages = 10 * (96 << 20) // resource.getpagesize()
    run = lambda mode: int(subprocess.check_output([sys.executable, "-c", FAULTS_PER_BATCH, mode], text=True))
    assert run("default") >= pages
    assert run("keep") < pages // 4


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
