"""Settle pipelines/glyphs_lt.toml on its baselines alone: Standard-Instance against Standard-Class-Bal.

For each candidate (a set of --set overrides on the pipeline), prepare its data and train both
cross-entropy baselines at equal epochs (`cbd-cache sweep`, --jobs 2, one thread each), then write
results/glyphs_lt_design.{md,json} from every candidate measured so far. No CBD run is involved:
the regime is chosen before distillation is tried.

    .venv/bin/python benchmarks/glyphs_design.py --candidates A,B --seeds 0
    .venv/bin/python benchmarks/glyphs_design.py --candidates A --seeds 0,1,2     # the chosen one, 3 seeds

The paper's regime (ImageNet-LT, ResNet-50): Standard-Instance 46.7 (many 66.6, few 13.0), and
Standard-Class-Bal below it (44.3). The criteria: Instance top-1 in 40..65, few-shot at least 30
points below many-shot, Class-Bal below Instance on the mean of 3 seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "pipelines/glyphs_lt.toml"
# The file's first draft, candidate A; every candidate's overrides apply on top of it. The file now holds C2.
DRAFT = ("data.image_px=16", "views.image_px=16", "data.distortion=1.0", "student.arch=resnet20")
CANDIDATES = {   # name -> overrides on the first draft (A)
    "A": (),
    "B": ("data.distortion=0.5",),
    "C": ("data.image_px=24", "views.image_px=24", "student.arch=resnet8"),
    "D": ("student.arch=resnet32",),
    "E": ("data.image_px=24", "views.image_px=24"),
    "F": ("data.distortion=0.75",),
    "G": ("data.distortion=0.75", "student.arch=resnet32"),
    "H": ("data.distortion=0.6",),
    "I": ("data.distortion=0.75", "student.weight_decay=1e-4"),
    "J": ("data.distortion=0.85",),
    "L": ("data.distortion=0.75", "views.scale=[0.9,1.0]"),                     # less crop: easier to memorise
    "M": ("data.distortion=0.75", "views.scale=[0.9,1.0]", "student.weight_decay=1e-4"),
    # ImageNet-LT's groups are 38 / 48 / 14 % many / medium / few; 150 -> 1 over 200 classes gives 8 / 32 / 60,
    # and Class-Bal wins on few-shot. 400 -> 4 gives 30 / 35 / 35, at a ResNet-8 to stay in the time budget.
    "N": ("data.n_max=400", "data.imbalance_factor=100", "data.distortion=0.75", "student.arch=resnet8"),
    "O": ("data.n_max=400", "data.imbalance_factor=100", "data.distortion=1.0", "student.arch=resnet8"),
    # ImageNet-LT's shares of many / medium / few classes (39 / 48 / 14 %): its "All" is mostly head and body,
    # where every exponential cut above is mostly few-shot classes. 150 -> 1 (IF 100): 14,431 images.
    "P": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "student.arch=resnet8"),
    "Q": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "data.distortion=0.75",
          "student.arch=resnet8"),
    # P, and: a deeper network (ResNet-20), a heavier head (150 -> 400), twice the epochs
    "R": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "student.arch=resnet20"),
    "S": ("data.profile=imagenet_lt_shape", "data.n_max=400", "data.imbalance_factor=100", "student.arch=resnet8"),
    "T": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "student.arch=resnet8",
          "student.epochs=40"),
    # P, with more room to memorise the tail at the same data (ResNet-14: 1.7x ResNet-8's step time)
    "X": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "student.arch=resnet14"),
    # the file's exponential cut (N = 5,898, the budget's size) at ResNet-8: C's 24 px and 16 px, easier glyphs
    "C2": ("data.image_px=24", "views.image_px=24", "student.arch=resnet8", "data.distortion=0.85"),
    "C3": ("student.arch=resnet8", "data.distortion=0.85"),
    "C2x2": ("data.image_px=24", "views.image_px=24", "student.arch=resnet8", "data.distortion=0.85",
             "student.epochs=40"),   # C2 at twice the epochs: is Class-Bal's deficit only a short schedule?
    # P, harder glyphs
    "U": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "student.arch=resnet8",
          "data.distortion=1.25"),
    "V": ("data.profile=imagenet_lt_shape", "data.n_max=150", "data.imbalance_factor=100", "student.arch=resnet8",
          "data.distortion=1.5"),
}
BASELINES = "student.sampling=instance,class_balanced"


CHOICE = """## The choice: C2, now `pipelines/glyphs_lt.toml`

**C2** (200 classes, the exponential cut 150 -> 1, IF 150; 24 px; distortion 0.85; ResNet-8; 20 epochs) is the
one candidate that meets every criterion on the mean of 3 seeds: Standard-Instance 51.8 (40..65), few-shot
59.7 points below many-shot, Standard-Class-Bal below it (49.6 against 51.8). It was chosen on these
baselines alone, before any CBD run. What the search says, plainly:

- **The margin is small against the seed spread.** Per seed, Instance 47.1 / 54.8 / 53.4 and Class-Bal
  41.1 / 51.7 / 56.1: seed 2 goes the other way. Class-Bal's std (7.7, many-shot 11.0) is twice Instance's.
- **It is a short-schedule regime, not the paper's memorisation regime.** At twice the epochs (C2x2, 1 seed)
  Instance gains 14 points (61.1) and Class-Bal nearly catches up (60.5): much of Class-Bal's deficit at 20
  epochs is its slower convergence when 200 classes share the draws, which costs it the head (many-shot
  69.8 against 90.3), not overfitting of the tail. A ResNet-8 at 24 px cannot memorise the tail; the paper's
  premise rests on a ResNet-50 that can.
- **Where the models are better trained, Class-Bal wins.** With ImageNet-LT's shares of many / medium /
  few-shot classes (`data.profile = imagenet_lt_shape`, P to X: 14,431 images), Class-Bal beat Instance in
  every variant, by 0.8 to 3.1 points: harder glyphs (U, V), a heavier head (S), ResNet-14 / ResNet-20 (X, R);
  twice the epochs (T) halved the gap (+3.1 -> +1.1) as Class-Bal began to overfit its few-shot classes
  (35.4 -> 34.0). Extrapolated, the premise would hold there at about 3x the epochs, which no configuration
  of that size can afford: the whole paper table (108 student runs) must fit 3 hours on 2 cores, about
  100k-150k samples per run at ResNet-8, and P alone is 289k.
- On every exponential cut (A to O), 60 % of the classes are few-shot, so "All" is mostly few-shot accuracy,
  where Class-Bal wins by 6 to 17 points; it lost only where training was short for the data (A, C, D).

So this benchmark shows the premise at the recipe's 20 epochs and over 3 seeds, for a reason that is partly
the short schedule; `results/glyphs_lt.md` is read with that in mind (its control rows train the baselines
longer)."""


def run_candidate(name: str, seeds: str, workdir: Path) -> dict:
    sets = [x for o in ("student.targets=none", *DRAFT, *CANDIDATES[name]) for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cbd = [sys.executable, "-m", "cli"]
    wd = workdir / name
    t0 = time.perf_counter()
    subprocess.run([*cbd, "prepare", "--pipeline", PIPELINE, "--workdir", str(wd), *sets], cwd=ROOT, env=env,
                   check=True)
    subprocess.run([*cbd, "sweep", "--pipeline", PIPELINE, "--workdir", str(wd), *sets, "--grid", BASELINES,
                    "--seeds", seeds, "--jobs", "2", "--name", "baselines"], cwd=ROOT, env=env, check=True)
    table = json.loads((wd / "sweeps" / "baselines.json").read_text())
    manifest = json.loads((wd / "data" / "manifest.json").read_text())
    return {"overrides": list(CANDIDATES[name]), "wall_s": time.perf_counter() - t0, "rows": table["rows"],
            "command": table["command"], "train_images": manifest["splits"]["train"]["num_samples"]}


def verdict(rows: dict) -> list[str]:
    inst, cb = rows["sampling=instance"], rows["sampling=class_balanced"]
    top1 = inst["top1"]["mean"]
    gap = inst["many"]["mean"] - inst["few"]["mean"] if inst["many"]["mean"] is not None else None
    n = min(inst["top1"]["n"], cb["top1"]["n"])
    return [f"Instance top-1 in 40..65: {'yes' if 40 <= top1 <= 65 else 'no'} ({top1:.1f})",
            f"few-shot >= 30 below many-shot: {'yes' if gap is not None and gap >= 30 else 'no'} "
            f"({'-' if gap is None else f'{gap:.1f}'})",
            f"Class-Bal below Instance: {'yes' if cb['top1']['mean'] < top1 else 'no'} "
            f"({cb['top1']['mean']:.1f} vs {top1:.1f}, {n} seed{'s' if n > 1 else ''}"
            f"{'' if n >= 3 else '; needs 3 seeds to count'})"]


def cell(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["n"] > 1 else "")


def write(results: dict, out: Path) -> None:
    (out / "glyphs_lt_design.json").write_text(json.dumps(results, indent=1))
    lines = ["# glyphs_lt: settling the benchmark on its baselines", "",
             f"Each candidate is `{PIPELINE}`'s first draft (A: {', '.join(f'`{o}`' for o in DRAFT)} on the file "
             "as it now stands) with the overrides shown; both baselines are cross-entropy students "
             "(`student.targets=none`) at the pipeline's epochs, trained two at a time, one thread each, on a "
             "2-core CPU. Top-1 on the balanced test split (50 per class), many / medium / few-shot; mean ± "
             "sample std over the seeds shown; wall: prepare and both baselines, on a machine shared with other work (not a speed measurement). Command: `.venv/bin/python benchmarks/glyphs_design.py "
             "--candidates <names> --seeds <seeds>`.", "",
             "| candidate | overrides | train images | baseline | top-1 | many | medium | few | seeds | wall |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows = {row["label"]: row for row in r["rows"]}
        for label, row in rows.items():
            lines.append(f"| {name} | {' '.join(f'`{o}`' for o in r['overrides']) or '(the first draft)'} | "
                         f"{r['train_images']:,} | {label} | {cell(row['top1'])} | {cell(row['many'])} | "
                         f"{cell(row['medium'])} | {cell(row['few'])} | {row['top1']['n']} | {r['wall_s'] / 60:.0f} min |")
    lines += ["", CHOICE, "", "## Criteria, per candidate", ""]
    for name, r in results.items():
        lines.append(f"- **{name}**: " + "; ".join(verdict({row["label"]: row for row in r["rows"]})))
    (out / "glyphs_lt_design.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", default="A")
    p.add_argument("--seeds", default="0")
    p.add_argument("--workdir", default="runs/glyphs_design")
    p.add_argument("--out", default="results")
    a = p.parse_args()
    out = ROOT / a.out
    path = out / "glyphs_lt_design.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in a.candidates.split(","):
        results[name] = run_candidate(name, a.seeds, ROOT / a.workdir)
        write(results, out)
        print(Path(out / "glyphs_lt_design.md").read_text())


if __name__ == "__main__":
    main()
