"""The smoke pipeline end to end through the installed `cbd-cache` console script."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbd_cache.cache.schema import sealed

from .conftest import ROOT, SMOKE

CLI = str(Path(sys.executable).parent / "cbd-cache")


def cbd(*args, check=True):
    result = subprocess.run([CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"cbd-cache {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


COMMANDS = {"prepare", "train-teacher", "import-teacher", "export", "train-student", "evaluate", "run", "sweep", "ncm",
            "paper-table", "grid", "cache", "logs", "predict", "export-model"}


def test_version():
    assert cbd("--version").stdout.startswith("cbd-cache, version")


def test_help_lists_every_command_and_each_command_its_options():
    """`--help` of the group names every command; each command's names its own options and no other's."""
    import click
    from click.testing import CliRunner

    from cli import main

    assert set(main.commands) == COMMANDS and set(main.commands["cache"].commands) == {"info", "verify", "drop"}
    runner = CliRunner()
    top = runner.invoke(main, ["--help"], prog_name="cbd-cache")
    assert top.exit_code == 0
    listed = {line.split()[0] for line in top.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == COMMANDS

    commands = [((name,), cmd) for name, cmd in main.commands.items() if name != "cache"]
    commands += [(("cache", name), cmd) for name, cmd in main.commands["cache"].commands.items()]
    all_options = {o for _, cmd in commands for p in cmd.params for o in p.opts if o.startswith("--")}
    for path, cmd in commands:
        out = runner.invoke(main, [*path, "--help"], prog_name="cbd-cache")
        assert out.exit_code == 0, out.output
        assert f"Usage: cbd-cache {' '.join(path)} [OPTIONS]" in out.output
        own = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")}
        assert {"--pipeline", "--workdir", "--set"} <= own, path
        words = {w.strip(",;:") for w in out.output.split()}
        assert {o for o in all_options if o in words} == own, path
        assert " ".join(cmd.help.split("\n")[0].split())[:40] in " ".join(out.output.split()), path


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    wd = str(tmp_path / "smoke")
    common = ["--pipeline", str(SMOKE), "--workdir", wd]
    out = cbd("run", *common)
    assert "| student | CBD K=2 (cache)" in out.stdout and "| std0 | teacher (standard)" in out.stdout
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert [r["model"] for r in results] == ["std0", "aug0", "student"]
    for r in results:
        assert {"top1", "many", "medium", "few", "per_class"} <= set(r) and len(r["per_class"]) == 10
    report = json.loads((tmp_path / "smoke" / "students" / "student" / "eval.json").read_text())
    assert 0 <= report["top1"] <= 100 and report["num_test"] == 200

    # a second run skips every stage
    again = cbd("run", *common)
    for stage in ("prepare", "teacher std0", "teacher aug0", "student student"):
        assert f"[{stage}]" in again.stderr
    assert "skipping" in again.stderr and "nothing to do" in again.stderr

    info = json.loads(cbd("cache", "info", *common, "--json").stdout)
    assert info["complete"] and info["arrays"]["teachers/std0/descriptors"]["dtype"] == "float16"
    assert info["arrays"]["views"]["shape"] == [512, 5]     # 8 shard blocks of 64 views (32 rows x A = 2), padded
    assert info["views_stored"] == 227 * 2 and info["allocation"] == "uniform" and info["schema_version"] == 4

    # the student loads no teacher: it trains with every teacher checkpoint gone
    shutil.rmtree(tmp_path / "smoke" / "teachers")
    out = cbd("train-student", *common, "--set", "student.alpha=0.2", "--set", "student.teachers=[aug0]")
    assert "CBD K=1 (cache)" in out.stderr
    assert (tmp_path / "smoke" / "students" / "student_alpha=0.2_teachers=aug0" / "checkpoint.pt").is_file()
    table = cbd("evaluate", *common).stdout
    assert "student_alpha=0.2_teachers=aug0" in table


@pytest.mark.slow
def test_mismatched_cache_is_refused_with_a_clear_message(tmp_path, smoke_workdir):
    wd = tmp_path / "wd"
    shutil.copytree(smoke_workdir.root, wd)
    meta = json.loads((wd / "cache.zarr" / "zarr.json").read_text())      # a cache of other data
    prov = {**meta["attributes"]["provenance"], "manifest_fingerprint": "0" * 64}
    meta["attributes"]["provenance"] = sealed(prov)      # sealed again: another data's cache, not a damaged one
    (wd / "cache.zarr" / "zarr.json").write_text(json.dumps(meta))
    result = cbd("train-student", "--pipeline", str(SMOKE), "--workdir", str(wd), check=False)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("cbd-cache: error:") and "fingerprint" in line and "re-run `cbd-cache export`" in line
    assert not (wd / "students").exists()
