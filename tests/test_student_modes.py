"""The student's three target sources on the smoke data: cache (no teacher), online (teachers each step), none (CE)."""
import torch

from cbd_cache.checkpoint import load_checkpoint
from cbd_cache.runtime import make_runtime
from cbd_cache.stage2 import train as train_student
from cbd_cache.workdir import read_json

from .conftest import smoke_config


def test_online_and_cross_entropy_students_train(smoke_copy):
    for targets, kind, proj in [("online", "CBD K=2 (online)", 128), ("none", "single-stage (class_balanced)", 0)]:
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
