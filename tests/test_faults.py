"""Faults a careless user and a cluster cause, through the CLI in subprocesses: each ends in its exit code and
one error line without a traceback, and the files that must not change keep their hashes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        import shutil
        shutil.rmtree(root / "cache.zarr")
    name = plant_inf(smoke_copy.teacher_checkpoint("std0"))
    before = hashes(root, "data", "teachers")
    (tmp_path / "images").mkdir()
    args = [str(tmp_path / a) if a in ("OUT", "IMAGES") else a for a in command]
    line = error_line(cli(*args, workdir=root), 1)
    assert f"{name} holds non-finite values" in line and "teachers/std0/checkpoint.pt" in line
    assert not (tmp_path / "OUT").exists()
    assert hashes(root, "data", "teachers") == before
