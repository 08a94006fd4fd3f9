"""The one orchestrator: the safeguards every entry point gets, and a student planned once per run."""
import sys
from pathlib import Path

import pytest

from cbd_cache import pipeline
from cbd_cache.errors import Busy
from cbd_cache.experiments.paper_table import paper_table
from cbd_cache.experiments.sweep import execute, grid_points, make_runs, parse_grid
from cbd_cache.system import digests
from cbd_cache.system.locks import hold
from cbd_cache.system.runtime import make_runtime
from cbd_cache.workdir import cache_lock, run_lock

from .conftest import SMOKE, smoke_config


def test_paper_table_exports_under_the_teachers_locks(smoke_copy, tmp_path):
    """A second job exporting one of its teachers into the cache (an export, or another paper table) is refused
    before anything is written."""
    cfg = smoke_config()
    cache = Path(smoke_copy.cache)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    with hold(cache_lock(cache, "teacher-aug0"), "another export"):
        with pytest.raises(Busy, match=r"in use by process .*cache\.zarr\.locks/teacher-aug0\.lock"):
            paper_table(cfg, smoke_copy, make_runtime(cfg.pipeline), tmp_path / "out")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before
    assert not (tmp_path / "out").exists()


def test_paper_table_trains_its_teachers_one_at_a_time_or_jobs_at_a_time(smoke_copy, tmp_path, monkeypatch):
    """With --jobs J stage 1 too trains J teachers at once (one process each), as the student runs do."""
    calls = []

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(pipeline, "train_teachers",
                        lambda cfg, wd, runtime, teachers, jobs: calls.append(([t.name for t in teachers], jobs)))
    monkeypatch.setattr(pipeline, "export", stop)
    cfg = smoke_config()
    for jobs in (1, 2):
        with pytest.raises(Stop):
            paper_table(cfg, smoke_copy, make_runtime(cfg.pipeline), tmp_path / "out", jobs=jobs)
    assert calls == [(["std0"], 1), (["aug0"], 1), (["std0", "aug0"], 2)]


def test_a_student_run_is_refused_while_its_folder_is_locked(smoke_copy):
    cfg = smoke_config("student.name=locked")
    folder = smoke_copy.student_dir("locked")
    with hold(run_lock(folder), "another student"):
        with pytest.raises(Busy, match="students/locked is in use"):
            pipeline.train_student(cfg, smoke_copy, make_runtime(cfg.pipeline))
    assert sorted(p.name for p in folder.iterdir()) == [run_lock(folder).name]


def count_teacher_hashes(monkeypatch, teachers_dir: Path) -> list[Path]:
    """Every `file_sha256` of a teacher checkpoint, in whichever module calls it."""
    calls: list[Path] = []
    real = digests.file_sha256

    def counting(path):
        if Path(path).is_relative_to(teachers_dir):
            calls.append(Path(path))
        return real(path)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("cbd_cache") and getattr(mod, "file_sha256", None) is real:
            monkeypatch.setattr(mod, "file_sha256", counting)
    return calls


@pytest.mark.slow
def test_plan_student_runs_once_per_run(smoke_copy, monkeypatch):
    """Planning hashes each of the K teachers' checkpoints once; nothing after it plans again."""
    calls = count_teacher_hashes(monkeypatch, smoke_copy.root / "teachers")
    cfg = smoke_config("student.epochs=1", "student.name=once")
    pipeline.train_student(cfg, smoke_copy, make_runtime(cfg.pipeline))
    assert sorted(p.parent.name for p in calls) == ["aug0", "std0"]
    calls.clear()
    runs = make_runs(SMOKE, ["student.epochs=1"], grid_points(parse_grid(["student.alpha=0.2,0.8"])), [0])
    assert execute(runs, SMOKE, smoke_copy, make_runtime(cfg.pipeline))
    assert sorted(p.parent.name for p in calls) == ["aug0", "aug0", "std0", "std0"]   # 2 runs x K = 2
