"""`*.batch_size` is the global batch: N processes, and accumulation within each, take the optimiser steps,
the lr at every step and the samples per step of one process with the whole batch, and follow the
same gradient.

Each run is tests/fit_probe.py (a smoke teacher, 1 epoch of 227 samples at a global batch of 32: 7 steps).
Which samples a step sees depends only on the stream's loader slots (rank x worker), so two layouts
with the same slots and the same micro-batches see the same samples in every step: 2 processes x 1
micro-batch of 16 = 1 process x 2 loader workers x 2 micro-batches of 16. They differ only in the order
of the gradient's sum: DDP all-reduces the two ranks' halves, accumulation adds the halves into .grad
one after the other. In float32 that order alone moved the weights by 1e-3 after 7 steps on one
machine and not at all on another (batch norm on 8-image micro-batches and a gamma = 20 cosine head
amplify the last bit), so the probe trains in float64: the two layouts then agree to float64 rounding
(measured: at most 6e-15 relative, every step), while a wrong loss scale or a micro-batch counted
twice moves the gradient by tens of percent. BN running statistics are not compared: DDP keeps rank
0's (it broadcasts rank 0's buffers every step).
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from cbd_cache.data.prepare import prepare
from cbd_cache.errors import ConfigError
from cbd_cache.train.engine import micro_batch
from cbd_cache.workdir import Workdir

from .conftest import ROOT, smoke_config

PROBE = ROOT / "tests" / "fit_probe.py"
STEPS, GLOBAL = 227 // 32, 32
# float64 sums of a few thousand terms in another order differ by ~1e-16 relative, and 7 steps grow that
# to ~1e-14 (measured 6e-15); a wrong scale or a doubled micro-batch is off by tens of percent
GRAD_RTOL = 1e-9          # per parameter tensor: |g_a - g_b| / |g_b|
WEIGHT_ATOL = 1e-10       # weights of magnitude ~0.3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Workdir:
    wd = Workdir(tmp_path_factory.mktemp("global_batch"))
    prepare(smoke_config(), wd)
    return wd


def probe(wd: Workdir, out, processes: int, *overrides: str) -> dict:
    """Run the probe in `processes` processes; returns its per-step record and rank 0's gradients and parameters.

    OMP_NUM_THREADS is the caller's, or 1 (two ranks on two cores); the result must not depend on it."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    sets = [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([*launcher, str(PROBE), str(wd.root), str(out), *sets], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert len({len(r) for r in ranks}) == 1
    steps = [{"lr": ranks[0][i]["lr"], "rows": sorted(x for r in ranks for m in r[i]["micro_rows"] for x in m),
              "micro": [len(m) for r in ranks for m in r[i]["micro_rows"]]} for i in range(len(ranks[0]))]
    assert all(r[i]["lr"] == steps[i]["lr"] for r in ranks for i in range(len(steps)))   # every rank steps alike
    load = functools.partial(torch.load, weights_only=True)
    return {"steps": steps, "grads": load(out / "grads.pt"), "step1": load(out / "params_step1.pt"),
            "params": load(out / "params.pt"), "log": result.stderr}


def gradient_error(a: dict, b: dict) -> float:
    """The largest relative difference of any parameter's gradient at any step."""
    return max(float((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-30))
               for ga, gb in zip(a["grads"], b["grads"], strict=True) for k in gb)


def assert_same_training(a: dict, b: dict) -> None:
    """The same rows and lr at every step, the same gradient to float64 rounding, the same weights after
    the first step and after the last."""
    assert [s["rows"] for s in a["steps"]] == [s["rows"] for s in b["steps"]]
    assert [s["lr"] for s in a["steps"]] == [s["lr"] for s in b["steps"]]
    assert gradient_error(a, b) < GRAD_RTOL
    for when in ("step1", "params"):
        for k in a[when]:
            torch.testing.assert_close(a[when][k], b[when][k], atol=WEIGHT_ATOL, rtol=0, msg=f"{when} {k}")


@pytest.mark.slow
def test_two_processes_take_the_steps_lrs_and_global_batch_of_one(prepared, tmp_path):
    one = probe(prepared, tmp_path / "one", 1)
    two = probe(prepared, tmp_path / "two", 2, "pipeline.workers=0")      # pinned: one stream per process
    assert len(one["steps"]) == len(two["steps"]) == STEPS
    assert [s["lr"] for s in two["steps"]] == [s["lr"] for s in one["steps"]]
    assert [len(s["rows"]) for s in one["steps"]] == [len(s["rows"]) for s in two["steps"]] == [GLOBAL] * STEPS
    assert [s["micro"] for s in two["steps"]] == [[16, 16]] * STEPS
    assert "7 steps of a global batch of 32: 16 per process x 2 process(es); lr 0.05" in two["log"]
    # the same slots and micro-batches in one process: 2 loader workers, 2 micro-batches per step
    same = probe(prepared, tmp_path / "same", 1, "pipeline.workers=2", "pipeline.accumulate=2")
    assert "in 2 micro-batches of 16" in same["log"]
    assert_same_training(same, two)
    # the comparison sees a real difference: one batch of 32 (other BN statistics) is not two of 16
    assert gradient_error(one, two) > 0.01


@pytest.mark.slow
def test_two_processes_accumulating_match_one_process_of_the_same_global_batch(prepared, tmp_path):
    one = probe(prepared, tmp_path / "one", 1)
    two = probe(prepared, tmp_path / "two", 2, "pipeline.workers=0", "pipeline.accumulate=2")
    assert [s["lr"] for s in two["steps"]] == [s["lr"] for s in one["steps"]] and len(one["steps"]) == STEPS
    assert [len(s["rows"]) for s in two["steps"]] == [GLOBAL] * STEPS
    assert [s["micro"] for s in two["steps"]] == [[8, 8, 8, 8]] * STEPS
    same = probe(prepared, tmp_path / "same", 1, "pipeline.workers=2", "pipeline.accumulate=4")
    assert_same_training(same, two)


def test_a_global_batch_that_does_not_split_is_refused_with_one_line():
    assert micro_batch(256, 8, 1, "teacher std0") == 32 and micro_batch(256, 8, 4, "student") == 8
    with pytest.raises(ConfigError) as e:
        micro_batch(256, 3, 1, "teacher std0")
    assert str(e.value) == ("[teacher std0] batch_size=256 is the global batch and does not split over 3 process(es) "
                            "x pipeline.accumulate=1; use a multiple of 3")
    with pytest.raises(ConfigError, match="pipeline.accumulate=0: must be >= 1"):
        smoke_config("pipeline.accumulate=0")
