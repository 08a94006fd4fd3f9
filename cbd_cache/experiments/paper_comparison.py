"""The paper table's comparison sections: Table 4 (the field's baselines), the control experiments and the upper
bound, calibration, Figures 1 and 4, how anything was chosen, and the summary table the README shows."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_images
from cbd_cache.experiments.paper_checks import _row
from cbd_cache.experiments.paper_design import (
    FIGURE_MODELS,
    PAPER_CONTROLS,
    PAPER_TABLE2,
    PAPER_TABLE4,
    SEEDS,
    UPPER_EXTRACTOR,
    controls,
    stage1,
    table4,
    upper_bound_sets,
)
from cbd_cache.experiments.paper_figures import nearest, pick_queries, plot_figure1, plot_figure4
from cbd_cache.experiments.sweep import METRICS, Run, load_report, seeds_text
from cbd_cache.stages.ncm import load_kept_features
from cbd_cache.system.tables import markdown_table, pm
from cbd_cache.train.calibration import plot_reliability, pool
from cbd_cache.workdir import Workdir

SUMMARY_ROWS = (("table2", "Standard-Instance"), ("table2", "Standard-Class-Bal"), ("table2", "Fine-tuning"),
                ("table4", "cRT"), ("table4", "LWS"), ("table4", "τ-norm"), ("table4", "Logit Adjustment"),
                ("table4", "Balanced Softmax"), ("table4", "CBD"), ("table4", "CBD_ENS"),
                ("controls", "Standard-Instance, 2x epochs"), ("controls", "cRT, the student's epochs"),
                ("controls", "Upper bound"))


def table(header: Sequence[str], rows, align: str = "") -> list[str]:
    return markdown_table(header, rows, align).rstrip("\n").split("\n")


def settings(sets: Sequence[str], root: Path | None = None) -> str:
    """--set items as the tables show them: student keys bare, others whole, the workdir as W, `students/@row` as @row."""
    def text(s: str) -> str:
        s = s.removeprefix("student.").replace("students/@", "@")
        return s.replace(str(root), "W") if root is not None else s
    return " ".join(f"`{text(s)}`" for s in sets) or "(defaults)"


def paper_text(label: str, table2_first: bool = False) -> str:
    """The paper's ImageNet-LT number of a row: all (many / medium / few); Table 4's own cRT unless `table2_first`."""
    if label in PAPER_CONTROLS:
        return f"{PAPER_CONTROLS[label]}"
    p = (PAPER_TABLE2.get(label) or PAPER_TABLE4.get(label)) if table2_first else \
        (PAPER_TABLE4.get(label) or PAPER_TABLE2.get(label))
    if not p:
        return "–"
    return f"{p[3]}" + ("" if p[0] is None else f" ({p[0]} / {p[1]} / {p[2]})")


def taus_text(row: dict) -> str:
    return ", ".join(f"{t:g}" for t in row.get("taus") or []) or "–"


def metric_cells(row: dict | None) -> list[str]:
    return [pm(row[m]) if row else "–" for m in (*METRICS, "ece")] + [seeds_text(row) if row else "–"]


def figure_runs(runs: dict[str, list[Run]]) -> dict[str, Run]:
    """The seed-0 runs Figures 1 and 4 compare (Table 2's Standard-Instance and CBD_ENS)."""
    return {r.label: r for r in runs.get("table2", []) if r.label in FIGURE_MODELS and r.seed == SEEDS[0]}


def draw_figures(wd: Workdir, manifest: Manifest, runs: dict[str, list[Run]], seed: int, fig1: Path,
                 fig4: Path) -> str | None:
    """Figures 1 and 4 from the features NCM kept; None when drawn, else why not."""
    kept = {label: load_kept_features(wd.student_dir(r.name)) for label, r in figure_runs(runs).items()}
    if len(kept) < len(FIGURE_MODELS) or any(v is None for v in kept.values()):
        return "not drawn yet: the NCM pass of " + " and ".join(FIGURE_MODELS) + " (seed 0) has not run"
    counts, names = manifest.train.class_counts, manifest.class_names
    split = "val" if "val" in manifest.splits else manifest.eval_split
    plot_figure1(counts, names, [(m, kept[m][f"{split}_features"], kept[m][f"{split}_labels"]) for m in FIGURE_MODELS],
                 split, fig1)
    held = manifest.eval_split
    first = kept[FIGURE_MODELS[0]]
    queries = pick_queries(first[f"{held}_labels"], counts, seed)
    near = {m: nearest(kept[m]["train_features"], kept[m][f"{held}_features"][queries]) for m in FIGURE_MODELS}
    train_rows = sorted({int(i) for n in near.values() for i in n.ravel()})
    train_images, test_images = read_images(manifest, "train", train_rows), read_images(manifest, held, queries)
    train_labels = first["train_labels"]
    plot_figure4([(test_images[q].numpy(), int(first[f"{held}_labels"][q])) for q in queries],
                 [(m, [[(train_images[int(i)].numpy(), int(train_labels[i])) for i in row] for row in near[m]])
                  for m in FIGURE_MODELS], names, counts, fig4)
    return None


def comparison_lines(cfg: Config, wd: Workdir, manifest: Manifest, summary: dict[str, list[dict]],
                     runs: dict[str, list[Run]], out: Path, name: str) -> list[str]:
    """The Markdown of Table 4, the controls, calibration, Figures 1 and 4 and model selection; draws the PNGs."""
    t4, ctl = summary.get("table4", []), summary.get("controls", [])
    sets4, setsc = dict(table4(cfg)), dict(controls(cfg, wd.root))
    val = manifest.source.get("val", "none")
    lines = ["", "## Table 4: the field's baselines from the same stage-1 models", "",
             f"LWS and cRT train a classifier on the first standard teacher's ({stage1(cfg)}) cached descriptors "
             "for 10 epochs, class-balanced (LWS: a per-class scale on its frozen classifier; cRT: a new one). Logit Adjustment subtracts tau * log(prior) from each "
             "Standard-Instance run's logits. τ-norm divides each classifier row by its norm to the power tau: this "
             "tool's cosine classifier already divides every row by its norm (every tau gives the same model), so "
             "τ-norm starts from Standard-Instance runs trained with a linear head (`head=linear`), shown beside "
             "it. Balanced Softmax trains Standard-Instance with CE on z + log(prior). `@row`: that row's run of "
             f"the same seed. **tau is chosen on the val split** ({val}), never on {manifest.eval_split}; the "
             "chosen tau of each seed is listed. ECE: 15 equal-width bins of the top-1 softmax confidence, in %.", ""]
    lines += table(["method", "student settings", "top-1", "many", "medium", "few", "ECE", "seeds", "tau (per seed)",
                    "paper ImageNet-LT all (many / med / few)"],
                   [[r["label"], settings(sets4[r["label"]]), *metric_cells(r), taus_text(r),
                     paper_text(r["label"])] for r in t4], "llrrrrrrll")
    lines += ["", "## Control experiments (Section 4.3)", "",
              "Is CBD's gain only more training? Standard-Instance trained for twice the student's epochs, and "
              "cRT trained for as many epochs as the student (not 10). The upper bound: a feature extractor "
              "trained on the source's whole balanced training set (one run, seed 0), frozen, with a cRT "
              "classifier trained class-balanced on the long-tailed set (its seeds are the classifier's).", ""]
    rows = [[r["label"], settings(setsc[r["label"]], wd.root), *metric_cells(r),
             paper_text(r["label"])] for r in ctl]
    if upper_bound_sets(cfg, wd.root) is None:
        rows.append(["Upper bound", f"not run: `{cfg.data.format}` with data.profile={cfg.data.profile} has no full "
                     "balanced training set here", *["–"] * 6, str(PAPER_CONTROLS["Upper bound"])])
    for label in ("Standard-Instance", "cRT", "CBD", "CBD_ENS"):
        r = _row(t4, label)
        rows.append([f"{label} (for reference)", "as in Table 4", *metric_cells(r), paper_text(label)])
    lines += table(["method", "student settings", "top-1", "many", "medium", "few", "ECE", "seeds",
                    "paper ImageNet-LT all"], rows, "llrrrrrrl")
    if _row(ctl, UPPER_EXTRACTOR):
        lines += ["", f"'{UPPER_EXTRACTOR}' is the extractor with its own classifier, trained on the balanced "
                  "set: evaluated on the same test set (shot groups of the long-tailed set), not a row of the paper's."]
    plots = {k: out / f"{name}_{k}.png" for k in ("reliability", "fig1", "fig4")}
    reliability = []
    for label in FIGURE_MODELS:
        reps = [load_report(wd, r) for r in runs.get("table2", []) if r.label == label]
        bins = [rep["calibration"] for rep in reps if rep and "calibration" in rep]
        if bins:
            reliability.append((f"{label} ({len(bins)} seeds pooled)" if len(bins) > 1 else f"{label} (1 seed)",
                                pool(bins)))
    lines += ["", "## Calibration", "", f"ECE of every model is in the tables above (and in each run's eval.json, "
              "beside per_class.csv and reliability.png). Reliability of Standard-Instance and CBD_ENS on "
              f"{manifest.eval_split}, the bins of their seeds pooled:", ""]
    if reliability:
        plot_reliability(reliability, plots["reliability"])
        lines.append(f"![reliability]({plots['reliability'].name})")
    else:
        lines.append("(not drawn yet: no finished run)")
    why_not = draw_figures(wd, manifest, runs, cfg.pipeline.seed, plots["fig1"], plots["fig4"])
    lines += ["", "## Figures 1 and 4: Instance vs CBD_ENS features", "",
              "From the features NCM's pass computed (seed 0 of each): Figure 1, the training class counts and a PCA "
              "of the val features of the 3 largest and 3 smallest classes; Figure 4, 8 test images drawn at random "
              "(seeded; 4 from few-shot classes) with their 5 nearest training images, compared as NCM compares "
              "features, framed green when of the test image's class and red when not.", ""]
    lines += [why_not] if why_not else [f"![figure 1]({plots['fig1'].name})", "", f"![figure 4]({plots['fig4'].name})"]
    lines += ["", "## Model selection", "",
              f"Anything chosen is chosen on the val split: {val}. That is tau (τ-norm, Logit Adjustment) here; every "
              "model is the one after its last epoch (no checkpoint is picked), and no setting is picked on "
              f"{manifest.eval_split}, which is read only to report."]
    return lines


def summary_lines(summary: dict[str, list[dict]], ncm: list[dict], check_lines: list[str]) -> list[str]:
    """The table the README shows, from the runs, and the claims that hold and do not."""
    rows = []
    for section, label in SUMMARY_ROWS:
        r = _row(summary.get(section, []), label)
        if r is None:
            continue
        n = _row(ncm, label)
        rows.append([label, *(pm(r[m]) if m == "top1" else ("–" if r[m]["mean"] is None else f"{r[m]['mean']:.1f}")
                              for m in (*METRICS, "ece")),
                     pm(n["top1"]) if n else "–", paper_text(label, table2_first=True)])
    return (["## Summary and checks (the README's results table)", ""]
            + table(["method", "top-1", "many", "medium", "few", "ECE", "NCM top-1", "paper ImageNet-LT top-1"],
                    rows, "lrrrrrrl") + ["", "What holds here and what does not:", ""] + check_lines)
