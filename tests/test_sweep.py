import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cbd_cache.errors import ConfigError
from cbd_cache.experiments.sweep import grid_points, make_runs, parse_grid, parse_seeds, split_values
from cli import main

from .cli_faults import cli, error_line, hashes
from .conftest import ROOT, SMOKE


def test_grid_values_keep_lists_whole():
    assert split_values("0,0.2,[std0,aug0],[aug0]") == ["0", "0.2", "[std0,aug0]", "[aug0]"]
    grid = parse_grid(["student.alpha=0,0.4", "student.teachers=[std0],[std0,aug0]"])
    points = grid_points(grid)
    assert len(points) == 4
    assert points[1] == ("alpha=0, teachers=[std0,aug0]", ("student.alpha=0", "student.teachers=[std0,aug0]"))
    assert parse_seeds("0,1,2") == [0, 1, 2]


@pytest.mark.parametrize("item,message", [
    ("teacher.epochs=1,2", "a sweep varies student settings only"),
    ("student.seed=0,1", "seeds with --seeds"),
    ("student.alpha", "expected key=v1,v2"),
    ("student.alpha=0,,1", "empty value"),
])
def test_bad_grids_are_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([item])


def test_runs_are_named_by_their_config_not_by_how_it_was_asked():
    """The same student config gets the same run (and so trains once) from any sweep or table."""
    a = make_runs(SMOKE, ["student.views=2"], [("x", ("student.alpha=0.4", "student.teachers=[std0]"))], [1])
    b = make_runs(SMOKE, [], [("y", ("student.teachers=[std0]", "student.views=2"))], [1])
    assert a[0].name == b[0].name == "student_teachers=std0_views=2_seed=1"
    assert a[0].overrides[-1] == f"student.name={a[0].name}"
    with pytest.raises(ConfigError, match="student.alpha=2"):        # every run is validated up front
        make_runs(SMOKE, [], [("bad", ("student.alpha=2",))], [0])


def test_sweep_cli_refuses_a_teacher_grid_with_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--pipeline", str(SMOKE), "--workdir", str(tmp_path),
                                       "--grid", "teacher.lr=0.1,0.2"])
    assert result.exit_code == 2 and "student settings only" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_sweep_trains_the_grid_once_without_teachers_and_tabulates_mean_and_std(smoke_copy):
    shutil.rmtree(smoke_copy.root / "teachers")          # a sweep never touches the teachers or the export
    export_mtime = (smoke_copy.cache / "zarr.json").stat().st_mtime
    common = ["--pipeline", str(SMOKE), "--workdir", str(smoke_copy.root), "--set", "student.epochs=1"]
    args = ["sweep", *common, "--grid", "student.alpha=0,0.4", "--seeds", "0,1", "--name", "t"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    runs = sorted(p.name for p in (smoke_copy.root / "students").iterdir())
    assert runs == ["student_alpha=0.0_epochs=1", "student_alpha=0.0_epochs=1_seed=1",   # seed 0 is the file's
                    "student_epochs=1", "student_epochs=1_seed=1"]
    table = json.loads((smoke_copy.root / "sweeps" / "t.json").read_text())
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"alpha=0", "alpha=0.4"}
    for row in rows.values():
        reports = [json.loads((smoke_copy.root / "students" / n / "eval.json").read_text())["top1"]
                   for n in row["runs"]]
        assert row["top1"]["n"] == 2 and row["top1"]["mean"] == pytest.approx(sum(reports) / 2)
    md = (smoke_copy.root / "sweeps" / "t.md").read_text()
    assert "| alpha=0 |" in md and " ± " in md and "--grid student.alpha=0,0.4 --seeds 0,1" in md
    stamps = {p: p.stat().st_mtime for p in (smoke_copy.root / "students").glob("*/checkpoint.pt")}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0
    assert {p: p.stat().st_mtime for p in stamps} == stamps            # finished runs are skipped
    assert (smoke_copy.cache / "zarr.json").stat().st_mtime == export_mtime


def sweep_process(wd, *args: str) -> subprocess.CompletedProcess:
    """`cbd-cache sweep` in its own process, one thread per process whatever --jobs (so the bits agree)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli", "sweep", "--pipeline", str(SMOKE), "--workdir", str(wd),
                           "--set", "student.epochs=1", "--seeds", "0", "--name", "t", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def run_result(wd, name: str) -> dict:
    report = json.loads((wd / "students" / name / "eval.json").read_text())
    log = [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
           for line in (wd / "students" / name / "log.jsonl").read_text().splitlines()]
    return {"log": log, **{k: report[k] for k in ("top1", "many", "medium", "few", "per_class")}}


@pytest.mark.slow
def test_sweep_jobs_2_gives_the_runs_of_jobs_1_and_a_failed_run_stops_no_other(smoke_copy, tmp_path):
    serial = tmp_path / "serial"
    shutil.copytree(smoke_copy.root, serial)
    done = sweep_process(serial, "--grid", "student.alpha=0,0.4")
    assert done.returncode == 0, done.stderr
    names = ["student_alpha=0.0_epochs=1", "student_epochs=1"]
    blocked = smoke_copy.root / "students" / "student_alpha=0.8_epochs=1"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the run folder goes: this run fails")
    parallel = sweep_process(smoke_copy.root, "--jobs", "2", "--grid", "student.alpha=0,0.4,0.8")
    assert parallel.returncode == 1
    log = smoke_copy.root / "sweeps" / "logs" / "student_alpha=0.8_epochs=1.log"
    assert "1 of 3 parallel jobs failed" in parallel.stderr and f"log {log}" in parallel.stderr
    assert "is a file where a folder belongs" in log.read_text()     # its one error line
    for name in names:                                       # the same runs, to the bit
        assert run_result(smoke_copy.root, name) == run_result(serial, name)
        assert (smoke_copy.root / "sweeps" / "logs" / f"{name}.log").is_file()
    rows = {r["label"]: r for r in json.loads((smoke_copy.root / "sweeps" / "t.json").read_text())["rows"]}
    assert rows["alpha=0.4"]["complete"] and not rows["alpha=0.8"]["complete"]   # the table from what finished

    blocked.unlink()
    stamps = {n: (smoke_copy.root / "students" / n / "checkpoint.pt").stat().st_mtime for n in names}
    again = sweep_process(smoke_copy.root, "--jobs", "2", "--grid", "student.alpha=0,0.4,0.8")
    assert again.returncode == 0, again.stderr
    assert "3 runs: 2 finished, 1 to train" in again.stderr                     # only the failed run retrains
    assert {n: (smoke_copy.root / "students" / n / "checkpoint.pt").stat().st_mtime for n in names} == stamps
    assert json.loads((smoke_copy.root / "sweeps" / "t.json").read_text())["rows"][2]["complete"]


@pytest.mark.slow
def test_sweep_with_one_job_goes_on_past_a_failed_run_and_writes_the_table(smoke_copy):
    """As with --jobs J: the diverged grid point fails, the other trains, the table has it, exit 1 in one line."""
    root = smoke_copy.root
    keep = hashes(root, "data", "teachers", "cache.zarr")
    result = cli("sweep", "--grid", "student.lr=20000,0.05", "--seeds", "0", "--name", "lr", workdir=root)
    line = error_line(result, 1)
    assert "1 of 2 runs failed" in line and "training diverged" in line and "has the runs that finished" in line
    table = (root / "sweeps" / "lr.md").read_text()
    assert "lr=0.05" in table and "| 1 |" in table and "0 of 1" in table    # lr=20000: no finished seed
    assert len([p for p in (root / "students").iterdir() if (p / "run.json").is_file()]) == 1
    assert hashes(root, "data", "teachers", "cache.zarr") == keep
