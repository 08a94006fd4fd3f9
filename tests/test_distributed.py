"""Beyond one process: the stream's rank slices, 2-process torchrun (gloo) runs of every stage, parallel teachers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice

import numpy as np
import pytest
import zarr

from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import prepare
from cbd_cache.loaders import TrainStream
from cbd_cache.stages.export import export_cache
from cbd_cache.system.runtime import make_runtime
from cbd_cache.train.engine import steps_per_epoch
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

from .conftest import ROOT, SMOKE, smoke_config
from .test_cli_e2e import CLI
from .test_resume import array_hashes


def rank_stream(manifest, rank, world, sampling="class_balanced"):
    cfg = smoke_config()
    return TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=sampling, seed=0,
                       samples_per_epoch=manifest.train.num_samples, shuffle_buffer=64).place(rank, world)


def test_ranks_read_disjoint_equal_slices_and_stay_balanced_together(smoke_workdir, tmp_path):
    # 5 shards of 48, 48, 48, 48, 35 rows over 2 ranks: uneven in count and in size
    cfg = smoke_config("data.shard_size=48")
    manifest = prepare(cfg, Workdir(tmp_path))
    assert len(manifest.train.shards) == 5
    n, epochs = manifest.train.num_samples, 4
    quota = n // 2
    streams = [list(islice(rank_stream(manifest, rank, 2), epochs * quota)) for rank in (0, 1)]
    for epoch in range(epochs):                               # each rank emits `quota` items per epoch
        rows = [{r[2] for r in s[epoch * quota:(epoch + 1) * quota]} for s in streams]
        assert not rows[0] & rows[1]                          # disjoint: each rank reads its own shards
    labels = [r[1] for s in streams for r in s]
    # Globally balanced: over 4 epochs (904 samples) each class's share is within 0.035 of 1/C = 0.1
    # (binomial std ~0.01), although each rank alone sees a different class mix.
    hist = np.bincount(labels, minlength=manifest.num_classes) / len(labels)
    np.testing.assert_allclose(hist, 0.1, atol=0.035)


def assert_same_cache(a, b) -> None:
    """The same arrays, views and layout bit for bit, and the same descriptors to float16 rounding.

    The two exports ran the same teachers on the same batches, but torchrun gives each rank one thread
    and this process has its own count; a convolution's float32 sums may then round differently in the
    last bit, which float16 storage turns into one unit in the last place now and then (about 1e-4)."""
    ga, gb = (zarr.open_group(str(x), mode="r") for x in (a, b))
    hashes_a, hashes_b = array_hashes(a), array_hashes(b)
    assert hashes_a.keys() == hashes_b.keys()
    for name in hashes_a:
        if name.endswith("/descriptors"):
            x, y = ga[name][:], gb[name][:]
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=0, atol=1e-3, err_msg=name)
        else:
            assert hashes_a[name] == hashes_b[name], name


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """docs/cluster.md's command line: torchrun --nproc_per_node=N --no-python cbd-cache ..."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
               CLI, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_two_process_smoke_pipeline_with_uneven_shards(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) for teacher, export and student on 5 uneven shards: every stage
    finishes with the same step count on both ranks, and the 2-rank cache is a 1-process export's."""
    overrides = ["data.shard_size=48", "teacher.epochs=1"]   # the student keeps its 2 epochs
    cfg = smoke_config(*overrides)
    wd = Workdir(tmp_path / "wd")
    common = ["--pipeline", str(SMOKE), "--workdir", str(wd.root), *[x for o in overrides for x in ("--set", o)]]
    torchrun("prepare", *common)
    manifest = Manifest.load(wd.manifest)
    assert len(manifest.train.shards) == 5
    steps = steps_per_epoch(manifest.train.num_samples, 32)    # a global batch of 32: 227 // 32 = 7

    out = torchrun("train-teacher", *common).stderr
    for t in ("std0", "aug0"):
        assert f"[teacher {t}] {steps} steps on each of 2 ranks" in out
        log = [json.loads(line) for line in (wd.teacher_dir(t) / "log.jsonl").read_text().splitlines()]
        assert [h["step"] for h in log] == [steps]
    assert "[teacher std0] resnet8, 1 epochs x 7 steps of a global batch of 32: 16 per process x 2 process(es)" in out

    out = torchrun("export", *common).stderr
    assert "dealt over 2 ranks" in out and "5/5 shards done" in out
    single = Workdir(tmp_path / "single")
    shutil.copytree(wd.root, single.root, ignore=shutil.ignore_patterns("cache.zarr"))
    export_cache(cfg, single, make_runtime(cfg.pipeline))
    assert_same_cache(wd.cache, single.cache)
    out = torchrun("export", *common, "--replace", "aug0").stderr    # one teacher group rewritten by 2 ranks
    assert "replacing teacher aug0" in out and "running aug0 (5 shards)" in out and "dealt over 2 ranks" in out
    assert_same_cache(wd.cache, single.cache)

    out = torchrun("train-student", *common).stderr
    name = "student_data.shard_size=48_teacher.epochs=1"   # named by its data and teacher settings too
    assert f"[student {name}] {2 * steps} steps on each of 2 ranks" in out
    run = json.loads((wd.student_dir(name) / "run.json").read_text())
    assert [h["step"] for h in run["history"]] == [steps, 2 * steps]
    assert (wd.student_dir(name) / "eval.json").is_file()
    verify = subprocess.run([sys.executable, "-m", "cli", "cache", "verify", *common], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK"), verify.stdout + verify.stderr


@pytest.mark.slow
def test_teachers_train_in_parallel_processes(smoke_workdir, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(smoke_workdir.root, wd, ignore=shutil.ignore_patterns("teachers", "cache.zarr"))
    result = subprocess.run([sys.executable, "-m", "cli", "train-teacher", "--jobs", "2", "--pipeline", str(SMOKE),
                             "--workdir", str(wd), "--set", "teacher.epochs=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for t in ("std0", "aug0"):
        assert (wd / "teachers" / t / "run.json").is_file()
        assert f"[teacher {t}] done" in result.stderr


# Rank 1 stops itself (SIGSTOP, as a frozen node or a debugger would) in its second optimiser step.
STOPPER = r"""
import os, signal, sys
import torch
count, step = [0], torch.optim.SGD.step
def stopping_step(self, *a, **k):
    count[0] += 1
    if count[0] == 2 and os.environ["RANK"] == "1":
        open(os.environ["STOPPED_PID"], "w").write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    return step(self, *a, **k)
torch.optim.SGD.step = stopping_step
import cli
sys.argv = ["cbd-cache", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.slow
def test_a_stalled_rank_is_given_up_on_within_the_timeout_and_named(smoke_workdir, tmp_path):
    """A SIGSTOPped rank holds the others in their next collective; they give up within
    pipeline.rank_timeout_minutes (here 6 s), in one line naming it, and exit 1."""
    wd = tmp_path / "wd"
    shutil.copytree(smoke_workdir.root, wd)
    stopped = tmp_path / "stopped.pid"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
               sys.executable, "-c", STOPPER, "train-student", "--pipeline", str(SMOKE), "--workdir", str(wd),
               "--set", "pipeline.rank_timeout_minutes=0.1"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "STOPPED_PID": str(stopped), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if stopped.exists() and "has not answered" in log.read_text():
                os.kill(int(stopped.read_text()), signal.SIGKILL)   # torchrun would wait 30 s to kill it itself
                break
            time.sleep(0.5)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in log.read_text().splitlines() if line.startswith("cbd-cache: error:")]
    assert len(lines) == 1, log.read_text()[-3000:]
    assert "rank 1 of 2 has not answered for" in lines[0] and "rank 0 gives up" in lines[0]
    assert "pipeline.rank_timeout_minutes" in lines[0]
