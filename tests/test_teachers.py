"""Stage 1: what a teacher's identity covers, a finished teacher never retrained, an imported one only checked."""
import pytest

from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import ConfigError
from cbd_cache.stages import teachers
from cbd_cache.system.runtime import make_runtime

from .conftest import smoke_config


def identity(smoke_workdir, *overrides: str, name: str = "std0") -> str:
    cfg = smoke_config(*overrides)
    manifest = Manifest.load(smoke_workdir.manifest)
    return teachers.teacher_plan(cfg, cfg.teacher_by_name(name), smoke_workdir, manifest).identity


def test_a_teachers_identity_covers_its_own_settings_and_the_views_only(smoke_workdir):
    base = identity(smoke_workdir)
    for changed in ("teachers.std0.seed=9", "teacher.epochs=3", "views.flip=false"):
        assert identity(smoke_workdir, changed) != base, changed
    for unrelated in ("teachers.aug0.seed=9", "student.alpha=0.9", "export.views=4", "eval.batch_size=7"):
        assert identity(smoke_workdir, unrelated) == base, unrelated


def test_a_finished_teacher_is_skipped_and_a_changed_one_retrained(smoke_copy, monkeypatch):
    trained = []
    monkeypatch.setattr(teachers, "train_model", lambda plan, *a, **k: trained.append(plan.name) or plan.checkpoint)
    cfg = smoke_config()
    ckpt = smoke_copy.teacher_checkpoint("std0")
    mtime = ckpt.stat().st_mtime_ns
    assert teachers.train_teacher(cfg, cfg.teacher_by_name("std0"), smoke_copy, make_runtime(cfg.pipeline)) == ckpt
    assert trained == [] and ckpt.stat().st_mtime_ns == mtime
    cfg = smoke_config("teachers.std0.lr=0.01")
    teachers.train_teacher(cfg, cfg.teacher_by_name("std0"), smoke_copy, make_runtime(cfg.pipeline))
    assert trained == ["std0"]


def test_an_imported_teacher_is_never_trained_only_looked_for(smoke_copy):
    cfg = smoke_config("teachers.std0.source=imported")
    with pytest.raises(FileNotFoundError, match=r"teacher 'std0' \(source = \"imported\"\) has no checkpoint yet: "
                                                r"run `cbd-cache import-teacher std0 --checkpoint FILE`"):
        teachers.train_teacher(cfg, cfg.teacher_by_name("std0"), smoke_copy, make_runtime(cfg.pipeline))


def test_a_teachers_normalisation_must_fit_the_datas_channels(smoke_workdir):
    cfg = smoke_config("teachers.std0.mean=[0.5]", "teachers.std0.std=[0.2]")
    manifest = Manifest.load(smoke_workdir.manifest)
    with pytest.raises(ConfigError, match=r"teachers.std0.mean=\[0.5\]: the dataset has 3 channel"):
        teachers.teacher_network(cfg.teacher_by_name("std0"), manifest)
