import json
import shutil

import pytest
from click.testing import CliRunner

from cbd_cache.config import ConfigError
from cbd_cache.experiments.sweep import grid_points, make_runs, parse_grid, parse_seeds, split_values
from cli import main

from .conftest import SMOKE


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
