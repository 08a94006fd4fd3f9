"""Through faults: a killed export or student resumes to what an uninterrupted run gives; NaN stops training."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch.utils.data import DataLoader

from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import CacheSpec, TrainStream
from cbd_cache.errors import NonFiniteLoss
from cbd_cache.models.networks import Network
from cbd_cache.system.runtime import make_runtime
from cbd_cache.train.engine import fit
from cbd_cache.train.steps import cross_entropy_step
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir
from cli import main

from .conftest import ROOT, SMOKE, smoke_config

# Runs the CLI in a subprocess that SIGKILLs itself at a chosen point: after the KILL_AT-th optimiser
# step (training), or half-way through writing the KILL_AT-th shard (export: views and half of the first
# teacher's descriptors written, the rest and the done-marks not).
KILLER = r"""
import os, signal, sys
import torch
from cbd_cache.cache.writer import CacheWriter

kill_at, count = int(os.environ["KILL_AT"]), [0]

def die(): os.kill(os.getpid(), signal.SIGKILL)

step = torch.optim.SGD.step
def killing_step(self, *a, **k):
    out = step(self, *a, **k)
    count[0] += 1
    if count[0] == kill_at: die()
    return out
torch.optim.SGD.step = killing_step

write_shard = CacheWriter.write_shard
def killing_write_shard(self, index, views, descriptors, logits=None):
    count[0] += 1
    if count[0] == kill_at:
        start = int(self.layout.blocks[index][0])     # the shard's block of the flat arrays, half-written
        self.group["views"][start:start + len(views)] = views
        name, half = next(iter(descriptors)), len(views) // 2
        self.group[f"teachers/{name}/descriptors"][start:start + half] = descriptors[name][:half]
        die()
    return write_shard(self, index, views, descriptors, logits)
CacheWriter.write_shard = killing_write_shard

import cli
sys.argv = ["cbd-cache", *sys.argv[1:]]
cli.main()
"""


def cli_process(*args: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def array_hashes(path) -> dict[str, str]:
    """sha256 of every array's dtype, shape and bytes in a Zarr group, by array path."""
    out = {}

    def walk(group, prefix):
        for name, arr in group.arrays():
            data = np.ascontiguousarray(arr[:])
            out[prefix + name] = hashlib.sha256(f"{data.dtype}{data.shape}".encode() + data.tobytes()).hexdigest()
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")
    walk(zarr.open_group(str(path), mode="r"), "")
    return out


def test_stream_restarts_at_any_batch_on_the_same_items(smoke_workdir):
    """A stream placed after k batches yields exactly what the uninterrupted one yields from batch k on,
    with or without loader workers (which take batches round robin), on each of 2 ranks."""
    manifest = Manifest.load(smoke_workdir.manifest)
    cfg = smoke_config()
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="class_balanced", seed=4,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=64,
                         cache=CacheSpec(smoke_workdir.cache, ("std0",), cfg.export.views))
    batch = 16   # quota per slot 227 // 2 = 113 with 2 workers: batches straddle epochs, k = 9 starts mid-epoch
    for workers, rank, world in [(0, 0, 1), (2, 0, 1), (0, 1, 2)]:
        def batches(k, n):
            loader = DataLoader(stream.place(rank, world, k, batch), batch_size=batch, num_workers=workers)
            return list(islice(loader, n))
        full, resumed = batches(0, 17), batches(9, 8)
        for a, b in zip(full[9:], resumed):
            assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])     # rows, view indices
            assert torch.equal(a[0], b[0]) and torch.equal(a[4], b[4])     # images, targets
        assert not torch.equal(full[8][2], resumed[0][2])


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(smoke_workdir, tmp_path):
    cfg = smoke_config("pipeline.checkpoint_steps=4")
    manifest = Manifest.load(smoke_workdir.manifest)
    runtime = make_runtime(cfg.pipeline)
    t = cfg.teachers[0]
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="instance", seed=0,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=64)
    ce, calls = cross_entropy_step(runtime), [0]

    def poisoned(model, batch):   # step 10 of 14 (epoch 2, step 3 of 7) gives a NaN loss
        calls[0] += 1
        loss, stats = ce(model, batch)
        return (loss * float("nan") if calls[0] == 10 else loss), stats
    with pytest.raises(NonFiniteLoss) as e:
        fit(Network(t.arch, manifest.channels, manifest.num_classes, t.gamma), stream, t, poisoned, runtime,
            "teacher nan", tmp_path)
    message = str(e.value)
    assert "at step 10 of 14 (epoch 2, step 3 of 7)" in message
    assert f"{tmp_path / 'resume.pt'} at step 8" in message
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["step"] == 8   # the good one, not overwritten


@pytest.mark.slow
def test_killed_export_resumes_to_a_bit_identical_cache(smoke_workdir, tmp_path):
    """On a ragged (draws-allocated) cache: shards hold different numbers of views."""
    wd, whole = tmp_path / "wd", tmp_path / "whole"
    for folder in (wd, whole):
        shutil.copytree(smoke_workdir.root, folder, ignore=shutil.ignore_patterns("cache.zarr"))
    draws = ["--set", "export.allocation=draws", "--set", "export.views=4"]
    common = ["--pipeline", str(SMOKE), "--workdir", str(wd), *draws]
    killed = cli_process("export", *common, kill_at=4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = zarr.open_group(str(wd / "cache.zarr"), mode="r")["teachers/std0/shard_done"][:]
    assert done.sum() == 3 and not done.all()        # 3 shards done, the 4th half-written
    resumed = cli_process("export", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "5/8 shards to go" in resumed.stderr
    uninterrupted = cli_process("export", "--pipeline", str(SMOKE), "--workdir", str(whole), *draws)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    expected = array_hashes(whole / "cache.zarr")
    counts = zarr.open_group(str(whole / "cache.zarr"), mode="r")["view_count"][:]
    assert counts.max() > 4 * counts.min()           # ragged indeed
    # view_count, view_offset, views, views_done, teachers/{std0,aug0}/{descriptors,shard_done}
    assert len(expected) == 8
    assert array_hashes(wd / "cache.zarr") == expected


@pytest.mark.slow
def test_a_killed_add_resumes_to_the_uninterrupted_add(smoke_workdir, tmp_path):
    """SIGKILL while a third (imported) teacher is added to a 2-teacher cache, then `export`: the cache is
    bit-identical, array by array, to an add that was not interrupted; the others never ran."""
    from .test_export import with_imported_teacher

    wd, whole = Workdir(tmp_path / "wd"), Workdir(tmp_path / "whole")
    shutil.copytree(smoke_workdir.root, wd.root)
    pipeline = with_imported_teacher(wd, tmp_path)
    shutil.copytree(wd.root, whole.root)
    common = ["--pipeline", str(pipeline), "--workdir", str(wd.root)]
    killed = cli_process("export", *common, kill_at=4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "running rn18 (8 shards); std0, aug0 complete, not run" in killed.stderr
    done = zarr.open_group(str(wd.cache), mode="r")["teachers/rn18/shard_done"][:]
    assert done.sum() == 3                          # 3 shards done, the 4th half-written
    resumed = cli_process("export", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "running rn18 (5 shards); std0, aug0 complete, not run" in resumed.stderr
    assert "5/8 shards to go" in resumed.stderr and "adding" not in resumed.stderr
    uninterrupted = cli_process("export", "--pipeline", str(pipeline), "--workdir", str(whole.root))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    expected = array_hashes(whole.cache)
    assert "teachers/rn18/descriptors" in expected and array_hashes(wd.cache) == expected


@pytest.mark.slow
def test_killed_student_resumes_to_the_uninterrupted_result(smoke_workdir, tmp_path):
    """Tolerance on CPU: epoch losses within 1e-4 relative and test top-1 within 1 point; in practice the
    resumed run replays the same batches from the same state and matches to the last bit."""
    runs = {}
    for name in ("whole", "killed"):
        shutil.copytree(smoke_workdir.root, tmp_path / name)
        runs[name] = ["--pipeline", str(SMOKE), "--workdir", str(tmp_path / name), "--set", "student.name=s",
                      "--set", "pipeline.checkpoint_steps=3"]
    whole = cli_process("train-student", *runs["whole"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = cli_process("train-student", *runs["killed"], kill_at=8)   # 14 steps; checkpoint at step 6
    assert killed.returncode == -9
    folder = tmp_path / "killed" / "students" / "s"
    assert torch.load(folder / "resume.pt", weights_only=True)["step"] == 6 and not (folder / "run.json").exists()

    # a changed config is refused, naming the keys that differ
    refused = CliRunner().invoke(main, ["train-student", *runs["killed"], "--set", "student.lr=0.1", "--resume"])
    assert refused.exit_code == 2 and "student.lr: 0.05 -> 0.1" in refused.stderr

    resumed = cli_process("train-student", *runs["killed"], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing from step 6" in resumed.stderr and "14 steps" in resumed.stderr
    a = json.loads((tmp_path / "whole" / "students" / "s" / "run.json").read_text())
    b = json.loads((folder / "run.json").read_text())
    assert [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]] == [7, 14]
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("loss", "ce", "distill"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-4), key
    assert abs(b["test_top1"] - a["test_top1"]) <= 1.0
    assert not (folder / "resume.pt").exists()        # a finished run drops its resume checkpoint


def test_a_small_dataset_is_parsed_once_however_many_epochs(smoke_workdir, monkeypatch):
    """Each epoch starts with a fresh shuffle buffer (so it can be replayed alone); the parsed shards are
    kept, so refilling it re-reads no tar."""
    import cbd_cache.loaders as stream_module

    calls = []
    read = stream_module.read_shard
    monkeypatch.setattr(stream_module, "read_shard", lambda *a: calls.append(a[0]) or read(*a))
    manifest = Manifest.load(smoke_workdir.manifest)
    stream = TrainStream(manifest, ViewSpec.from_cfg(smoke_config().views), sampling="instance", seed=0,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=256)
    assert len(list(islice(stream, 3 * manifest.train.num_samples))) == 3 * manifest.train.num_samples
    assert sorted(calls) == sorted({*calls}) and len(calls) == len(manifest.train.shards)
