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
