"""Run identity and done-ness: a changed config never lands in a finished run's folder, the same config
trains once, a crash between checkpoint.pt and run.json is no finished run, and one writer per run."""
import hashlib
import shutil
import subprocess
import sys

import pytest

from cbd_cache.errors import Busy
from cbd_cache.experiments.sweep import make_runs
from cbd_cache.pipeline import train_student as train
from cbd_cache.stages import evaluate as evaluation
from cbd_cache.system.locks import hold
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.storage import read_json, write_json
from cbd_cache.train import runs
from cbd_cache.workdir import Workdir, run_lock

from .conftest import ROOT, SMOKE, smoke_config


def files(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(smoke_workdir, tmp_path_factory):
    """The smoke workdir with students/student trained (the plain pipeline's student)."""
    root = tmp_path_factory.mktemp("trained") / "wd"
    shutil.copytree(smoke_workdir.root, root)
    cfg = smoke_config()
    train(cfg, Workdir(root), make_runtime(cfg.pipeline))
    return Workdir(root)


@pytest.fixture
def wd(trained, tmp_path):
    shutil.copytree(trained.root, tmp_path / "wd")
    return Workdir(tmp_path / "wd")


@pytest.mark.slow
@pytest.mark.parametrize("item, message", [
    ("views.image_px=32", "views.image_px=32: the cache"),
    ("export.views=4", "export.views=4: the cache"),
])
def test_a_changed_view_or_export_setting_never_touches_the_finished_student(wd, item, message):
    before = files(wd.student_dir("student"))
    result = subprocess.run([sys.executable, "-m", "cli", "train-student", "--pipeline", str(SMOKE), "--workdir",
                             str(wd.root), "--set", item], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cbd-cache: error: ") and message in result.stderr
    assert files(wd.student_dir("student")) == before
    assert sorted(p.name for p in (wd.root / "students").iterdir()) == ["student"]


def test_the_same_config_trains_once_whoever_asks(wd, capfd):
    cfg = smoke_config()
    ckpt = wd.student_dir("student") / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert [r.name for r in make_runs(SMOKE, [], [("default", ())], [0])] == ["student"]   # sweep seed 0
    train(cfg, wd, make_runtime(cfg.pipeline))
    assert ckpt.stat().st_mtime_ns == stamp
    assert "already trained with this config" in capfd.readouterr().err


def test_a_checkpoint_run_json_does_not_vouch_for_is_no_finished_run(wd):
    folder = wd.student_dir("student")
    assert runs.is_done(folder)
    record = read_json(folder / "run.json")
    write_json(folder / "run.json", {**record, "checkpoint_sha256": "0" * 64})   # new weights, old record
    assert not runs.is_done(folder) and not runs.is_done(folder, record["identity"])
    del record["checkpoint_sha256"]
    write_json(folder / "run.json", record)
    assert not runs.is_done(folder)


@pytest.mark.slow
def test_a_crash_between_checkpoint_and_run_json_retrains_and_is_not_evaluated(wd, monkeypatch, capfd):
    cfg = smoke_config()
    runtime = make_runtime(cfg.pipeline)
    folder = wd.student_dir("student")
    old = (folder / "checkpoint.pt").read_bytes()
    record = read_json(folder / "run.json")
    write_json(folder / "run.json", {**record, "identity": "another"})   # so the same name trains again

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash after checkpoint.pt")
    monkeypatch.setattr(runs, "write_report", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg, wd, runtime)
    assert (folder / "checkpoint.pt").read_bytes() != old   # the new weights are there...
    assert not runs.is_done(folder)                          # ...and nothing vouches for them

    rows = evaluation.evaluate_workdir(cfg, wd, runtime)
    assert [r["model"] for r in rows] == ["std0", "aug0"]
    assert "students/student left out" in capfd.readouterr().err

    monkeypatch.undo()
    train(cfg, wd, runtime)
    assert "already trained" not in capfd.readouterr().err
    assert runs.is_done(folder) and runs.is_done(folder, read_json(folder / "run.json")["identity"])
    assert [r["model"] for r in evaluation.evaluate_workdir(cfg, wd, runtime)] == ["std0", "aug0", "student"]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    lock = run_lock(tmp_path / "students" / "run")
    with hold(lock, "students/run"):
        probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from cbd_cache.system.locks import hold\n"
                                "with hold(Path(sys.argv[1]), 'students/run'): pass", str(lock)],
                               cwd=ROOT, capture_output=True, text=True)
        assert probe.returncode != 0 and f"students/run is in use by process {__import__('os').getpid()}" in probe.stderr
        with pytest.raises(Busy):
            with hold(lock, "students/run"):
                pass
    with hold(lock, "students/run"):   # released when its holder is done
        pass
