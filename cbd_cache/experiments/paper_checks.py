"""The claims the paper table tests, each stated with its numbers and whether it holds."""
from __future__ import annotations

from cbd_cache.data.longtail import SHOT_GROUPS
from cbd_cache.config import ALLOCATIONS
from cbd_cache.experiments.paper_design import HEADLINE_VIEWS
from cbd_cache.experiments.sweep import METRICS


# -------------------------------------------------------------------------------------------- output
def _row(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["label"] == label), None)


def _mean(rows: list[dict], label: str, metric: str = "top1") -> float | None:
    r = _row(rows, label)
    return None if r is None or not r["complete"] else r[metric]["mean"]


def checks(summary: dict[str, list[dict]], ncm: list[dict], views: int = HEADLINE_VIEWS,
           cache_bytes: dict[str, int] | None = None) -> list[str]:
    """The issue's 'must show' claims, each stated with its numbers and whether it holds."""
    t2, alpha, by_views = summary["table2"], summary["alpha"], summary["views"]
    out = []

    def line(claim: str, values: list[tuple[str, float | None]], holds: bool | None):
        nums = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} –" for k, v in values)
        verdict = "not yet run" if holds is None else ("holds" if holds else "**does not hold**")
        out.append(f"- {claim}: {verdict} ({nums}).")

    order = [(m, _mean(t2, m)) for m in ("CBD_ENS", "CBD", "cRT", "Standard-Instance")]
    ok = None if any(v is None for _, v in order) else all(a[1] > b[1] for a, b in zip(order, order[1:]))
    line("CBD_ENS > CBD > cRT > Standard-Instance (top-1, mean of 3 seeds)", order, ok)
    fl = [(d, _mean(alpha, f"{d}, alpha=0.4")) for d in ("feature", "logit")]
    line("feature >= logit distillation at alpha = 0.4", fl,
         None if any(v is None for _, v in fl) else fl[0][1] >= fl[1][1])
    nc = [(f"NCM {m}", _mean(ncm, m)) for m in ("CBD", "Standard-Instance")] if ncm else []
    line("NCM on CBD features > NCM on Standard-Instance features", nc or [("NCM", None)],
         None if not nc or any(v is None for _, v in nc) else nc[0][1] > nc[1][1])
    online = {m: _mean(by_views, "online", m) for m in METRICS}
    draws = {m: _mean(by_views, f"draws A={views}", m) for m in METRICS}
    uniform = _mean(by_views, f"uniform A={views}")
    co = [(f"draws A={views}", draws["top1"]), (f"uniform A={views}", uniform), ("online", online["top1"])]
    line(f"cached CBD_ENS, draws allocation at A = {views}, within 0.5 top-1 points of online", co,
         None if draws["top1"] is None or online["top1"] is None else online["top1"] - draws["top1"] <= 0.5)
    groups = [(f"{g} draws - online", None if draws[g] is None or online[g] is None else draws[g] - online[g])
              for g in SHOT_GROUPS]
    line(f"no shot group of draws A = {views} more than 1.5 points below online", groups,
         None if any(v is None for _, v in groups) else min(v for _, v in groups) >= -1.5)
    if cache_bytes:
        b = [(f"draws A={views} MiB", cache_bytes.get(f"draws A={views}", 0) / 2**20),
             (f"uniform A={views} MiB", cache_bytes.get(f"uniform A={views}", 0) / 2**20)]
        line(f"draws A = {views} cache bytes within 5% of the uniform A = {views} cache", b,
             abs(b[0][1] / b[1][1] - 1) <= 0.05 if b[1][1] else None)
    out += comparison_checks(summary)
    for alloc in ALLOCATIONS:
        fid = [("cache", _mean(by_views, f"{alloc} A={views}")),
               ("teachers on the stored views", _mean(by_views, f"{alloc} A={views}, teachers on the stored views"))]
        line(f"fidelity, {alloc} A = {views}: cached targets train like the teachers run on the same views "
             "(within 1 point, seed noise)", fid,
             None if any(v is None for _, v in fid) else abs(fid[0][1] - fid[1][1]) <= 1.0)
    return out


TABLE4_BASELINES = ("LWS", "τ-norm", "Logit Adjustment", "Balanced Softmax", "cRT")


def comparison_checks(summary: dict[str, list[dict]]) -> list[str]:
    """Table 4's and Section 4.3's claims: CBD above the field's baselines and above longer-trained baselines,
    CBD_ENS below the upper bound."""
    t4, ctl = summary.get("table4", []), summary.get("controls", [])
    out = []

    def line(claim: str, top: tuple[str, float | None], others: list[tuple[str, float | None]], above: bool = True):
        values = [top, *others]
        nums = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} –" for k, v in values)
        if any(v is None for _, v in values):
            verdict = "not yet run"
        else:
            holds = all((top[1] > v) if above else (top[1] < v) for _, v in others)
            verdict = "holds" if holds else "**does not hold**"
        out.append(f"- {claim}: {verdict} ({nums}).")

    if t4:
        line("CBD > LWS, cRT and Logit Adjustment (the paper's Table 4)", ("CBD", _mean(t4, "CBD")),
             [(m, _mean(t4, m)) for m in ("LWS", "cRT", "Logit Adjustment")])
        line("CBD_ENS > every baseline of Table 4 here (" + ", ".join(TABLE4_BASELINES) + ")",
             ("CBD_ENS", _mean(t4, "CBD_ENS")), [(m, _mean(t4, m)) for m in TABLE4_BASELINES])
    if ctl:
        cbd = ("CBD", _mean(t4, "CBD") if t4 else None)
        line("CBD > Standard-Instance trained twice as long, and > cRT trained as long as the student "
             "(the gain is not more training)", cbd,
             [(m, _mean(ctl, m)) for m in ("Standard-Instance, 2x epochs", "cRT, the student's epochs")])
        if _row(ctl, "Upper bound") is not None:
            line("CBD_ENS < the upper bound (features learnt from the whole balanced training set)",
                 ("CBD_ENS", _mean(t4, "CBD_ENS") if t4 else None), [("upper bound", _mean(ctl, "Upper bound"))],
                 above=False)
    return out
