"""Faults a careless user and a cluster cause, through the CLI in subprocesses: each ends in its exit code and
one error line without a traceback, and the files that must not change keep their hashes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main

from .conftest import ROOT, SMOKE

CLI = [sys.executable, "-m", "cli"]


def cli(*args: str, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, args[0], "--pipeline", str(SMOKE), "--workdir", str(workdir), *args[1:]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one error line of a failed command: its exit code, no traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cbd-cache: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def hashes(root: Path, *parts: str) -> dict[str, str]:
    """sha256 of every file under root/part (for files that must not change)."""
    out = {}
    for part in parts:
        for f in sorted((root / part).rglob("*")) if (root / part).is_dir() else [root / part]:
            if f.is_file() and not f.name.endswith(".lock"):
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------- finite or refused
@pytest.mark.slow
def test_a_diverged_student_stops_naming_step_tensor_and_lr_and_leaves_no_finished_run(smoke_copy):
    root = smoke_copy.root
    before = hashes(root, "data", "teachers", "cache.zarr")
    result = cli("train-student", "--set", "student.lr=20000", "--set", "student.name=diverged", workdir=root)
    line = error_line(result, 1)
    assert "training diverged" in line and "running_var" in line and "at step 8 of 14" in line
    assert "lr 1e+04" in line
    folder = root / "students" / "diverged"
    assert not (folder / "run.json").exists() and not (folder / "checkpoint.pt").exists()
    assert not (folder / "resume.pt").exists()
    assert hashes(root, "data", "teachers", "cache.zarr") == before


def plant_inf(path: Path, key: str = "state_dict") -> str:
    """Set one BatchNorm running_var of a saved model (or resume point) to inf, as a diverged run saved as
    finished by an earlier version left it (its run.json vouching for it)."""
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k in ckpt[key] if k.endswith("running_var"))
    ckpt[key][name][0] = float("inf")
    torch.save(ckpt, path)
    record = path.parent / "run.json"
    if record.is_file():
        run = json.loads(record.read_text())
        run["checkpoint_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        record.write_text(json.dumps(run))
    return name


@pytest.mark.parametrize("command", [["evaluate"], ["export-model", "OUT", "--run", "teachers/std0"],
                                     ["ncm", "teachers/std0"], ["predict", "IMAGES", "--run", "teachers/std0"],
                                     ["export"]])
def test_every_reader_refuses_a_model_with_a_non_finite_buffer(smoke_copy, tmp_path, command):
    root = smoke_copy.root
    if command == ["export"]:    # export reads the teachers again only for a cache it has to write
        shutil.rmtree(root / "cache.zarr")
    name = plant_inf(smoke_copy.teacher_checkpoint("std0"))
    before = hashes(root, "data", "teachers")
    (tmp_path / "images").mkdir()
    args = [str(tmp_path / a) if a in ("OUT", "IMAGES") else a for a in command]
    line = error_line(cli(*args, workdir=root), 1)
    assert f"{name} holds non-finite values" in line and "teachers/std0/checkpoint.pt" in line
    assert not (tmp_path / "OUT").exists()
    assert hashes(root, "data", "teachers") == before


# ---------------------------------------------------------------------------- preemption
# The CLI in a process that sends itself a signal in the middle of its SIGNAL_AT-th optimiser step
# (as SLURM or Kubernetes would on preemption; Ctrl-C for SIGINT).
SIGNALLER = r"""
import os, signal, sys
import torch
at, signum, count = int(os.environ["SIGNAL_AT"]), int(os.environ["SIGNUM"]), [0]
step = torch.optim.SGD.step
def signalling_step(self, *a, **k):
    count[0] += 1
    if count[0] == at:
        os.kill(os.getpid(), signum)
    return step(self, *a, **k)
torch.optim.SGD.step = signalling_step
import cli
sys.argv = ["cbd-cache", *sys.argv[1:]]
cli.main()
"""


def signalled(*args: str, workdir: Path, at: int, signum: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGNAL_AT": str(at), "SIGNUM": str(signum)}
    return subprocess.run([sys.executable, "-c", SIGNALLER, args[0], "--pipeline", str(SMOKE), "--workdir",
                           str(workdir), *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_preempted_student_saves_its_step_and_a_plain_rerun_ends_where_an_uninterrupted_one_does(
        smoke_workdir, tmp_path, signum, code):
    run = ["train-student", "--set", "student.name=s"]      # by time only: the signal writes the one resume point
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for folder in (whole, cut):
        shutil.copytree(smoke_workdir.root, folder)
    assert cli(*run, workdir=whole).returncode == 0
    line = error_line(signalled(*run, workdir=cut, at=5, signum=signum), code)
    folder = cut / "students" / "s"
    assert f"interrupted by {signal.Signals(signum).name}" in line and str(folder / "resume.pt") in line
    assert "run the same command again" in line
    assert torch.load(folder / "resume.pt", weights_only=True)["step"] == 5     # the step in flight finished
    assert not (folder / "run.json").exists()
    again = cli(*run, workdir=cut)                                            # no --resume: it is the default
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing from step 5" in again.stderr
    a = torch.load(whole / "students" / "s" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(folder / "checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((folder / "run.json").read_text())["test_top1"] == \
        json.loads((whole / "students" / "s" / "run.json").read_text())["test_top1"]
    assert not (folder / "resume.pt").exists()


def test_resume_is_a_no_op_alias_and_a_changed_config_is_refused(smoke_copy, tmp_path):
    """A resume point from another config is refused (not silently trained over), with or without --resume."""
    folder = smoke_copy.student_dir("s")
    folder.mkdir(parents=True)
    torch.save({"step": 3, "config": {"train": {"lr": 0.1}}, "model": {}}, folder / "resume.pt")
    before = hashes(smoke_copy.root, "students")
    for extra in ([], ["--resume"]):
        result = CliRunner().invoke(main, ["train-student", "--pipeline", str(SMOKE), "--workdir",
                                                      str(smoke_copy.root), "--set", "student.name=s", *extra])
        assert result.exit_code == 2, result.output
        assert "cannot resume" in result.stderr and f"remove {folder / 'resume.pt'} to start over" in result.stderr
    assert hashes(smoke_copy.root, "students") == before
