import csv
import io
import json

import pytest
from click.testing import CliRunner

from cbd_cache.config import load_config
from cbd_cache.data.prepare import prepare
from cbd_cache.pipeline import train_student
from cbd_cache.stages.teachers import train_teacher
from cbd_cache.system.runtime import make_runtime
from cbd_cache.train.summaries import Summaries, curve_name
from cbd_cache.workdir import Workdir
from cli import main

from .conftest import SMOKE


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the event files in `folder`, as tensorboard's own reader sees them."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_curve_names():
    assert [curve_name(k) for k in ("loss", "ce", "distill", "lr", "images_per_s")] == \
        ["loss/total", "loss/ce", "loss/distill", "lr", "images_per_s"]


@pytest.mark.slow
def test_teacher_and_student_event_files_hold_every_curve(smoke_copy, tmp_path):
    pytest.importorskip("tensorboard")
    # a student with cached targets: its loss terms, and the test groups the smoke data has (no class > 100 images)
    cfg = load_config(SMOKE, ["student.epochs=2", "student.name=tb"])
    train_student(cfg, smoke_copy, make_runtime(cfg.pipeline))
    folder = smoke_copy.student_dir("tb")
    curves = scalars(folder)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "ce", "distill", "lr", "images_per_s"):      # the curves are log.jsonl's lines
        assert curves[curve_name(key)] == [(h["step"], pytest.approx(h[key], rel=1e-6)) for h in log]
    report = json.loads((folder / "eval.json").read_text())
    assert report["many"] is None and "test/many" not in curves
    for key in ("top1", "medium", "few"):
        assert curves[f"test/{key}"] == [(log[-1]["step"], pytest.approx(report[key], rel=1e-6))]
    assert log[-1]["lr"] == 0.0 and log[0]["lr"] > 0                   # cosine decay to 0 at the last step

    # a teacher on a profile with a head class (> 100 images): many / medium / few all present
    cfg = load_config(SMOKE, ["data.n_max=128", "teacher.epochs=1"])
    wd = Workdir(tmp_path / "head")
    prepare(cfg, wd)
    train_teacher(cfg, cfg.teachers[0], wd, make_runtime(cfg.pipeline))
    curves = scalars(wd.teacher_dir("std0"))
    report = json.loads((wd.teacher_dir("std0") / "eval.json").read_text())
    step = json.loads((wd.teacher_dir("std0") / "log.jsonl").read_text())["step"]
    for key in ("top1", "many", "medium", "few"):
        assert curves[f"test/{key}"] == [(step, pytest.approx(report[key], rel=1e-6))]
    assert {"loss/total", "loss/ce", "lr", "images_per_s", "train/top1"} <= set(curves)


def test_a_restarted_run_draws_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    first = Summaries(tmp_path, True)
    for step in (10, 20, 30):                # a run cut short after three epochs
        first.epoch({"epoch": step // 10, "step": step, "loss": 9.0})
    first.close()
    second = Summaries(tmp_path, True)       # resumed from its checkpoint at step 15
    for step in (20, 30, 40):
        second.epoch({"epoch": step // 10, "step": step, "loss": 1.0})
    second.close()
    assert scalars(tmp_path)["loss/total"] == [(10, 9.0), (20, 1.0), (30, 1.0), (40, 1.0)]


def test_logs_csv_has_one_row_per_epoch_per_run(smoke_workdir):
    result = CliRunner().invoke(main, ["logs", str(smoke_workdir.root), "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [(r["run"], r["epoch"]) for r in rows] == [("teachers/aug0", "1"), ("teachers/aug0", "2"),
                                                      ("teachers/std0", "1"), ("teachers/std0", "2")]
    log = [json.loads(line) for line in (smoke_workdir.teacher_dir("std0") / "log.jsonl").read_text().splitlines()]
    assert list(rows[0])[:2] == ["run", "epoch"] and set(log[0]) <= set(rows[0])
    assert float(rows[3]["loss"]) == pytest.approx(log[1]["loss"]) and float(rows[3]["lr"]) == log[1]["lr"]
    plain = CliRunner().invoke(main, ["logs", str(smoke_workdir.root)])
    assert plain.exit_code == 0 and "teachers/std0: epoch 2" in plain.output


def test_logs_of_an_empty_workdir_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["logs", str(tmp_path)])
    assert result.exit_code == 2 and "train a model first" in result.output
