"""cRT: a new classifier on the teacher's frozen backbone, trained from the cached descriptors alone."""
import itertools

import numpy as np
import pytest
import torch

from cbd_cache.cache.reader import ViewBlock
from cbd_cache.loaders import DescriptorStream
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.storage import read_json

from .conftest import smoke_config


@pytest.mark.slow
def test_crt_trains_a_classifier_from_cached_descriptors_only(smoke_copy, monkeypatch):
    """No image is decoded and no backbone runs while training; the backbone is the teacher's, frozen."""
    from cbd_cache import views
    from cbd_cache import loaders as stream
    from cbd_cache.models import networks as models
    from cbd_cache.pipeline import train_student
    from cbd_cache.train import skeleton

    cfg = smoke_config("student.init=teachers/std0", "student.classifier_only=true", "student.targets=none",
                       "student.epochs=3")
    runtime = make_runtime(cfg.pipeline)
    evaluate = skeleton.evaluate_network

    def no_backbone(*a, **k):
        raise AssertionError("cRT ran a backbone forward pass while training")

    def no_decode(*a, **k):
        raise AssertionError("cRT decoded an image while training")

    def evaluate_afterwards(*a, **k):
        monkeypatch.undo()
        return evaluate(*a, **k)

    monkeypatch.setattr(models.SmallResNet, "forward", no_backbone)
    monkeypatch.setattr(stream, "decode_sample", no_decode)
    monkeypatch.setattr(views, "decode_sample", no_decode)
    monkeypatch.setattr(skeleton, "evaluate_network", evaluate_afterwards)
    ckpt = train_student(cfg, smoke_copy, runtime)
    run = read_json(ckpt.parent / "run.json")
    assert run["kind"] == "cRT (teachers/std0)" and len(run["history"]) == 3
    net, _ = load_checkpoint(ckpt)
    teacher, _ = load_checkpoint(smoke_copy.teacher_checkpoint("std0"))
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    assert not torch.equal(net.classifier.weight, teacher.classifier.weight)
    assert 0 <= read_json(ckpt.parent / "eval.json")["top1"] <= 100


def test_crt_descriptor_stream_splits_over_ranks_and_resumes_in_place():
    """Ranks take disjoint interleaved copies of one sequence; a stream placed after b batches continues it."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [20, 5, 1])
    count = np.full(len(labels), 4)
    block = ViewBlock(np.zeros((4 * len(labels), 5), np.int32), rng.standard_normal((4 * len(labels), 8)).astype(np.float32),
                      None, np.arange(len(labels)) * 4, count)
    stream = DescriptorStream(block, labels, [20, 5, 1], "class_balanced", seed=3)

    def take(s, n):
        return [(x.numpy().tobytes(), y) for x, y in itertools.islice(iter(s), n)]

    whole = take(stream.place(0, 1), 60)
    assert take(stream.place(0, 1, batches_done=5, batch_size=4), 40) == whole[20:60]
    rank0, rank1 = take(stream.place(0, 2), 30), take(stream.place(1, 2), 30)
    assert rank0 == whole[0::2] and rank1 == whole[1::2]
    counts = np.bincount([y for _, y in whole], minlength=3)
    assert counts.min() >= 10      # class-balanced: the single-image class is drawn as often as the others
    # the single image walks its 4 views without replacement: each lap of 4 draws shows all of them
    lone = [x for x, y in take(stream.place(0, 1), 200) if y == 2]
    assert len(lone) >= 8 and all(len(set(lone[i:i + 4])) == 4 for i in range(0, len(lone) - 3, 4))
