"""A classifier on a stage-1 model's frozen features, trained with class-balanced sampling (Kang et al. 2020):

cRT (`student.classifier_only`)   a new cosine classifier;
LWS (`student.rebalance = "lws"`)  the model's own classifier, frozen, under a learned per-class scale f_j.

From a teacher (`student.init = teachers/<name>`) the features are its cached descriptors, one stored
view per copy, so training decodes no image and runs no backbone: it takes seconds. From any other
model (`students/<run>`: say a feature extractor trained on other data) they are that model's
features of the student's views, computed each step with its backbone frozen in eval mode. Either
way the result is saved as a whole network (the model's backbone with the new classifier) so that
evaluation, NCM and the tables treat it like any model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_labels
from cbd_cache.loaders import DescriptorStream, TrainStream
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.models.networks import CosineClassifier, Network, PerClassHead
from cbd_cache.stages.student import StudentPlan, already_done, student_meta
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.runs import frozen_from_cache
from cbd_cache.train.skeleton import train_model
from cbd_cache.train.steps import classifier_step, cross_entropy_step
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir


def new_head(net: Network, cfg: Config, num_classes: int) -> nn.Module:
    """cRT's new cosine classifier, or LWS's frozen classifier of `net` under a per-class scale (init 1)."""
    if cfg.student.rebalance == "lws":
        base = net.classifier.base if isinstance(net.classifier, PerClassHead) else net.classifier
        for p in base.parameters():
            p.requires_grad_(False)
        return PerClassHead(base, num_classes)
    dim = net.projection[0].out_features if isinstance(net.projection, nn.Sequential) else net.dim
    return CosineClassifier(dim, num_classes, cfg.student.gamma)


class FrozenFeatures(nn.Module):
    """A trained network, frozen and in eval mode (BatchNorm statistics kept), under a trainable `head`:
    `forward` returns (head(e), e) with e = h(f(x)), as a Network does."""

    def __init__(self, net: Network, head: nn.Module):
        super().__init__()
        self.net, self.head = net, head
        for p in net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenFeatures":
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            e = self.net.projection(self.net.features(x))
        return self.head(e), e


def train_frozen_classifier(cfg: Config, wd: Workdir, runtime: Runtime, plan: StudentPlan) -> Path:
    """cRT or LWS on `student.init`'s frozen features; save its backbone with the trained classifier."""
    if already_done(plan):
        return plan.checkpoint
    s = cfg.student
    manifest = Manifest.load(wd.manifest)
    what = "LWS: a per-class scale on the frozen classifier" if s.rebalance == "lws" else "new cosine classifier"
    meta = student_meta(cfg, plan, manifest)
    spec = load_checkpoint(plan.init)[1]["network"]
    arch = spec["arch"]
    if s.rebalance == "lws":   # the saved network rebuilds init's classifier, with init's gamma
        s = dataclasses.replace(s, gamma=spec["gamma"])

    def with_backbone(head: nn.Module) -> Network:
        net, _ = load_checkpoint(plan.init)
        net.classifier = head.cpu()
        return net
    if frozen_from_cache(s):
        teacher = s.init.split("/", 1)[1]
        reader = CacheReader(wd.cache, manifest, [teacher], s.views)
        block = reader.read(0, manifest.train.num_samples)
        labels = read_labels(manifest, "train")
        # kept as the cache serves them (float16: 3.8 GB at ImageNet-LT, half of float32), widened per batch on the device
        stream = DescriptorStream(block, labels, manifest.train.class_counts, s.sampling, s.seed)
        log(f"[student {plan.name}] {plan.kind}: {what} on {int(block.count.sum())} cached descriptors "
            f"of {len(labels)} images ({teacher}), {s.sampling} sampling")
        return train_model(plan, s, lambda: new_head(load_checkpoint(plan.init)[0], cfg, manifest.num_classes),
                           stream, classifier_step(runtime), runtime, cfg, manifest, meta, arch=arch,
                           network=with_backbone, in_process=True)
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=s.sampling, seed=s.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=s.shuffle_buffer)
    log(f"[student {plan.name}] {plan.kind}: {what} on the frozen features of {s.init} (its backbone runs on "
        f"the student's views), {s.sampling} sampling")

    def build() -> FrozenFeatures:
        net, _ = load_checkpoint(plan.init)
        return FrozenFeatures(net, new_head(net, cfg, manifest.num_classes))
    return train_model(plan, s, build, stream, cross_entropy_step(runtime), runtime, cfg, manifest, meta, arch=arch,
                       network=lambda model: with_backbone(model.head))
