"""A teacher's training loop on the smoke pipeline, recorded: what test_global_batch.py compares across
world sizes and accumulation. Run alone (a world of one) or under torchrun:

    python tests/fit_probe.py WORKDIR OUT [--set KEY=VALUE ...]

Writes OUT/rank<r>.json: per optimiser step, the lr it used and the rows of each micro-batch this rank
fed it; rank 0 also writes OUT/params.pt (the trained parameters, BN buffers excluded).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cbd_cache import distributed
from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.stream import TrainStream
from cbd_cache.engine import cross_entropy_step, fit
from cbd_cache.models import Network
from cbd_cache.runtime import make_runtime
from cbd_cache.seeding import seed_everything
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

SMOKE = Path(__file__).resolve().parents[1] / "pipelines" / "smoke.toml"


def main(workdir: str, out: str, *args: str) -> None:
    overrides = [a for a in args if a != "--set"]
    cfg = load_config(SMOKE, ["teacher.epochs=1", "pipeline.checkpoint_minutes=0", *overrides])
    runtime = make_runtime(cfg.pipeline)
    wd, t = Workdir(Path(workdir)), cfg.teachers[0]
    manifest = Manifest.load(wd.manifest)
    steps: list[dict] = [{"micro_rows": []}]
    sgd_step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        steps[-1]["lr"] = self.param_groups[0]["lr"]
        steps.append({"micro_rows": []})
        return sgd_step(self, *a, **k)
    torch.optim.SGD.step = recording_step
    ce = cross_entropy_step(runtime)

    def step_fn(model, batch):
        steps[-1]["micro_rows"].append(batch[2].tolist())
        return ce(model, batch)
    seed_everything(t.seed)
    net = runtime.prepare_model(Network(t.arch, manifest.channels, manifest.num_classes, t.gamma))
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="instance", seed=t.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=t.shuffle_buffer, augment=t)
    fit(net, stream, t, step_fn, runtime, "probe", Path(out) / "run")
    rank = runtime.dist.rank
    Path(out, f"rank{rank}.json").write_text(json.dumps(steps[:-1]))
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in net.named_parameters()}, Path(out, "params.pt"))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
