"""cRT (classifier re-training, Kang et al. 2020): a new cosine classifier on a stage-1 model's frozen
features, trained with class-balanced sampling.

The features are the teacher's cached descriptors, one stored view per copy, so training decodes no
image and runs no backbone: it takes seconds. The result is saved as a whole network (the teacher's
backbone with the new classifier) so that evaluation, NCM and the tables treat it like any model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_labels
from cbd_cache.data.stream import DescriptorStream
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.models.networks import CosineClassifier, Network
from cbd_cache.stages.student import StudentPlan, already_done, student_meta
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.skeleton import train_model
from cbd_cache.train.steps import classifier_step
from cbd_cache.workdir import Workdir


def train_crt(cfg: Config, wd: Workdir, runtime: Runtime, plan: StudentPlan) -> Path:
    """Train the new classifier on `student.init`'s cached descriptors; save teacher backbone + classifier."""
    if already_done(plan):
        return plan.checkpoint
    s = cfg.student
    teacher = s.init.split("/", 1)[1]
    manifest = Manifest.load(wd.manifest)
    reader = CacheReader(wd.cache, manifest, [teacher], s.views)
    block = reader.read(0, manifest.train.num_samples)
    labels = read_labels(manifest, "train")
    # kept as the cache serves them (float16: 3.8 GB at ImageNet-LT, half of float32), widened per batch on the device
    stream = DescriptorStream(block, labels, manifest.train.class_counts, s.sampling, s.seed)
    log(f"[student {plan.name}] {plan.kind}: new cosine classifier on {int(block.count.sum())} cached descriptors "
        f"of {len(labels)} images ({teacher}), {s.sampling} sampling")

    def with_backbone(classifier: torch.nn.Module) -> Network:
        net, _ = load_checkpoint(plan.init)
        net.classifier = classifier.cpu()
        return net
    return train_model(plan, s, lambda: CosineClassifier(block.targets.shape[-1], manifest.num_classes, s.gamma),
                       stream, classifier_step(runtime), runtime, cfg, manifest, student_meta(cfg, plan, manifest),
                       arch=cfg.teacher_by_name(teacher).arch, network=with_backbone, in_process=True)
