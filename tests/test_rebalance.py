"""Rebalancing a trained classifier: tau-norm, logit adjustment, LWS, Balanced Softmax, and choices made on val only."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbd_cache.data.manifest import Manifest, SplitInfo
from cbd_cache.errors import ConfigError
from cbd_cache.models.losses import balanced_softmax_loss, log_prior
from cbd_cache.models.networks import Network, PerClassHead
from cbd_cache.models.rebalance import TAU_GRIDS, balanced_accuracy, choose_tau, rebalanced, tau_normalized_weight
from cbd_cache.stages.student import selection_split

from .conftest import smoke_config

COUNTS = [640, 160, 40, 10, 5]


def test_tau_norm_at_tau_0_is_the_plain_classifier_and_at_1_has_unit_rows():
    torch.manual_seed(0)
    net = Network("resnet8", 3, 5, 20.0, head="linear")
    e = torch.randn(32, net.dim)
    plain = net.classifier(e)
    with torch.no_grad():
        net.classifier.weight.mul_(torch.linspace(0.5, 3.0, 5)[:, None])   # rows of different norms
        plain = net.classifier(e)
        assert torch.equal(rebalanced(net.classifier, "tau_norm", 0.0, log_prior(COUNTS))(e), plain)
        one = rebalanced(net.classifier, "tau_norm", 1.0, log_prior(COUNTS))
        torch.testing.assert_close(one.weight.norm(dim=1), torch.ones(5))
        assert torch.equal(one.bias, net.classifier.bias) and not torch.equal(one(e), plain)
        half = tau_normalized_weight(net.classifier.weight, 0.5)
        torch.testing.assert_close(half.norm(dim=1), net.classifier.weight.norm(dim=1) ** 0.5)
    cosine = Network("resnet8", 3, 5, 20.0).classifier
    with pytest.raises(ValueError, match="row norms do not reach its logits"):
        rebalanced(cosine, "tau_norm", 0.5, log_prior(COUNTS))


def test_logit_adjustment_subtracts_tau_log_prior_and_balanced_softmax_adds_it_in_training():
    torch.manual_seed(1)
    classifier = Network("resnet8", 3, 5, 20.0).classifier
    e, prior = torch.randn(16, classifier.weight.shape[1]), log_prior(COUNTS)
    torch.testing.assert_close(prior.exp().sum(), torch.tensor(1.0))
    with torch.no_grad():
        adjusted = rebalanced(classifier, "logit_adjust", 1.5, prior)
        assert isinstance(adjusted, PerClassHead) and not isinstance(classifier, PerClassHead)
        torch.testing.assert_close(adjusted(e), classifier(e) - 1.5 * prior)
        twice = rebalanced(adjusted, "logit_adjust", 0.5, prior)
        torch.testing.assert_close(twice(e), classifier(e) - 2.0 * prior)
    z, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 4, 4, 3, 0])
    torch.testing.assert_close(balanced_softmax_loss(z, y, prior), F.cross_entropy(z + prior, y))
    assert torch.isfinite(log_prior([10, 0, 3])).all()        # an empty class stays finite
    assert TAU_GRIDS["tau_norm"][0] == TAU_GRIDS["logit_adjust"][0] == 0.0 and 1.0 in TAU_GRIDS["logit_adjust"]


def test_the_tau_chosen_is_the_best_on_val_and_ties_keep_the_smaller_change():
    assert choose_tau({0.0: 50.0, 0.5: 61.0, 1.0: 61.0, 1.5: 40.0}) == 0.5
    labels = np.array([0, 0, 0, 0, 1])             # unbalanced: the score is the mean per-class accuracy
    assert balanced_accuracy(labels, np.zeros(5, int), 2) == pytest.approx(50.0)


def manifest_with(*splits: str) -> Manifest:
    return Manifest("m", ["a", "b"], 1, {s: SplitInfo(0, [0, 0], []) for s in ("train", *splits)},
                    {"val": "none (data.val_per_class = 0)"}, {})


def test_a_choice_needs_a_val_split_that_is_not_the_reported_one():
    assert selection_split(manifest_with("val", "test"), "x") == "val"
    with pytest.raises(ConfigError, match=r"x chooses tau on the val split, and this data has none \(val: none "
                                          r"\(data.val_per_class = 0\)\); hold one out with --set data.val_per_class"):
        selection_split(manifest_with("test"), "x")
    with pytest.raises(ConfigError, match="val is this data's only held-out split, the one results report"):
        selection_split(manifest_with("val"), "x")


@pytest.mark.parametrize("sets,message", [
    (["student.tau=0.5"], "student.tau=0.5: a tau >= 0 for student.rebalance=tau_norm or logit_adjust"),
    (["student.rebalance=lws", "student.targets=none"], "student.rebalance=lws: rebalances a trained model's classifier"),
    (["student.loss=balanced_softmax"], "student.loss=balanced_softmax: a single-stage loss; set student.targets=none"),
    (["student.head=linear", "student.classifier_only=true", "student.targets=none", "student.init=teachers/std0"],
     "student.head=linear: cRT trains a new cosine classifier"),
    (["student.rebalance=lws", "student.targets=none", "student.init=teachers/std0", "student.tau=-2"], "student.tau=-2"),
])
def test_rebalancing_settings_that_cannot_mean_anything_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        smoke_config(*sets)


@pytest.mark.slow
def test_nothing_is_chosen_on_the_test_split(smoke_copy, monkeypatch):
    """The test split cannot be read until a run is being saved: a student's checkpoint, tau (logit adjustment,
    tau-norm) and LWS are all made without it, and a tau chosen on test would fail this test."""
    from pathlib import Path

    from cbd_cache import pipeline
    from cbd_cache import loaders as stream
    from cbd_cache.models.checkpoints import load_checkpoint
    from cbd_cache.stages import rebalance
    from cbd_cache.system.runtime import make_runtime
    from cbd_cache.system.storage import read_json
    from cbd_cache.train import skeleton

    saving = [False]
    real_read, real_finish = stream.read_shard, skeleton.finish_run

    def guarded_read(path, *a, **k):
        assert saving[0] or not Path(str(path)).name.startswith("test-"), f"{path} read before the run was saved"
        return real_read(path, *a, **k)

    def finish(*a, **k):
        saving[0] = True
        try:
            return real_finish(*a, **k)
        finally:
            saving[0] = False
    monkeypatch.setattr(stream, "read_shard", guarded_read)
    monkeypatch.setattr(skeleton, "finish_run", finish)
    monkeypatch.setattr(rebalance, "finish_run", finish)
    runtime = make_runtime(smoke_config().pipeline)
    train = lambda *sets: pipeline.train_student(smoke_config("student.targets=none", *sets), smoke_copy, runtime)  # noqa: E731
    linear = train("student.sampling=instance", "student.head=linear").parent.name
    cosine = train("student.sampling=instance", "student.loss=balanced_softmax").parent.name
    for sets in (("student.rebalance=tau_norm", f"student.init=students/{linear}"),
                 ("student.rebalance=logit_adjust", f"student.init=students/{cosine}")):
        report = read_json(train(*sets).parent / "eval.json")
        sel = report["selection"]
        assert sel["chosen_on"] == "val" and sel["tau"] == sel["grid"][int(np.argmax(sel["val_scores"]))]
        assert 0 <= report["ece"] <= 100 and report["split"] == "test"
    lws = train("student.rebalance=lws", "student.init=teachers/std0")
    net, teacher = load_checkpoint(lws)[0], load_checkpoint(smoke_copy.teacher_checkpoint("std0"))[0]
    assert torch.equal(net.classifier.base.weight, teacher.classifier.weight)          # frozen, scaled per class
    assert not torch.equal(net.classifier.scale, torch.ones(10))
    assert read_json(lws.parent / "run.json")["kind"] == "LWS (teachers/std0)"
    # the guard bites: a choice made on test fails
    monkeypatch.setattr(rebalance, "selection_split", lambda manifest, what: "test")
    with pytest.raises(AssertionError, match="test-000000.tar read before the run was saved"):
        train("student.rebalance=logit_adjust", f"student.init=students/{cosine}", "student.seed=1")


@pytest.mark.slow
def test_crt_and_lws_from_a_student_run_its_frozen_backbone_on_the_images(smoke_copy):
    """From a model with no cached descriptors (the upper bound's extractor): the backbone stays as it was trained,
    BatchNorm statistics included; cRT's classifier is new, LWS's is the model's own under a learned scale."""
    from cbd_cache import pipeline
    from cbd_cache.models.checkpoints import load_checkpoint
    from cbd_cache.system.runtime import make_runtime
    from cbd_cache.system.storage import read_json

    runtime = make_runtime(smoke_config().pipeline)
    base = pipeline.train_student(smoke_config("student.targets=none", "student.sampling=instance"), smoke_copy, runtime)
    init = f"student.init=students/{base.parent.name}"
    source = load_checkpoint(base)[0]
    for sets, kind in ((("student.classifier_only=true",), "cRT"), (("student.rebalance=lws",), "LWS")):
        ckpt = pipeline.train_student(smoke_config("student.targets=none", init, *sets), smoke_copy, runtime)
        net = load_checkpoint(ckpt)[0]
        for k, v in source.backbone.state_dict().items():
            assert torch.equal(net.backbone.state_dict()[k], v), k
        assert read_json(ckpt.parent / "run.json")["kind"] == f"{kind} (students/{base.parent.name})"
        assert (ckpt.parent / "per_class.csv").is_file() and (ckpt.parent / "reliability.png").is_file()
    assert torch.equal(net.classifier.base.weight, source.classifier.weight)
