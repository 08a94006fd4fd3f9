"""cRT (classifier re-training, Kang et al. 2020): a new cosine classifier on a stage-1 model's frozen
features, trained with class-balanced sampling.

The features are the teacher's cached descriptors, one stored view per copy, so training decodes no
image and runs no backbone: it takes seconds. The result is saved as a whole network (the teacher's
backbone with the new classifier) so that evaluation, NCM and the tables treat it like any model.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from .cache import CacheReader, ViewBlock
from .checkpoint import load_checkpoint, network_spec
from .config import Config
from .data.manifest import Manifest
from .data.sampling import copies, repeat_factors, walk_order
from .data.shards import read_labels
from .engine import fit
from .evaluation import evaluate_network
from .logs import log
from .models import CosineClassifier
from .runtime import Runtime
from .seeding import seed_everything
from .student import finish_run, finished, plan_student
from .summaries import Summaries
from .workdir import Workdir


class DescriptorStream(IterableDataset):
    """Endless (descriptor, label) copies: the sampler's copies of each image, each its next stored view.

    Like `TrainStream` (same repeat factors, N samples an epoch, the same walk without replacement
    over each image's views) but over an in-memory `ViewBlock` of every row, so the shuffle is a full
    permutation, and the walk counts every earlier draw exactly: the sequence is global and replayed
    from its start.
    """

    def __init__(self, block: ViewBlock, labels: np.ndarray, class_counts: list[int], sampling: str, seed: int):
        self.block, self.labels = block, labels
        self.factors = repeat_factors(class_counts, sampling)
        self.seed = seed
        self.samples_per_epoch = len(labels)
        self.rank, self.world, self.skip = 0, 1, 0

    def place(self, rank: int, world: int, batches_done: int = 0, batch_size: int = 1) -> "DescriptorStream":
        """Rank `rank` takes every `world`-th copy of the one global sequence, after `batches_done` batches."""
        placed = copy.copy(self)
        placed.rank, placed.world, placed.skip = rank, world, batches_done * batch_size * world
        return placed

    def sequence(self) -> Iterator[tuple[int, int]]:
        """The global, endless (row, flat view index) sequence: a fresh permutation of the sampler's copies per pass."""
        epoch, drawn = 0, np.zeros(len(self.labels), dtype=np.int64)
        offset, count = self.block.offset, self.block.count
        orders: dict[tuple[int, int], np.ndarray] = {}
        while True:
            rng = np.random.default_rng([self.seed, epoch, 0xC27])
            n = [copies(self.factors[y], u) for y, u in zip(self.labels, rng.random(len(self.labels)))]
            for r in rng.permutation(np.repeat(np.arange(len(self.labels)), n)).tolist():
                lap, step = divmod(int(drawn[r]), int(count[r]))
                drawn[r] += 1
                if (r, lap) not in orders:
                    orders[(r, lap)] = walk_order(self.seed, r, lap, int(count[r]))
                yield r, int(offset[r]) + int(orders[(r, lap)][step])
            orders.clear()
            epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for r, v in itertools.islice(self.sequence(), self.skip + self.rank, None, self.world):
            yield torch.from_numpy(self.block.targets[v]), int(self.labels[r])


def classifier_step(runtime: Runtime):
    def step(model: torch.nn.Module, batch: tuple):
        v, y = batch[0].to(runtime.device, non_blocking=True).float(), batch[1].to(runtime.device, non_blocking=True)
        ce = F.cross_entropy(model(v).float(), y)
        return ce, {"ce": ce.detach()}
    return step


def train_crt(cfg: Config, wd: Workdir, runtime: Runtime) -> Path:
    """Train the new classifier on `student.init`'s cached descriptors; save teacher backbone + classifier."""
    plan = plan_student(cfg, wd)
    if finished(plan):
        return plan.folder / "checkpoint.pt"
    s = cfg.student
    teacher = s.init.split("/", 1)[1]
    manifest = Manifest.load(wd.manifest)
    reader = CacheReader(wd.cache, manifest, [teacher], s.views)
    block = reader.read(0, manifest.train.num_samples)
    labels = read_labels(manifest, "train")
    # kept as the cache serves them (float16: 3.8 GB at ImageNet-LT, half of float32), widened per batch on the device
    stream = DescriptorStream(block, labels, manifest.train.class_counts, s.sampling, s.seed)
    seed_everything(s.seed)
    classifier = runtime.prepare_model(CosineClassifier(block.targets.shape[-1], manifest.num_classes, s.gamma))
    log(f"[student {plan.name}] {plan.kind}: new cosine classifier on {int(block.count.sum())} cached descriptors "
        f"of {len(labels)} images ({teacher}), {s.sampling} sampling")
    in_process = dataclasses.replace(runtime, workers=0)    # in-memory data: loader processes only cost
    summaries = Summaries(plan.folder, cfg.pipeline.tensorboard)
    history, wall_s = fit(classifier, stream, s, classifier_step(runtime), in_process, f"student {plan.name}",
                          plan.folder, plan.recipe, summaries.epoch)
    summaries.close()
    if not runtime.dist.main:   # under torchrun rank 0 evaluates and writes the run folder
        return plan.folder / "checkpoint.pt"
    net, meta = load_checkpoint(wd.teacher_checkpoint(teacher))
    net.classifier = classifier.cpu()
    test = evaluate_network(net, manifest, cfg, runtime, manifest.eval_split)
    spec = network_spec(net, meta["network"]["arch"], manifest.channels, manifest.num_classes, s.gamma)
    return finish_run(cfg, plan, net, spec, history, wall_s, test, manifest)
