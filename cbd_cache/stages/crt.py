"""cRT (classifier re-training, Kang et al. 2020): a new cosine classifier on a stage-1 model's frozen
features, trained with class-balanced sampling.

The features are the teacher's cached descriptors, one stored view per copy, so training decodes no
image and runs no backbone: it takes seconds. The result is saved as a whole network (the teacher's
backbone with the new classifier) so that evaluation, NCM and the tables treat it like any model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_labels
from cbd_cache.data.stream import DescriptorStream
from cbd_cache.models.checkpoints import load_checkpoint, network_spec
from cbd_cache.models.networks import CosineClassifier
from cbd_cache.stages.student import finish_run, finished, plan_student
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.seeding import seed_everything
from cbd_cache.train.engine import fit
from cbd_cache.train.evaluation import evaluate_network
from cbd_cache.train.steps import classifier_step
from cbd_cache.train.summaries import Summaries
from cbd_cache.workdir import Workdir


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
