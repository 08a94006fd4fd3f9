"""The student's target sources on the smoke data: cache (no teacher), replay (teachers on the cached views),
online (teachers each step), none (CE)."""
from itertools import islice

import torch
import torch.nn.functional as F

from cbd_cache.data.manifest import Manifest
from cbd_cache.data.stream import CacheSpec, TrainStream
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.pipeline import train as train_student
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.storage import read_json
from cbd_cache.views import ViewSpec, to_unit

from .conftest import smoke_config


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
