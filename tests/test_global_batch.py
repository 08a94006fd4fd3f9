"""`*.batch_size` is the global batch: N processes, and accumulation within each, take the optimiser steps,
the lr at every step and the samples per step of one process with the whole batch.

Each run is tests/fit_probe.py (a smoke teacher, 1 epoch of 227 samples at a global batch of 32: 7 steps).
Which samples a step sees depends only on the stream's loader slots (rank x worker), so two layouts
with the same slots and the same micro-batches see the same samples in every step and must end at the
same weights: 2 processes x 1 micro-batch of 16 = 1 process x 2 loader workers x 2 micro-batches of 16.
They agree to float tolerance only: DDP averages the two ranks' gradients in one all-reduce, while
accumulation adds the two halves into .grad one after the other, so the sums round differently. BN
running statistics are not compared: DDP keeps rank 0's (it broadcasts rank 0's buffers every step).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from cbd_cache.data.prepare import prepare
from cbd_cache.engine import micro_batch
from cbd_cache.config import ConfigError
from cbd_cache.workdir import Workdir

from .conftest import ROOT, smoke_config

PROBE = ROOT / "tests" / "fit_probe.py"
STEPS, GLOBAL = 227 // 32, 32
# float32 parameters after 7 SGD steps: a differing summation order stays well inside this; a different
# sample or batch goes well outside it (the first test asserts both)
ATOL = 1e-5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Workdir:
    wd = Workdir(tmp_path_factory.mktemp("global_batch"))
    prepare(smoke_config(), wd)
    return wd


def probe(wd: Workdir, out, processes: int, *overrides: str) -> dict:
    """Run the probe in `processes` processes; returns its per-step record and rank 0's parameters."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    sets = [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(PROBE), str(wd.root), str(out), *sets], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert len({len(r) for r in ranks}) == 1
    steps = [{"lr": ranks[0][i]["lr"], "rows": sorted(x for r in ranks for m in r[i]["micro_rows"] for x in m),
              "micro": [len(m) for r in ranks for m in r[i]["micro_rows"]]} for i in range(len(ranks[0]))]
    assert all(r[i]["lr"] == steps[i]["lr"] for r in ranks for i in range(len(steps)))   # every rank steps alike
    return {"steps": steps, "params": torch.load(out / "params.pt", weights_only=True), "log": result.stderr}


def assert_same_weights(a: dict, b: dict) -> None:
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], atol=ATOL, rtol=0, msg=k)


def test_two_processes_take_the_steps_lrs_and_global_batch_of_one(prepared, tmp_path):
    one = probe(prepared, tmp_path / "one", 1)
    two = probe(prepared, tmp_path / "two", 2)
    assert len(one["steps"]) == len(two["steps"]) == STEPS
    assert [s["lr"] for s in two["steps"]] == [s["lr"] for s in one["steps"]]
    assert [len(s["rows"]) for s in one["steps"]] == [len(s["rows"]) for s in two["steps"]] == [GLOBAL] * STEPS
    assert [s["micro"] for s in two["steps"]] == [[16, 16]] * STEPS
    assert "7 steps of a global batch of 32: 16 per process x 2 process(es); lr 0.05" in two["log"]
    # the same slots and micro-batches in one process: 2 loader workers, 2 micro-batches per step
    same = probe(prepared, tmp_path / "same", 1, "pipeline.workers=2", "pipeline.accumulate=2")
    assert [s["rows"] for s in same["steps"]] == [s["rows"] for s in two["steps"]]
    assert [s["lr"] for s in same["steps"]] == [s["lr"] for s in one["steps"]]
    assert "in 2 micro-batches of 16" in same["log"]
    assert_same_weights(same, two)
    assert any(not torch.allclose(one["params"][k], two["params"][k], atol=ATOL) for k in one["params"])


@pytest.mark.slow
def test_two_processes_accumulating_match_one_process_of_the_same_global_batch(prepared, tmp_path):
    one = probe(prepared, tmp_path / "one", 1)
    two = probe(prepared, tmp_path / "two", 2, "pipeline.accumulate=2")
    assert [s["lr"] for s in two["steps"]] == [s["lr"] for s in one["steps"]] and len(one["steps"]) == STEPS
    assert [len(s["rows"]) for s in two["steps"]] == [GLOBAL] * STEPS
    assert [s["micro"] for s in two["steps"]] == [[8, 8, 8, 8]] * STEPS
    same = probe(prepared, tmp_path / "same", 1, "pipeline.workers=2", "pipeline.accumulate=4")
    assert [s["rows"] for s in same["steps"]] == [s["rows"] for s in two["steps"]]
    assert_same_weights(same, two)


def test_a_global_batch_that_does_not_split_is_refused_with_one_line():
    assert micro_batch(256, 8, 1, "teacher std0") == 32 and micro_batch(256, 8, 4, "student") == 8
    with pytest.raises(ConfigError) as e:
        micro_batch(256, 3, 1, "teacher std0")
    assert str(e.value) == ("[teacher std0] batch_size=256 is the global batch and does not split over 3 process(es) "
                            "x pipeline.accumulate=1; use a multiple of 3")
    with pytest.raises(ConfigError, match="pipeline.accumulate=0: must be >= 1"):
        smoke_config("pipeline.accumulate=0")
