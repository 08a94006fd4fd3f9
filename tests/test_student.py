"""The student's target sources on the smoke data: cache (no teacher), replay (teachers on the cached views),
online (teachers each step), none (CE)."""
import shutil
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from cbd_cache.cache.schema import CACHE_SETTINGS
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import CacheSpec, TrainStream
from cbd_cache.errors import CacheError, ConfigError, FileDamaged
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.pipeline import train_student
from cbd_cache.system.runtime import make_runtime, to_unit
from cbd_cache.system.storage import read_json
from cbd_cache.views import ViewSpec

from .conftest import smoke_config


@pytest.mark.slow
def test_online_and_cross_entropy_students_train(smoke_copy):
    for targets, kind, proj in [("online", "CBD K=2 (online)", 128), ("replay", "CBD K=2 (replay)", 128),
                                ("none", "single-stage (class_balanced)", 0)]:
        cfg = smoke_config(f"student.targets={targets}", "student.epochs=1")
        ckpt = train_student(cfg, smoke_copy, make_runtime(cfg.pipeline))
        run = read_json(ckpt.parent / "run.json")
        assert run["kind"] == kind and len(run["history"]) == 1
        net, meta = load_checkpoint(ckpt)
        assert meta["network"]["projection_dim"] == proj        # h: R^64 -> R^(2*64) only when distilling K=2
        assert net(torch.zeros(2, 3, 16, 16))[0].shape == (2, 10)
    online = read_json(smoke_copy.student_dir("student_epochs=1_targets=online") / "run.json")
    assert set(online["teachers"]) == {"std0", "aug0"}            # provenance: the checkpoints it ran


def test_a_finished_student_is_not_retrained(smoke_copy, capfd):
    cfg = smoke_config("student.epochs=1", "student.teachers=[std0]")
    runtime = make_runtime(cfg.pipeline)
    first = train_student(cfg, smoke_copy, runtime)
    stamp = first.stat().st_mtime_ns
    train_student(cfg, smoke_copy, runtime)
    assert first.stat().st_mtime_ns == stamp
    assert "already trained with this config" in capfd.readouterr().err


def test_teachers_run_on_the_stored_views_give_the_cached_targets(smoke_workdir):
    """The fidelity check behind `student.targets=replay`: the cache is the teachers on its own views."""
    cfg = smoke_config()
    manifest = Manifest.load(smoke_workdir.manifest)
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="class_balanced", seed=3,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=64,
                         cache=CacheSpec(smoke_workdir.cache, ("std0", "aug0"), cfg.export.views))
    items = list(islice(iter(stream), 96))
    x = to_unit(torch.stack([item[0] for item in items]))
    cached = torch.stack([item[4] for item in items]).float()
    nets = [load_checkpoint(smoke_workdir.teacher_checkpoint(t))[0].eval() for t in ("std0", "aug0")]
    with torch.no_grad():
        fresh = torch.cat([F.normalize(n.features(x), dim=1) for n in nets], dim=1)
    for part in (slice(0, 64), slice(64, 128)):
        cos = F.cosine_similarity(fresh[:, part], cached[:, part], dim=1)
        assert cos.min() > 0.999
    assert F.cosine_similarity(fresh[1:, :64], cached[:-1, :64], dim=1).min() < 0.99   # a shifted pair does not


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
def test_logit_and_hybrid_distillation_from_the_cache_and_online(smoke_copy):
    from cbd_cache.pipeline import train_student
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


def test_a_run_is_named_and_recorded_under_the_settings_of_the_cache_it_read(smoke_copy, monkeypatch):
    """The cache's own record of its settings names the run, never an override that claims to match it: an
    edited provenance is refused, and even with the check of the config against the cache switched off a run
    on this A = 2 cache is named and recorded as A = 2."""
    import json

    from cbd_cache.stages import student

    root = smoke_copy.cache / "zarr.json"
    original = root.read_text()
    meta = json.loads(original)
    meta["attributes"]["provenance"]["views_per_image"] = 4
    root.write_text(json.dumps(meta))
    with pytest.raises(FileDamaged, match="provenance does not match its fingerprint"):
        student.plan_student(smoke_config("export.views=4"), smoke_copy)
    root.write_text(original)

    plan = student.plan_student(smoke_config(), smoke_copy)
    prov = json.loads(original)["attributes"]["provenance"]
    assert {k: plan.cache_settings[k] for k in CACHE_SETTINGS} == {k: prov[v] for k, v in CACHE_SETTINGS.items()}
    assert plan.cache_settings["views.scale"] == [0.35, 1.0] and plan.recipe["settings"]["export.views"] == 2
    monkeypatch.setattr(student, "check_cache_settings", lambda *a: None)
    claimed = student.plan_student(smoke_config("export.views=4", "pipeline.seed=3"), smoke_copy)
    assert claimed.name == plan.name == "student" and claimed.identity == plan.identity
    assert claimed.recipe["settings"]["export.views"] == 2 and claimed.recipe["settings"]["pipeline.seed"] == 0
