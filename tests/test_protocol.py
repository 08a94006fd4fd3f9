"""The paper's second-stage methods: fine-tuning, cRT, logit / hybrid distillation, data-aug students."""
import itertools
import shutil

import numpy as np
import pytest
import torch

from cbd_cache.cache.reader import ViewBlock
from cbd_cache.data.stream import DescriptorStream
from cbd_cache.errors import CacheError, ConfigError
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.storage import read_json

from .conftest import smoke_config


@pytest.mark.parametrize("overrides,message", [
    (["student.classifier_only=true", "student.targets=none"], "cRT needs student.init=teachers/<name>"),
    (["student.classifier_only=true", "student.init=teachers/std0"], "set student.targets=none"),
    (["student.init=std0"], "must be teachers/<name> or students/<run>"),
    (["student.init=teachers/ghost"], "no teacher named 'ghost'"),
    (["student.type=data_aug"], "cached targets belong to standard views"),
    (["student.distill=kl"], "student.distill='kl': must be one of feature, logit, hybrid"),
    (["student.temperature=0"], "student.temperature=0.0: must be > 0"),
])
def test_method_settings_are_validated_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        smoke_config(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_data_aug_student_shares_the_teachers_augmentation():
    from cbd_cache.stages.student import data_aug

    cfg = smoke_config("student.type=data_aug", "student.targets=none", "teacher.jitter=0.3")
    aug = data_aug(cfg)
    assert aug.type == "data_aug" and aug.jitter == 0.3 and aug.aug_style == cfg.teacher.aug_style
    assert data_aug(smoke_config()) is None


def test_fine_tuning_starts_from_the_whole_stage1_network(smoke_workdir):
    from cbd_cache.models.networks import Network
    from cbd_cache.stages.student import load_init

    ckpt = smoke_workdir.teacher_checkpoint("std0")
    teacher, _ = load_checkpoint(ckpt)
    net = Network("resnet8", 3, 10, 20.0)
    load_init(net, ckpt, "teachers/std0")
    for k, v in teacher.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="architecture or projection differs"):
        load_init(Network("resnet8", 3, 10, 20.0, projection_dim=128), ckpt, "teachers/std0")


def test_logit_distillation_needs_a_cache_with_logits(smoke_workdir):
    from cbd_cache.stages.student import plan_student

    with pytest.raises(CacheError, match="export with --set export.logits=true"):
        plan_student(smoke_config("student.distill=hybrid"), smoke_workdir)


@pytest.mark.slow
def test_crt_trains_a_classifier_from_cached_descriptors_only(smoke_copy, monkeypatch):
    """No image is decoded and no backbone runs while training; the backbone is the teacher's, frozen."""
    from cbd_cache.data import stream
    from cbd_cache.models import networks as models
    from cbd_cache.pipeline import train as train_student
    from cbd_cache.stages import crt

    cfg = smoke_config("student.init=teachers/std0", "student.classifier_only=true", "student.targets=none",
                       "student.epochs=3")
    runtime = make_runtime(cfg.pipeline)
    evaluate = crt.evaluate_network

    def no_backbone(*a, **k):
        raise AssertionError("cRT ran a backbone forward pass while training")

    def no_decode(*a, **k):
        raise AssertionError("cRT decoded an image while training")

    def evaluate_afterwards(*a, **k):
        monkeypatch.undo()
        return evaluate(*a, **k)

    monkeypatch.setattr(models.SmallResNet, "forward", no_backbone)
    monkeypatch.setattr(stream, "decode_sample", no_decode)
    monkeypatch.setattr(crt, "evaluate_network", evaluate_afterwards)
    ckpt = train_student(cfg, smoke_copy, runtime)
    run = read_json(ckpt.parent / "run.json")
    assert run["kind"] == "cRT (teachers/std0)" and len(run["history"]) == 3
    net, _ = load_checkpoint(ckpt)
    teacher, _ = load_checkpoint(smoke_copy.teacher_checkpoint("std0"))
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    assert not torch.equal(net.classifier.weight, teacher.classifier.weight)
    assert 0 <= read_json(ckpt.parent / "eval.json")["top1"] <= 100


@pytest.mark.slow
def test_logit_and_hybrid_distillation_from_the_cache_and_online(smoke_copy):
    from cbd_cache.pipeline import train as train_student
    from cbd_cache.stages.export import export_cache

    shutil.rmtree(smoke_copy.cache)
    base = ("export.logits=true", "student.epochs=1")
    runtime = make_runtime(smoke_config(*base).pipeline)
    export_cache(smoke_config(*base), smoke_copy, runtime)
    for extra, kind in ((("student.distill=hybrid",), "hybrid distillation K=2 (cache)"),
                        (("student.distill=logit", "student.targets=online", "student.teachers=[std0]"),
                         "logit distillation K=1 (online)")):
        ckpt = train_student(smoke_config(*base, *extra), smoke_copy, runtime)
        run = read_json(ckpt.parent / "run.json")
        assert run["kind"] == kind
        assert run["history"][0]["kd"] > 0
        assert ("distill" in run["history"][0]) == ("student.distill=hybrid" in extra)
        net, _ = load_checkpoint(ckpt)
        # logit distillation alone needs no projection h; hybrid distils two 64-d teachers through h
        assert net.classifier.weight.shape[1] == (128 if "student.distill=hybrid" in extra else 64)


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
