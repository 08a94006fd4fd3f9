"""Faults a careless user and a cluster cause, through the CLI in subprocesses: each ends in its exit code and
one error line without a traceback, and the files that must not change keep their hashes."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_shard
from cbd_cache.models.checkpoints import network_spec, save_checkpoint
from cbd_cache.models.networks import Network
from cbd_cache.system.locks import hold
from cbd_cache.workdir import data_lock
from cli import main

from .cli_faults import batch, case, cli, edited, error_line, hashes, torn
from .conftest import ROOT, SMOKE
from .test_integrity import bad_crc_png


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


@pytest.mark.slow
def test_every_reader_refuses_a_model_with_a_non_finite_buffer(smoke_copy, tmp_path):
    root = smoke_copy.root
    shutil.rmtree(root / "cache.zarr")      # export reads the teachers again only for a cache it has to write
    name = plant_inf(smoke_copy.teacher_checkpoint("std0"))
    before = hashes(root, "data", "teachers")
    (tmp_path / "images").mkdir()
    commands = [["evaluate"], ["export-model", tmp_path / "out", "--run", "teachers/std0"], ["ncm", "teachers/std0"],
                ["predict", tmp_path / "images", "--run", "teachers/std0"], ["export"]]
    for command, result in zip(commands, batch([case(*c, workdir=root) for c in commands], tmp_path)):
        line = error_line(result, 1)
        assert f"{name} holds non-finite values" in line and "teachers/std0/checkpoint.pt" in line, command
    assert not (tmp_path / "out").exists() and not (root / "cache.zarr").exists()
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


@pytest.mark.slow
def test_an_edited_or_torn_manifest_is_refused_and_prepare_heals_it(smoke_copy, tmp_path):
    """Edited metadata is never trusted: each edit is one line naming the manifest and `prepare`; prepare then
    writes the same manifest again, and the shards, teachers and cache stay as they were."""
    root, path = smoke_copy.root, smoke_copy.manifest
    original = path.read_bytes()
    keep = hashes(root, "data", "teachers", "cache.zarr")
    def unsealed(d):          # as an older cbd-cache wrote it
        del d["checksum"]

    def unsealed_reversed(d):
        unsealed(d)
        d["splits"]["train"]["class_counts"].reverse()
    edits = {
        "torn": (torn(path), "is torn"),
        "a train shard dropped": (edited(path, lambda d: d["splits"]["train"]["shards"].pop()), "edited or damaged"),
        "class counts reversed": (edited(path, lambda d: d["splits"]["train"]["class_counts"].reverse()), "edited"),
        "a class dropped": (edited(path, lambda d: d["class_names"].pop()), "edited or damaged"),
        "schema edited": (edited(path, lambda d: d.update(schema_version=2)), "edited or damaged"),
        "not a manifest": (b"[1, 2, 3]", "not a manifest"),
        "no checksum": (edited(path, unsealed), "has no checksum"),
        "no checksum, counts reversed": (edited(path, unsealed_reversed), "has no checksum"),
    }
    student = ["train-student", "--set", "student.name=s"]
    cases = [case(*student, workdir=root, files={path: data}) for data, _ in edits.values()]
    cases.append(case("cache verify", workdir=root, files={path: edits["a train shard dropped"][0]}))
    for what in ("no checksum", "no checksum, counts reversed", "torn"):    # then prepare heals each
        cases.append(case("prepare", workdir=root, files={path: edits[what][0]}))
    results = batch(cases, tmp_path)
    for (what, (_, words)), result in zip([*edits.items(), ("verify", (0, "edited or damaged"))], results):
        line = error_line(result, 1)
        assert str(path) in line and words in line and "run `cbd-cache prepare`" in line, (what, line)
    for result, words in zip(results[-3:], ["checksum added", "class counts are not the shards'", "is torn"]):
        assert result.returncode == 0 and words in result.stderr, result.stderr[-2000:]
    assert "preparing again" in results[-1].stderr
    assert json.loads(path.read_bytes()) == json.loads(original)
    assert not (root / "students" / "s").exists()
    assert hashes(root, "data", "teachers", "cache.zarr") == {**keep, "data/manifest.json": hashes(root, "data")[
        "data/manifest.json"]}


def image_files(manifest_path: Path, folder: Path, count: int = 6) -> list[Path]:
    """`count` test images of the smoke data as files (PNG), as a user would have them."""
    manifest = Manifest.load(manifest_path)
    info = manifest.splits["test"].shards[0]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in read_shard(manifest.shard_path(info), info.start, info.stop)[:count]:
        files.append(folder / f"{s.row:04d}.{s.ext}")
        files[-1].write_bytes(s.data)
    return files


@pytest.mark.slow
def test_predict_survives_a_png_that_kills_the_decoder_and_writes_to_the_descriptor_it_is_given(smoke_workdir,
                                                                                              tmp_path):
    """A PNG whose IDAT CRC is wrong kills libpng's process: predict decodes in worker processes as prepare
    does, so it exits 0 with one row per file, the bad one with its error. --out /proc/self/fd/1 is stdout."""
    good = image_files(smoke_workdir.manifest, tmp_path / "images")
    (tmp_path / "images" / "bad_crc.png").write_bytes(bad_crc_png(7))
    result = cli("predict", str(tmp_path / "images"), "--run", "teachers/std0", "--top-k", "2", "--out",
                 "/proc/self/fd/1", workdir=smoke_workdir.root)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(rows) == {f.name for f in good} | {"bad_crc.png"}
    assert "decoder crashed" in rows["bad_crc.png"]["error"] and rows["bad_crc.png"]["class_1"] == ""
    assert all(r["error"] == "" and r["class_1"] and float(r["score_1"]) > 0 for n, r in rows.items() if n in
               {f.name for f in good})
    assert f"{len(good) + 1} files, 1 unreadable" in result.stderr


@pytest.mark.slow
def test_torn_run_files_misused_paths_and_a_busy_workdir_are_one_line_each(smoke_copy, tmp_path):
    """Every torn file of a run folder names itself and the command that writes it again (a torn eval.json is only
    evaluated again); a workdir that is a file, --out a folder, a negative --rows and a prepare while another holds
    the data are one line each; the data, the teachers' weights and records and the cache stay as they were."""
    root, std0 = smoke_copy.root, smoke_copy.teacher_dir("std0")
    keep = hashes(root, "data", "cache.zarr", *[f"teachers/{t}/{f}" for t in ("std0", "aug0")
                                                 for f in ("checkpoint.pt", "run.json", "log.jsonl")])
    saved = {f: (std0 / f).read_bytes() for f in ("run.json", "eval.json", "log.jsonl", "checkpoint.pt")}
    images = image_files(smoke_copy.manifest, tmp_path / "images", 2)
    (root / "students" / "s").mkdir(parents=True)
    (tmp_path / "a_file").write_text("not a folder")
    cases = {
        "logs": case("logs", workdir=root),
        "run.json, evaluate": case("evaluate", workdir=root, files={std0 / "run.json": torn(std0 / "run.json")}),
        "run.json, train-teacher": case("train-teacher", "--name", "std0", workdir=root),
        "eval.json": case("evaluate", workdir=root, files={std0 / "run.json": saved["run.json"],
                                                           std0 / "eval.json": torn(std0 / "eval.json")}),
        "log.jsonl": case("logs", workdir=root, files={std0 / "log.jsonl": saved["log.jsonl"][:-20]}),   # cut mid-line
        "log.jsonl removed": case("logs", workdir=root, files={std0 / "log.jsonl": None}),
        "checkpoint, export-model": case("export-model", tmp_path / "refused", "--run", "teachers/std0", workdir=root,
                                         files={std0 / "log.jsonl": saved["log.jsonl"],
                                                std0 / "checkpoint.pt": torn(std0 / "checkpoint.pt")}),
        "checkpoint, predict": case("predict", images[0], "--run", "teachers/std0", workdir=root),
        "resume.pt": case("train-student", "--set", "student.name=s", workdir=root,
                          files={std0 / "checkpoint.pt": saved["checkpoint.pt"],
                                 root / "students" / "s" / "resume.pt": torn(std0 / "checkpoint.pt")}),
        "workdir a file": case("train-student", workdir=tmp_path / "a_file"),
        "--out a folder": case("predict", images[0], "--run", "teachers/std0", "--out", tmp_path, workdir=root),
        "--rows -5": case("cache verify", "--rows", "-5", workdir=root),
        "prepare, data busy": case("prepare", workdir=root),
        # outputs respect the path: a link's target is written, a FIFO in place, new files get the umask
        "--out a link": case("predict", images[0], "--run", "teachers/std0", "--out", tmp_path / "link", workdir=root),
        "--out a FIFO": case("predict", images[0], "--run", "teachers/std0", "--out", tmp_path / "fifo", workdir=root),
        "--out a new file": case("predict", images[0], "--run", "teachers/std0", "--out", tmp_path / "new.csv",
                                 workdir=root),
        "export-model": case("export-model", tmp_path / "model", "--run", "teachers/std0", workdir=root),
        "export-model, imported": case("export-model", tmp_path / "imported", "--run", "teachers/imp", workdir=root),
    }
    manifest = Manifest.load(smoke_copy.manifest)      # an imported teacher: its own Linear fc, bias included
    imported = Network("resnet8", manifest.channels, manifest.num_classes, 16.0, head="linear")
    save_checkpoint(smoke_copy.teacher_dir("imp") / "checkpoint.pt", imported,
                    network_spec(imported, "resnet8", manifest.channels, manifest.num_classes, 16.0), {"kind": "test"})
    (tmp_path / "link").symlink_to(tmp_path / "target.csv")
    (tmp_path / "target.csv").write_text("old")
    os.mkfifo(tmp_path / "fifo")
    piped: list[bytes] = []
    reader = threading.Thread(target=lambda: piped.append((tmp_path / "fifo").read_bytes()), daemon=True)
    reader.start()
    with hold(data_lock(root / "data"), "the data"):       # another prepare at work
        results = dict(zip(cases, batch(list(cases.values()), tmp_path)))
    reader.join(timeout=10)
    for name in ("--out a link", "--out a FIFO", "--out a new file", "export-model", "export-model, imported"):
        assert results[name].returncode == 0 and "Traceback" not in results[name].stderr, results[name].stderr
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target.csv").read_text().startswith("path,error,")
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode) and piped[0].decode().startswith("path,error,")
    assert json.loads((tmp_path / "imported" / "model.json").read_text())["classifier"] == "linear"
    for f in (tmp_path / "new.csv", tmp_path / "model" / "model.json", tmp_path / "model" / "model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f        # the driver's umask is 022
    expected = {   # exit code, words of the one error line
        "run.json, evaluate": (1, [f"{std0 / 'run.json'} is torn", "cbd-cache train-teacher --name std0"]),
        "run.json, train-teacher": (1, [f"{std0 / 'run.json'} is torn", "cbd-cache train-teacher --name std0"]),
        "log.jsonl": (1, [f"{std0 / 'log.jsonl'}, line 2, is torn", "remove it"]),
        "checkpoint, export-model": (1, [f"{std0 / 'checkpoint.pt'} is torn", "cbd-cache train-teacher --name std0"]),
        "checkpoint, predict": (1, [f"{std0 / 'checkpoint.pt'} is torn", "cbd-cache train-teacher --name std0"]),
        "resume.pt": (1, [f"{root / 'students' / 's' / 'resume.pt'} is torn", "remove it", "starts over"]),
        "workdir a file": (2, [f"--workdir {tmp_path / 'a_file'} is a file, not a folder"]),
        "--out a folder": (2, [f"--out {tmp_path} is a folder"]),
        "--rows -5": (2, ["Invalid value for '--rows': -5 is not in the range x>=0"]),
        "prepare, data busy": (1, [f"{root / 'data'} is in use by process {os.getpid()}", "data.lock"]),
    }
    for name, (code, words) in expected.items():
        line = error_line(results[name], code)
        assert all(w in line for w in words), (name, line)
    assert results["eval.json"].returncode == 0 and "evaluating std0 again" in results["eval.json"].stderr
    assert json.loads((std0 / "eval.json").read_text())["top1"] == json.loads(saved["eval.json"])["top1"]
    last = [line for line in results["logs"].stdout.splitlines() if line.startswith("teachers/std0:")]
    assert results["log.jsonl removed"].returncode == 0 and last[0] in results["log.jsonl removed"].stdout
    assert not (tmp_path / "refused").exists() and not (root / "students" / "s" / "run.json").exists()
    (std0 / "log.jsonl").write_bytes(saved["log.jsonl"])
    assert hashes(root, "data", "cache.zarr", *[f"teachers/{t}/{f}" for t in ("std0", "aug0")
                                                 for f in ("checkpoint.pt", "run.json", "log.jsonl")]) == keep
