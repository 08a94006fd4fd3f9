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


def report() -> None:
    md_path, out = RESULTS / "when_cbd_pays.md", {}
    head = md_path.read_text().split(MARKER)[0].rstrip() if md_path.is_file() else "# When does CBD pay?"
    parts = [head, "", MARKER, ""]
    for key, title in (("convergence", "1. Convergence (glyphs_lt, ResNet-8)"),
                       ("fashion-convergence", "Fashion-MNIST-LT convergence")):
        step = steps()[key]
        if (table := read_table(step)) is not None:
            parts += [f"## {title}", "", convergence_md(table, step), ""]
            out[key] = {"table": table, "converged_epochs": converged_epochs(table)}
    md_path.write_text("\n".join(parts).rstrip() + "\n")
    (RESULTS / "when_cbd_pays.json").write_text(json.dumps(out, indent=1))
    print(md_path.read_text())


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
