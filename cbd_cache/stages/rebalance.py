"""Post-hoc rebalancing of a trained model's classifier: no training, one pass over val, one over the held-out split.

student.rebalance = "tau_norm"      rows w_j / |w_j|^tau (Kang et al.): needs a linear head (`student.head`)
student.rebalance = "logit_adjust"  logits z_j - tau * log pi_j (Menon et al.)

With `student.tau = -1` tau is chosen on the val split, from `models.rebalance.TAU_GRIDS`, by mean
per-class accuracy; the held-out split (test) is read once, for the final report, after the choice.
A dataset with no val split, or whose only held-out split is val (iNaturalist: val is what is
reported), cannot choose honestly: `plan_student` refuses it, with what to do (`data.val_per_class`,
or a given `student.tau`), as it refuses tau-norm on a cosine head. The choice and every tau's val
score go into the run's eval.json and run.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.models.losses import log_prior
from cbd_cache.models.rebalance import TAU_GRIDS, balanced_accuracy, choose_tau, rebalanced
from cbd_cache.stages.student import StudentPlan, already_done, selection_split, student_meta
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.evaluation import eval_loader, predict
from cbd_cache.train.skeleton import finish_run
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir


def train_posthoc(cfg: Config, wd: Workdir, runtime: Runtime, plan: StudentPlan) -> Path:
    """tau-norm or logit adjustment of `student.init`, tau given or chosen on val; saved as a run like any other."""
    if already_done(plan):
        return plan.checkpoint
    s = cfg.student
    manifest = Manifest.load(wd.manifest)
    net, meta = load_checkpoint(plan.init)
    prior = log_prior(manifest.train.class_counts)
    scores: dict[float, float] = {}
    if s.tau >= 0:
        tau, chosen_on = s.tau, "given (student.tau)"
    else:
        split = selection_split(manifest, f"student.rebalance={s.rebalance} on {s.init}")
        model = runtime.prepare_model(net)
        out = predict(model, eval_loader(manifest, split, ViewSpec.from_cfg(cfg.views), cfg.eval.batch_size, runtime),
                      runtime, features=True)
        e = torch.from_numpy(out["embeddings"]).to(runtime.device)
        with torch.no_grad():
            for t in TAU_GRIDS[s.rebalance]:
                logits = rebalanced(model.classifier, s.rebalance, t, prior.to(runtime.device))(e)
                scores[t] = balanced_accuracy(out["labels"], logits.argmax(1).cpu().numpy(), manifest.num_classes)
        tau, chosen_on = choose_tau(scores), split
        net = model.cpu()
        log(f"[student {plan.name}] tau {tau} chosen on {split} ({len(out['labels'])} images; mean per-class "
            f"accuracy {scores[tau]:.2f}, tau 0: {scores[0.0]:.2f})")
    net.classifier = rebalanced(net.classifier, s.rebalance, tau, prior)
    selection = {"tau": tau, "chosen_on": chosen_on, "grid": list(scores), "val_scores": list(scores.values())}
    n = meta["network"]
    return finish_run(plan, net, n["arch"], n["gamma"], cfg, manifest, runtime,
                      {**student_meta(cfg, plan, manifest), "selection": selection}, [], 0.0,
                      report_extra={"selection": selection})
