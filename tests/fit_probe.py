"""A teacher's training loop on the smoke pipeline, recorded: what test_global_batch.py compares across
world sizes and accumulation. Run alone (a world of one) or under torchrun:

    python tests/fit_probe.py WORKDIR OUT [--set KEY=VALUE ...]

The network, its input and its loss are float64, so that two layouts whose sums differ only in their
order agree to float64 rounding, far below what any real accumulation error shows (see
test_global_batch.py). Writes OUT/rank<r>.json: per optimiser step, the lr it used and the rows of
each micro-batch this rank fed it; rank 0 also writes OUT/grads.pt (each step's gradient, as the
optimiser saw it: after accumulation and DDP's all-reduce), OUT/params_step1.pt (the parameters after
the first step) and OUT/params.pt (after the last), BN buffers excluded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import TrainStream
from cbd_cache.models.networks import Network
from cbd_cache.system import distributed
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.seeding import seed_everything
from cbd_cache.train.engine import fit
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

SMOKE = Path(__file__).resolve().parents[1] / "pipelines" / "smoke.toml"


def main(workdir: str, out: str, *args: str) -> None:
    overrides = [a for a in args if a != "--set"]
    cfg = load_config(SMOKE, ["teacher.epochs=1", "pipeline.checkpoint_minutes=0", *overrides])
    runtime = make_runtime(cfg.pipeline)
    wd, t = Workdir(Path(workdir)), cfg.teachers[0]
    manifest = Manifest.load(wd.manifest)
    seed_everything(t.seed)
    net = runtime.prepare_model(Network(t.arch, manifest.channels, manifest.num_classes, t.gamma)).double()
    names = {id(p): k for k, p in net.named_parameters()}
    steps: list[dict] = [{"micro_rows": []}]
    grads: list[dict[str, torch.Tensor]] = []
    sgd_step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        steps[-1]["lr"] = self.param_groups[0]["lr"]
        grads.append({names[id(p)]: p.grad.detach().clone() for p in self.param_groups[0]["params"]})
        steps.append({"micro_rows": []})
        result = sgd_step(self, *a, **k)
        if len(grads) == 1 and runtime.dist.main:
            torch.save(parameters(net), Path(out, "params_step1.pt"))
        return result
    torch.optim.SGD.step = recording_step

    def step_fn(model, batch):
        steps[-1]["micro_rows"].append(batch[2].tolist())
        x, y = runtime.to_device(batch[0]).double(), batch[1].to(runtime.device)
        logits, _ = model(x)
        ce = F.cross_entropy(logits, y)
        return ce, {"ce": ce.detach()}
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="instance", seed=t.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=t.shuffle_buffer, augment=t)
    Path(out).mkdir(parents=True, exist_ok=True)
    fit(net, stream, t, step_fn, runtime, "probe", Path(out) / "run")
    rank = runtime.dist.rank
    Path(out, f"rank{rank}.json").write_text(json.dumps(steps[:-1]))
    if rank == 0:
        torch.save(grads, Path(out, "grads.pt"))
        torch.save(parameters(net), Path(out, "params.pt"))
    distributed.shutdown()


def parameters(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.named_parameters()}


if __name__ == "__main__":
    main(*sys.argv[1:])
