"""`cbd-cache grid`: cells of their own, replicates that redraw the data, only the teachers the rows use,
resumes after SIGKILL to the table an uninterrupted grid gives, and a second call trains nothing."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cbd_cache.errors import ConfigError
from cbd_cache.experiments.grid import (
    cbd_pays,
    cells,
    parse_axes,
    parse_replicates,
    replicate_sets,
    with_references,
)
from cbd_cache.experiments.grid_plots import heatmap_entries, plot_cbd_pays
from cbd_cache.workdir import CHECKPOINT
from cli import main

from .conftest import SMOKE, smoke_config
from .test_resume import cli_process

SCHEDULE = "teacher.epochs+student.epochs=1,2"


def test_tied_keys_take_each_value_together_and_a_cell_folder_names_only_what_differs():
    axes = parse_axes([SCHEDULE, "data.imbalance_factor=16,8"])
    assert axes[0].keys == ("teacher.epochs", "student.epochs") and axes[0].values == ("1", "2")
    got = cells(SMOKE, (), axes)
    assert [c.label for c in got] == ["epochs=1, imbalance_factor=16", "epochs=1, imbalance_factor=8",
                                      "epochs=2, imbalance_factor=16", "epochs=2, imbalance_factor=8"]
    # the smoke file trains 2 epochs at IF 16: those values name no folder, so another grid's cell is the same one
    assert [c.folder for c in got] == ["epochs=1", "epochs=1_imbalance_factor=8", "default", "imbalance_factor=8"]
    assert got[1].sets == ("teacher.epochs=1", "student.epochs=1", "data.imbalance_factor=8")


def test_a_grid_with_other_set_items_never_lands_in_another_grids_cells():
    plain = cells(SMOKE, (), parse_axes([SCHEDULE]))
    other = cells(SMOKE, ("data.imbalance_factor=8", "student.alpha=0.4"), parse_axes([SCHEDULE]))  # alpha: the file's
    assert [c.folder for c in plain] == ["epochs=1", "default"]
    assert [c.folder for c in other] == ["data.imbalance_factor=8_epochs=1", "data.imbalance_factor=8"]
    with pytest.raises(ConfigError, match="an --axis varies that key"):
        cells(SMOKE, ("student.epochs=3",), parse_axes([SCHEDULE]))
    with pytest.raises(ConfigError, match="gives each cell its own data and cache"):
        cells(SMOKE, ("pipeline.data_url=s3://b/data",), parse_axes([SCHEDULE]))


@pytest.mark.parametrize("item, message", [
    ("data.seed=1,2", "the replicates set the seeds"),
    ("teachers.std0.seed=3,4", "the replicates set the seeds"),
    ("pipeline.cache_url=a,b", "the grid the workdirs"),
    ("student.epochs", "expected key=v1,v2"),
    ("student.epochs=1,1", "distinct"),
    ("student.nope=1,2", "unknown config key"),
])
def test_bad_axes_are_refused_in_one_line(item, message):
    with pytest.raises(ConfigError, match=message):
        cells(SMOKE, (), parse_axes([item]))


def test_a_replicate_redraws_the_data_and_every_seed_and_replicate_0_is_the_pipeline():
    cfg = smoke_config()
    assert replicate_sets(cfg, 0) == ()
    assert replicate_sets(cfg, 2) == ("data.seed=2", "pipeline.seed=2", "teachers.std0.seed=201",
                                      "teachers.aug0.seed=202")
    with pytest.raises(ConfigError, match="--replicates"):
        parse_replicates("0,0")


def test_a_row_brings_the_row_it_starts_from(tmp_path):
    cfg = smoke_config()
    assert with_references(cfg, tmp_path, ["Logit Adjustment", "CBD"]) == ["Standard-Instance", "Logit Adjustment",
                                                                            "CBD"]
    with pytest.raises(ConfigError, match="no row 'CBD-ENS'"):
        with_references(cfg, tmp_path, ["CBD-ENS"])


def grid_args(root, *extra: str) -> list[str]:
    return ["grid", "--pipeline", str(SMOKE), "--workdir", str(root), "--axis", SCHEDULE, "--replicates", "0,1",
            "--rows", "Standard-Instance,CBD", "--name", "t", *extra]


def test_each_cell_replicate_is_a_workdir_of_its_own_with_only_the_teachers_its_rows_use(tmp_path):
    first = CliRunner().invoke(main, grid_args(tmp_path / "w"))
    assert first.exit_code == 0, first.output
    table = json.loads((tmp_path / "w" / "grids" / "t.json").read_text())
    assert [c["cell"] for c in table["cells"]] == ["epochs=1", "epochs=2"]
    for cell in table["cells"]:
        for r in ("0", "1"):
            wd = tmp_path / "w" / "cells" / cell["folder"] / f"rep{r}"
            assert (wd / "data" / "manifest.json").is_file()
            assert sorted(p.name for p in (wd / "teachers").iterdir()) == ["std0"]   # CBD's one teacher, no aug0
            assert set(cell["replicates"][r]) == {"Standard-Instance", "CBD"}
            assert all(str(wd) in row["run"] for row in cell["replicates"][r].values())
        assert cell["rows"]["CBD"]["top1"]["n"] == 2
    # the replicates are fresh draws: another class ranking, so other training counts
    counts = [json.loads((tmp_path / "w" / "cells" / "default" / f"rep{r}" / "data" / "manifest.json").read_text())
              for r in (0, 1)]
    assert counts[0]["fingerprint"] != counts[1]["fingerprint"]
    md = (tmp_path / "w" / "grids" / "t.md").read_text()
    assert "CBD_ENS against" not in md          # no CBD_ENS row: no "does it pay" table and no heatmap
    assert not (tmp_path / "w" / "grids" / "t.png").exists()
    assert "| epochs=1 | CBD |" in md and "--axis teacher.epochs+student.epochs=1,2" in md


def test_cbd_pays_compares_with_the_best_baseline_by_mean_and_the_heatmap_shows_every_cell(tmp_path):
    def rep(ens, inst, cb):
        return {"CBD_ENS": {"top1": ens}, "Standard-Instance": {"top1": inst}, "Standard-Class-Bal": {"top1": cb}}
    reps = [rep(60, 50, 58), rep(55, 57, 54)]     # Class-Bal is best by mean (56 > 53.5), though not in each one
    pays = cbd_pays(reps, ["Standard-Instance", "Standard-Class-Bal", "CBD_ENS"])
    assert pays["best"] == "Standard-Class-Bal" and pays["diff"]["values"] == [2.0, 1.0] and pays["ahead"] == 2
    assert cbd_pays(reps[:1] + [{**reps[1], "CBD_ENS": {}}], ["Standard-Instance", "CBD_ENS"])["of"] == 1
    table = {"cells": [{"cell": f"epochs={e}, arch={a}", "cbd_pays": pays} for e in (20, 40) for a in ("r8", "r20")]}
    entries = heatmap_entries(table)
    assert [(r, c) for r, c, _ in entries] == [("arch=r8", "epochs=20"), ("arch=r20", "epochs=20"),
                                              ("arch=r8", "epochs=40"), ("arch=r20", "epochs=40")]
    assert plot_cbd_pays(entries, tmp_path / "map.png", "t").stat().st_size > 10_000


@pytest.mark.slow
def test_a_sigkilled_grid_resumes_to_the_uninterrupted_table_and_a_second_call_trains_nothing(tmp_path):
    whole = cli_process(*grid_args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = cli_process(*grid_args(tmp_path / "w"), kill_at=50)      # in the second cell's teacher (steps 43-56)
    assert killed.returncode == -9
    resumed = cli_process(*grid_args(tmp_path / "w"))
    assert resumed.returncode == 0, resumed.stderr

    def metrics(root):
        table = json.loads((root / "grids" / "t.json").read_text())
        return {(c["cell"], r, label): {m: row.get(m) for m in ("top1", "many", "medium", "few", "ece")}
                for c in table["cells"] for r, rep in c["replicates"].items() for label, row in rep.items()}
    assert metrics(tmp_path / "w") == metrics(tmp_path / "whole")
    assert all(v["top1"] is not None for v in metrics(tmp_path / "w").values())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "cells").rglob(CHECKPOINT)}
    again = cli_process(*grid_args(tmp_path / "w"))
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "to train" in again.stderr and "0 to train" in again.stderr and " 1 to train" not in again.stderr
