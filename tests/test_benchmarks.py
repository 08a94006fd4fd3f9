"""The benchmark scripts run against the current library: they import, parse their command lines, and
their pure parts (the schema's byte count, cosines) give known values on tiny inputs."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    assert module.__file__.startswith(str(BENCHMARKS))
    sys.modules.pop(script, None)


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name (benchmarks/ on sys.path), forgetting it afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    loaded = []

    def load(script: str):
        loaded.append(script)
        return importlib.import_module(script)
    yield load
    for script in loaded:
        sys.modules.pop(script, None)


def test_int8_cosines_are_cosines(bench):
    cosines = bench("bench_int8").cosines
    a = np.array([[1, 0], [1, 1], [3, 4]], dtype=np.float16)
    b = np.array([[0, 1], [2, 2], [-3, -4]], dtype=np.float32)
    np.testing.assert_allclose(cosines(a, b), [0.0, 1.0, -1.0], atol=1e-6)


@pytest.mark.parametrize("script, option", [("bench_cache", "--export-rounds"), ("bench_int8", "--teachers-from"),
                                            ("bench_malloc", "--batch-size"), ("bench_scaling", "--warmup"), ("bench_add_teacher", "--rounds"),
                                            ("bench_student", "--case"), ("prepare_throughput", "--sizes"),
                                            ("bench_sweep_jobs", "--runs")])
def test_benchmark_command_line_parses(bench, monkeypatch, capsys, script, option):
    """Each script's argparse is reached before any work, and names its own options."""
    module = bench(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}.py") and option in out


@pytest.mark.slow
def test_gpu_check_script_runs_its_plumbing_on_cpu(tmp_path):
    """benchmarks/run_gpu.sh with DEVICE=cpu: the same checks (smoke pipeline, 1-process torchrun with a process
    group and a student, the student benchmark, the smoke pipeline and cache verify under views.decode=gpu, the
    loader benchmark with the gpu decode path) on gloo and tiny settings, and the report it writes."""
    root = BENCHMARKS.parent
    env = {**os.environ, "DEVICE": "cpu", "PY": sys.executable, "CBD": str(Path(sys.executable).parent / "cbd-cache"),
           "OUT": str(tmp_path / "out"), "ROOT": str(tmp_path / "root"), "PYTHONPATH": str(root)}
    result = subprocess.run(["bash", str(BENCHMARKS / "run_gpu.sh")], cwd=root, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (tmp_path / "out" / "gpu_check_cpu.md").read_text()
    for check in ("smoke_pipeline", "torchrun_collectives", "torchrun_student", "bench_student", "smoke_gpu_decode",
                  "cache_verify_gpu_decode", "bench_loader"):
        assert f"| {check} | ok |" in report
    assert "gloo on cpu: world 1, sum 1.0, max 0, ranks [0], all_reduce [1.0, 1.0, 1.0]: ok" in report
    assert (tmp_path / "out" / "bench_student_cpu.md").is_file()
    loader = (tmp_path / "out" / "bench_loader_cpu.md").read_text()
    assert "| gpu | the gpu path's plumbing on the CPU" in loader and "| full |" in loader
    assert not list((tmp_path / "out").glob("*.head"))


def test_when_cbd_pays_converges_where_doubling_gains_under_a_point_and_fits_the_map_to_the_budget(bench):
    study = bench("when_cbd_pays")

    def cell(e, inst, cb):
        reps = {str(r): {"Standard-Instance": {"top1": inst[r]}, "Standard-Class-Bal": {"top1": cb[r]}} for r in (0, 1)}
        stats = {k: {"mean": sum(v) / 2, "std": 0.0, "n": 2} for k, v in (("Standard-Instance", inst),
                                                                          ("Standard-Class-Bal", cb))}
        return {"cell": f"epochs={e}", "replicates": reps,
                "rows": {k: {"top1": v, "few": v, "of": 2} for k, v in stats.items()}}
    table = {"cells": [cell(20, (50, 52), (48, 50)), cell(40, (60, 60), (58, 58)), cell(80, (60.5, 60.9), (59, 59)),
                       cell(160, (61, 61), (59.2, 59.2))]}
    # 40 -> 80 gains 0.7 (Instance) but 1.0 (Class-Bal): not under a point; 80 -> 160 gains 0.3 / 0.2
    assert study.converged_epochs(table) == 80
    rows = study.convergence_rows(table)
    assert rows[0]["cb_minus_inst"] == [-2, -2] and rows[0]["cb_below"] == 2 and rows[-1]["gain"] is None
    table["cells"][3]["replicates"]["1"]["Standard-Instance"] = {}        # 160 unfinished: 80 is not known yet
    table["cells"][3]["rows"]["Standard-Instance"]["top1"]["n"] = 1
    assert study.converged_epochs(table) is None
    # the plan's budget rule: at E* = 80 ResNet-20 does not fit 8 h, ResNet-14 does; at 160 ResNet-14 stops at 80
    assert study.map_schedules(80) == {"resnet8": (20, 40, 80), "resnet14": (20, 40, 80)}
    assert study.map_schedules(40) == {"resnet8": (20, 40, 80), "resnet14": (20, 40, 80)}
    assert study.map_schedules(160) == {"resnet8": (20, 40, 160), "resnet14": (20, 40, 80)}


def _map_cell(e, arch, reps):
    """A grid table's cell from {replicate: {row: (top1, few, ncm)}}, with cbd_pays as the grid computes it."""
    from cbd_cache.experiments.grid import cbd_pays
    rows = ("Standard-Instance", "Standard-Class-Bal", "CBD_ENS")
    replicates = {str(r): {label: {"top1": v[0], "few": v[1], "ncm_top1": v[2]} for label, v in x.items()}
                  for r, x in reps.items()}
    return {"cell": f"epochs={e}, arch={arch}", "folder": f"epochs={e}", "replicates": replicates,
            "cbd_pays": cbd_pays(list(replicates.values()), rows), "orderings": []}


def test_when_cbd_pays_rule_is_fitted_on_resnet8_and_scored_on_the_cells_it_was_not_fitted_on(bench):
    study = bench("when_cbd_pays")
    # CBD_ENS pays exactly where NCM on Instance features beats NCM on Class-Bal features (ncm gap > 0)
    r8 = {"cells": [_map_cell(20, "resnet8", {0: {"Standard-Instance": (50, 30, 60), "Standard-Class-Bal": (48, 35, 55),
                                                  "CBD_ENS": (55, 40, None)},
                                              1: {"Standard-Instance": (52, 30, 58), "Standard-Class-Bal": (53, 36, 60),
                                                  "CBD_ENS": (51, 40, None)}}),
                    _map_cell(40, "resnet8", {0: {"Standard-Instance": (60, 40, 64), "Standard-Class-Bal": (62, 33, 61),
                                                  "CBD_ENS": (66, 50, None)},
                                              1: {"Standard-Instance": (61, 41, 60), "Standard-Class-Bal": (63, 40, 62),
                                                  "CBD_ENS": (62, 50, None)}})]}
    r14 = {"cells": [_map_cell(20, "resnet14", {0: {"Standard-Instance": (50, 30, 61),
                                                    "Standard-Class-Bal": (49, 30, 59), "CBD_ENS": (52, 1, None)}})]}
    points = study.rule_points({"glyphs_lt resnet8": (r8, None), "glyphs_lt resnet14": (r14, None)})
    assert [(p["arch"], p["epochs"], p["replicate"]) for p in points] == [
        ("resnet8", 20, 0), ("resnet8", 20, 1), ("resnet8", 40, 0), ("resnet8", 40, 1), ("resnet14", 20, 0)]
    # the few-shot trend compares Class-Bal's few with the same capacity and replicate one schedule shorter
    assert [p["few_trend"] for p in points] == [None, None, 33 - 35, 40 - 36, None]
    assert points[0]["ncm"] == 5 and points[0]["outcome"] == 55 - 50 and points[1]["outcome"] == 51 - 52   # per replicate, against the best by mean (Instance)
    points = [{**p, "fit": p["arch"] == "resnet8"} for p in points]
    fit = study.fit_rule(points, "ncm")
    assert fit["threshold"] == 0.0 and fit["fit"] == (4, 4) and fit["held_out"] == (1, 1)
    few = study.fit_rule(points, "few_trend")       # falling few-shot (trend < t) -> pays: fitted on two points
    assert few["fit"] == (2, 2) and few["held_out"] == (0, 0)
    assert "| glyphs_lt resnet14 | resnet14 | 20 | 0 | no | +2.0 | – | +2.0 |" in study.rule_md(points)


def test_when_cbd_pays_adds_the_larger_view_budget_only_while_the_cache_falls_behind_online(bench):
    study = bench("when_cbd_pays")

    def table(online, a16):
        reps = {str(r): {"CBD_ENS": {"top1": 60.0}, "CBD_ENS online": {"top1": online[r]},
                         "CBD_ENS A=16": {"top1": a16[r]}} for r in (0, 1)}
        return {"cells": [{"cell": "epochs=160", "replicates": reps}]}
    assert study.online_rows(None) == "CBD_ENS,CBD_ENS online,CBD_ENS A=16"
    behind = table((61.0, 61.2), (60.3, 60.5))          # A = 16 still 0.7 behind online
    assert study.view_budget_gaps(behind) == pytest.approx({8: 1.1, 16: 0.7})
    assert study.online_rows(behind).endswith(",CBD_ENS A=32")
    assert study.online_rows(table((61.0, 61.2), (60.8, 60.9))) == "CBD_ENS,CBD_ENS online,CBD_ENS A=16"
    unfinished = table((61.0, None), (60.3, 60.5))
    assert study.view_budget_gaps(unfinished) == {}
