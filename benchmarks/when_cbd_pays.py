"""When does CBD pay? (issue 36): the grids of results/when_cbd_pays.md, run in chunks, and its report.

    .venv/bin/python benchmarks/when_cbd_pays.py run convergence --jobs 2 --time-limit-min 110
    .venv/bin/python benchmarks/when_cbd_pays.py report

Each step is one `cbd-cache grid` call (OMP_NUM_THREADS=1 a process) into its workdir; it resumes where it
stopped and a finished step trains nothing. The map's schedules and its deeper capacity follow from the
convergence table and the cost model, by the rule the plan wrote down before any map cell ran
(`map_axes`). The report keeps results/when_cbd_pays.md's hand-written plan (everything above MARKER)
and writes the rest, and results/when_cbd_pays.json, from the grids' tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("CBD_RESULTS", ROOT / "results"))
MARKER = "<!-- Everything below is written by benchmarks/when_cbd_pays.py report from the grids' tables. -->"
SCHEDULE = "teacher.epochs+student.epochs"
CAPACITY = "teacher.arch+student.arch"
BASELINES = "Standard-Instance,Standard-Class-Bal"
MAP_ROWS = "Standard-Instance,Standard-Class-Bal,cRT,Logit Adjustment,CBD,CBD_ENS"
ONLINE, ONLINE_ROWS = "CBD_ENS online", ("CBD_ENS", "CBD_ENS online", "CBD_ENS A=16")
CACHE_GAP = 0.5               # the cache "falls behind" online by more than this many points of top-1
CONVERGED_GAIN = 1.0          # converged: doubling the schedule gains under 1 point of top-1 on both baselines
BUDGET_S = 8 * 3600 * 2       # 8 hours of wall on 2 cores, in process-seconds
# The plan's cost model (process-seconds; results/when_cbd_pays.md): a map cell of 8 full-schedule runs at E epochs.
CELL_FIXED_S, EPOCH_S = 660, {"resnet8": 36, "resnet14": 60, "resnet20": 92}
FIXED_STEPS_S = 10_050 + 4_260 + 10_840      # convergence, cache against online, Fashion-MNIST-LT (the plan's table)


@dataclass(frozen=True)
class Step:
    pipeline: str
    workdir: str
    name: str
    axes: tuple[str, ...]
    replicates: str
    rows: str


def converged_epochs(table: dict) -> int | None:
    """E*: the first schedule whose doubling gains under CONVERGED_GAIN on both baselines (None: not yet known)."""
    rows = convergence_rows(table)
    for row in rows:
        if row["gain"] is not None and all(g is not None and g < CONVERGED_GAIN for g in row["gain"].values()):
            return row["epochs"]
    return None


def map_schedules(e_star: int) -> dict[str, tuple[int, ...]]:
    """The map's schedules per capacity, by the plan's rule: {20, 40, E*} (E* <= 40: {20, 40, 80}) for ResNet-8 and
    for the deeper net; the deeper net is ResNet-20 if the whole study then fits the budget, else ResNet-14, and
    if even that does not fit, ResNet-14's longest point is 80 epochs."""
    top = max(e_star, 80)

    def cost(arch: str, schedules: tuple[int, ...]) -> float:
        return 2 * sum(CELL_FIXED_S + EPOCH_S[arch] * e for e in schedules)
    full = (20, 40, top)
    base = FIXED_STEPS_S + cost("resnet8", full)
    for arch in ("resnet20", "resnet14"):
        if base + cost(arch, full) <= BUDGET_S:
            return {"resnet8": full, arch: full}
    return {"resnet8": full, "resnet14": (20, 40, 80)}


def steps() -> dict[str, Step]:
    glyphs, fashion = "pipelines/glyphs_lt.toml", "pipelines/fashion_mnist_lt.toml"
    out = {"convergence": Step(glyphs, "runs/when_cbd_pays", "convergence", (f"{SCHEDULE}=20,40,80,160,320",),
                               "0,1,2", BASELINES),
           "fashion-convergence": Step(fashion, "runs/when_cbd_pays_fashion", "convergence",
                                       (f"{SCHEDULE}=20,40,80,160",), "0,1", BASELINES)}
    conv = read_table(out["convergence"])
    if conv is not None and (e_star := converged_epochs(conv)) is not None:
        for arch, schedules in map_schedules(e_star).items():
            out[f"map-{arch}"] = Step(glyphs, "runs/when_cbd_pays", f"map_{arch}",
                                      (f"{SCHEDULE}={','.join(map(str, schedules))}", f"{CAPACITY}={arch}"), "0,1",
                                      MAP_ROWS)
        longest = max(map_schedules(e_star)["resnet8"])
        out["online"] = Step(glyphs, "runs/when_cbd_pays", "online", (f"{SCHEDULE}={longest}",), "0,1",
                             online_rows(read_table(Step(glyphs, "runs/when_cbd_pays", "online", (), "", ""))))
    fconv = read_table(out["fashion-convergence"])
    if fconv is not None and (f_star := converged_epochs(fconv)) is not None:
        out["fashion-map"] = Step(fashion, "runs/when_cbd_pays_fashion", "map", (f"{SCHEDULE}={f_star}",), "0,1",
                                  MAP_ROWS)
    return out


def online_rows(table: dict | None) -> str:
    """The cache-against-online step's rows. A = 16 runs beside the online row from the start (on the core the
    single online run leaves idle); A = 32 joins only if A = 16 still falls more than CACHE_GAP behind online."""
    rows = [*ONLINE_ROWS]
    gap = view_budget_gaps(table).get(16) if table else None
    if gap is not None and gap > CACHE_GAP:
        rows.append("CBD_ENS A=32")
    return ",".join(rows)


def view_budget_gaps(table: dict) -> dict[int, float]:
    """Online minus cached CBD_ENS per view budget A (8: the pipeline's cache), mean over replicates where both
    finished; a budget missing from the table, or unfinished, is left out."""
    out = {}
    for c in table.get("cells", []):
        for label, a in (("CBD_ENS", 8), *((f"CBD_ENS A={n}", n) for n in (16, 32))):
            diffs = [x[ONLINE]["top1"] - x[label]["top1"] for x in c["replicates"].values()
                     if label in x and x[label].get("top1") is not None and x[ONLINE].get("top1") is not None]
            if diffs and len(diffs) == len(c["replicates"]):
                out[a] = sum(diffs) / len(diffs)
    return out


def read_table(step: Step) -> dict | None:
    path = ROOT / step.workdir / "grids" / f"{step.name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run(step: Step, jobs: int, time_limit_min: float) -> int:
    command = [sys.executable, "-m", "cli", "grid", "--pipeline", step.pipeline, "--workdir", step.workdir,
               *[x for a in step.axes for x in ("--axis", a)], "--replicates", step.replicates, "--rows", step.rows,
               "--name", step.name, "--jobs", str(jobs), "--time-limit-min", str(time_limit_min)]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def epochs_of(cell: dict) -> int:
    return int(cell["cell"].split(", ")[0].split("=", 1)[1])


def convergence_rows(table: dict) -> list[dict]:
    """Per schedule: both baselines' statistics, Class-Bal minus Instance per replicate, and the gain on doubling."""
    by_e = {epochs_of(c): c for c in table["cells"]}
    rows = []
    for e, c in sorted(by_e.items()):
        inst, cb = c["rows"]["Standard-Instance"], c["rows"]["Standard-Class-Bal"]
        diffs = [x["Standard-Class-Bal"]["top1"] - x["Standard-Instance"]["top1"] for x in c["replicates"].values()
                 if x["Standard-Class-Bal"].get("top1") is not None and x["Standard-Instance"].get("top1") is not None]
        nxt = by_e.get(2 * e)
        gain = None
        if nxt is not None:
            gain = {label: (nxt["rows"][label]["top1"]["mean"] - c["rows"][label]["top1"]["mean"]
                            if nxt["rows"][label]["top1"]["n"] == c["rows"][label]["top1"]["n"] == len(c["replicates"])
                            else None) for label in ("Standard-Instance", "Standard-Class-Bal")}
        rows.append({"epochs": e, "instance": inst, "class_bal": cb, "cb_minus_inst": diffs,
                     "cb_below": sum(d < 0 for d in diffs), "gain": gain})
    return rows


def pm(s: dict) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.1f} ± {s['std']:.1f}"


def convergence_md(table: dict, step: Step) -> str:
    rows = convergence_rows(table)
    lines = ["| epochs | Instance top-1 | Instance few | Class-Bal top-1 | Class-Bal few | Class-Bal minus Instance "
             "| Class-Bal below Instance | gain at 2x: Instance / Class-Bal | replicates |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["cb_minus_inst"]
        mean = f"{sum(d) / len(d):+.1f}" if d else "–"
        gain = "–" if not r["gain"] else " / ".join("–" if g is None else f"{g:+.1f}" for g in r["gain"].values())
        lines.append(f"| {r['epochs']} | {pm(r['instance']['top1'])} | {pm(r['instance']['few'])} | "
                     f"{pm(r['class_bal']['top1'])} | {pm(r['class_bal']['few'])} | {mean} | {r['cb_below']} of "
                     f"{len(d)} | {gain} | {r['instance']['top1']['n']} of {r['instance']['of']} |")
    e_star = converged_epochs(table)
    verdict = (f"**Converged at {e_star} epochs**: doubling it gains under {CONVERGED_GAIN:g} point on both."
               if e_star else "**Not converged yet** (or not every schedule finished): no schedule whose doubling "
                              f"gains under {CONVERGED_GAIN:g} point on both baselines.")
    per_rep = ["", "Per replicate (top-1, Instance / Class-Bal):", ""]
    for c in sorted(table["cells"], key=epochs_of):
        vals = [f"r{r}: {x['Standard-Instance'].get('top1') or 0:.1f} / {x['Standard-Class-Bal'].get('top1') or 0:.1f}"
                for r, x in c["replicates"].items() if x["Standard-Instance"].get("top1") is not None]
        per_rep.append(f"- {epochs_of(c)} epochs: {'; '.join(vals) or '–'}")
    return "\n".join([f"Grid `{step.workdir}/grids/{step.name}.json`; {table.get('timing_text', '')}", "",
                      "Top-1 on the balanced test split, mean ± std over replicates (each a fresh draw of the data); "
                      "few = few-shot classes (< 20 training images); the gain at 2x compares with the next row.",
                      "", *lines, "", verdict, *per_rep])


def arch_of(cell: dict) -> str:
    parts = dict(p.split("=", 1) for p in cell["cell"].split(", ") if "=" in p)
    return parts.get("arch", "resnet8")


def map_md(table: dict, step: Step) -> str:
    """Per cell, every row's top-1 (mean ± std over replicates) and CBD_ENS minus the best non-CBD row."""
    rows = table["rows"]
    head = ["schedule", "capacity", *rows, "best non-CBD", "CBD_ENS minus best", "CBD_ENS ahead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for c in sorted(table["cells"], key=lambda c: (arch_of(c), epochs_of(c))):
        pays = c["cbd_pays"] or {"best": None, "diff": {"mean": None}, "ahead": 0, "of": 0}
        lines.append(f"| {epochs_of(c)} | {arch_of(c)} | " + " | ".join(pm(c["rows"][r]["top1"]) for r in rows)
                     + f" | {pays['best'] or '–'} | {pm(pays['diff'])} | {pays['ahead']} of {pays['of']} |")
    few = ["", "Few-shot top-1 (classes with < 20 training images), mean ± std:", "",
           "| schedule | capacity | " + " | ".join(rows) + " |", "|---|---|" + "---:|" * len(rows)]
    for c in sorted(table["cells"], key=lambda c: (arch_of(c), epochs_of(c))):
        few.append(f"| {epochs_of(c)} | {arch_of(c)} | " + " | ".join(pm(c["rows"][r]["few"]) for r in rows) + " |")
    order = ["", "Orderings (top-1, high to low) and the replicates that show each:", ""]
    for c in sorted(table["cells"], key=lambda c: (arch_of(c), epochs_of(c))):
        for o in c["orderings"]:
            order.append(f"- {epochs_of(c)} epochs, {arch_of(c)}: {o['ordering']} ({o['replicates']})")
    return "\n".join([f"Grid `{step.workdir}/grids/{step.name}.json`; {table.get('timing_text', '')}", "",
                      "Top-1 on the balanced test split, mean ± std over replicates (fresh draws); the best non-CBD "
                      "row is the best by mean, and CBD_ENS minus it is taken per replicate.", "", *lines, *few,
                      *order])


def online_md(table: dict, step: Step) -> str:
    """Cached against online CBD_ENS per replicate, the gap per view budget, and the bytes of each cache."""
    c = table["cells"][0]
    labels = [r for r in table["rows"] if r.startswith("CBD_ENS")]
    lines = ["| replicate | " + " | ".join(labels) + " | cache bytes: A=8 | " +
             " | ".join(f"{lab[8:]}" for lab in labels if lab.startswith("CBD_ENS A=")) + " |",
             "|---:|" + "---:|" * (len(labels) + 1 + sum(lab.startswith("CBD_ENS A=") for lab in labels))]
    for r, x in sorted(c["replicates"].items()):
        rep = ROOT / step.workdir / "cells" / c["folder"] / f"rep{r}"
        sizes = [cache_bytes(rep / "cache.zarr")] + [cache_bytes(rep / f"cache_A{lab[10:]}.zarr")
                                                      for lab in labels if lab.startswith("CBD_ENS A=")]
        lines.append(f"| {r} | " + " | ".join("–" if x[lab].get("top1") is None else f"{x[lab]['top1']:.1f}"
                                               for lab in labels) + " | " + " | ".join(sizes) + " |")
    lines.append("| mean ± std | " + " | ".join(pm(c["rows"][lab]["top1"]) for lab in labels) + " | |"
                 + " |" * sum(lab.startswith("CBD_ENS A=") for lab in labels))
    gaps = view_budget_gaps(table)
    verdict = [f"- online minus cached at A = {a}: {g:+.2f} points" + (" (more than 0.5 behind)" if g > CACHE_GAP
                                                                         else "") for a, g in sorted(gaps.items())]
    return "\n".join([f"Grid `{step.workdir}/grids/{step.name}.json` ({c['cell']}, ResNet-8); "
                      f"{table.get('timing_text', '')}", "", *lines, "", *verdict])


def cache_bytes(path: Path) -> str:
    if not path.is_dir():
        return "–"
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{n / 2**20:.1f} MiB"


def rule_points(tables: dict[str, tuple[dict, dict | None]]) -> list[dict]:
    """Per (benchmark, cell, replicate) of a map: the two cheap signals and the outcome.

    ncm: NCM top-1 on Standard-Instance's features minus on Standard-Class-Bal's (candidate a).
    few_trend: Class-Bal's few-shot top-1 at this schedule minus at the next shorter one of the same capacity
    and replicate (candidate b; None at the shortest). outcome: CBD_ENS minus the cell's best non-CBD row."""
    out = []
    for bench, (table, conv) in tables.items():
        few: dict[tuple[str, int, str], float] = {}
        for t in (conv, table):
            for c in (t or {}).get("cells", []):
                for r, x in c["replicates"].items():
                    if x["Standard-Class-Bal"].get("few") is not None:
                        few[(arch_of(c), epochs_of(c), r)] = x["Standard-Class-Bal"]["few"]
        for c in table["cells"]:
            best = (c["cbd_pays"] or {}).get("best")
            for r, x in c["replicates"].items():
                inst, cb = x["Standard-Instance"], x["Standard-Class-Bal"]
                if best is None or x["CBD_ENS"].get("top1") is None or x[best].get("top1") is None \
                        or inst.get("ncm_top1") is None or cb.get("ncm_top1") is None:
                    continue
                arch, e = arch_of(c), epochs_of(c)
                shorter = [k[1] for k in few if k[0] == arch and k[2] == r and k[1] < e]
                trend = few[(arch, e, r)] - few[(arch, max(shorter), r)] if shorter and (arch, e, r) in few else None
                out.append({"benchmark": bench, "arch": arch, "epochs": e, "replicate": int(r),
                            "ncm": inst["ncm_top1"] - cb["ncm_top1"], "few_trend": trend,
                            "outcome": x["CBD_ENS"]["top1"] - x[best]["top1"]})
    return out


SIGNALS = {"ncm": ("NCM on Instance features minus NCM on Class-Bal features", 1),
           "few_trend": ("Class-Bal's few-shot change from the next shorter schedule", -1)}


def fit_rule(points: list[dict], signal: str) -> dict:
    """Fit one threshold t on the fitted points: predict "CBD_ENS pays" when sign * (signal - t) > 0 (sign: +1 for
    the NCM gap, -1 for the few-shot trend, the direction the candidate states). t maximises agreement with
    outcome > 0 (ties: the t nearest 0). Scored on the fitted and on the held-out points, beside the constant
    guess (always the fitted points' majority)."""
    sign = SIGNALS[signal][1]
    fit = [p for p in points if p["fit"] and p[signal] is not None]
    held = [p for p in points if not p["fit"] and p[signal] is not None]

    def agree(ps: list[dict], t: float) -> int:
        return sum((sign * (p[signal] - t) > 0) == (p["outcome"] > 0) for p in ps)
    if not fit:
        return {"signal": signal, "threshold": None, "fit": (0, 0), "held_out": (0, len(held)), "constant": None}
    xs = sorted(p[signal] for p in fit)
    candidates = [0.0, xs[0] - 1, xs[-1] + 1, *((a + b) / 2 for a, b in zip(xs, xs[1:]))]
    t = max(candidates, key=lambda t: (agree(fit, t), -abs(t)))
    majority = sum(p["outcome"] > 0 for p in fit) * 2 >= len(fit)
    return {"signal": signal, "threshold": t, "fit": (agree(fit, t), len(fit)),
            "held_out": (agree(held, t), len(held)), "majority_pays": majority,
            "constant": (sum((p["outcome"] > 0) == majority for p in held), len(held))}


def rule_md(points: list[dict]) -> str:
    if not points:
        return "No map cell has finished yet."
    lines = ["| signal | threshold (fitted) | agreement, fitted cells | agreement, held-out cells | constant guess, "
             "held out |", "|---|---:|---:|---:|---:|"]
    for signal, (text, sign) in SIGNALS.items():
        f = fit_rule(points, signal)
        t = "–" if f["threshold"] is None else f"{'>' if sign > 0 else '<'} {f['threshold']:+.2f}"
        const = "–" if f["constant"] is None else (f"{f['constant'][0]} of {f['constant'][1]} "
                                                   f"({'pays' if f['majority_pays'] else 'does not pay'})")
        lines.append(f"| {text} | {t} | {f['fit'][0]} of {f['fit'][1]} | {f['held_out'][0]} of {f['held_out'][1]} "
                     f"| {const} |")
    pts = ["", "Every point (a cell x replicate): signals and outcome (CBD_ENS minus the best non-CBD row), "
           "top-1 points:", "", "| benchmark | capacity | epochs | replicate | fitted | NCM gap | few-shot trend | "
           "outcome |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for p in points:
        trend = "–" if p["few_trend"] is None else f"{p['few_trend']:+.1f}"
        pts.append(f"| {p['benchmark']} | {p['arch']} | {p['epochs']} | {p['replicate']} | "
                   f"{'yes' if p['fit'] else 'no'} | {p['ncm']:+.1f} | {trend} | {p['outcome']:+.1f} |")
    return "\n".join([*lines, *pts])


def report() -> None:
    md_path, out = RESULTS / "when_cbd_pays.md", {}
    head = md_path.read_text().split(MARKER)[0].rstrip() if md_path.is_file() else "# When does CBD pay?"
    parts = [head, "", MARKER, ""]
    have = steps()
    tables = {key: t for key, step in have.items() if (t := read_table(step)) is not None}
    sections = [("convergence", "1. Convergence (glyphs_lt, ResNet-8)", convergence_md),
                *((k, f"2. The map: glyphs_lt, {k[4:]}", map_md) for k in have if k.startswith("map-")),
                ("online", "3. Cached against online CBD_ENS at the longest schedule", online_md),
                ("fashion-convergence", "4. Fashion-MNIST-LT convergence (ResNet-8)", convergence_md),
                ("fashion-map", "4. Fashion-MNIST-LT at its converged schedule", map_md)]
    for key, title, md in sections:
        if key in tables:
            parts += [f"## {title}", "", md(tables[key], have[key]), ""]
            out[key] = {"table": tables[key]}
            if md is convergence_md:
                out[key]["converged_epochs"] = converged_epochs(tables[key])
    maps = {f"glyphs_lt {k[4:]}": (t, tables.get("convergence")) for k, t in tables.items() if k.startswith("map-")}
    if "fashion-map" in tables:
        maps["fashion_mnist_lt resnet8"] = (tables["fashion-map"], tables.get("fashion-convergence"))
    if maps:
        points = [{**p, "fit": p["benchmark"] == "glyphs_lt resnet8"} for p in rule_points(maps)]
        parts += ["## 5. The rule: cheap signals against CBD_ENS's gain", "",
                  "Fitted on the ResNet-8 glyphs_lt cells; held out: every other capacity and benchmark. A signal "
                  "predicts \"CBD_ENS beats the best non-CBD row\" on its side of the threshold.", "",
                  rule_md(points), ""]
        out["rule"] = {"points": points, "fits": [fit_rule(points, s) for s in SIGNALS]}
        figure = combined_heatmap(tables, RESULTS / "when_cbd_pays.png")
        if figure is not None:
            parts += [f"![CBD_ENS minus the best non-CBD row]({figure.name})", ""]
    md_path.write_text("\n".join(parts).rstrip() + "\n")
    (RESULTS / "when_cbd_pays.json").write_text(json.dumps(out, indent=1))
    print(md_path.read_text())


def combined_heatmap(tables: dict[str, dict], path: Path) -> Path | None:
    """Both benchmarks on one figure: glyphs_lt's schedules as columns, capacities as rows, and
    Fashion-MNIST-LT at its converged schedule as one more column."""
    from cbd_cache.experiments.grid_plots import plot_cbd_pays
    entries = []
    for key, t in tables.items():
        if key.startswith("map-") or key == "fashion-map":
            bench = "fashion_mnist_lt" if key == "fashion-map" else "glyphs_lt"
            entries += [(arch_of(c), f"{bench}\n{epochs_of(c)} epochs", c["cbd_pays"]) for c in t["cells"]
                        if c.get("cbd_pays")]
    entries.sort(key=lambda e: (e[1].startswith("fashion"), int(e[1].split("\n")[1].split()[0])))
    return plot_cbd_pays(entries, path, "When does CBD pay? (2 fresh draws a cell)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run one step (a cbd-cache grid call), then the report")
    r.add_argument("step", help="convergence, fashion-convergence, or map-<arch> once convergence has named E*")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--time-limit-min", type=float, default=0)
    sub.add_parser("report", help="write results/when_cbd_pays.{md,json} from the grids so far")
    a = p.parse_args()
    code = 0
    if a.what == "run":
        if a.step not in steps():
            sys.exit(f"{a.step}: no such step yet (have {', '.join(steps())}); the map's steps wait for the "
                     "convergence table to name its converged schedule")
        code = run(steps()[a.step], a.jobs, a.time_limit_min)
    report()
    sys.exit(code)


if __name__ == "__main__":
    main()
