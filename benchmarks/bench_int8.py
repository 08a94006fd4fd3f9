"""int8 against float16 on the embedded default: bytes on disk, cosine to the float32 descriptor, and the
student's top-1 over seeds.

One set of trained teachers (`--teachers-from W`: copy W/data and W/teachers, e.g. a finished
`make demo` workdir; otherwise `cbd-cache prepare` and `train-teacher` train them here) is exported
three times through the CLI, with export.dtype = float32, float16 and int8, into sibling workdirs.
Cosines compare every (image, view, teacher) descriptor of the float16 and int8 caches with the
float32 one, as stored (dequantised in float32) and as `CacheReader` serves it (float16). Students
(`cbd-cache train-student --set student.seed=S`) train on the float16 and on the int8 cache; their
test top-1 is read from eval.json. Every step skips what is already done, so a killed run resumes.

    .venv/bin/python benchmarks/bench_int8.py --teachers-from runs/fashion_mnist_lt --seeds 0 1 2

Writes results/int8.{md,json}. Run it on a quiet machine (here: under flock /tmp/cbd-cpu.lock).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr
from common import ROOT, write_results

from cbd_cache.cache.codec import dequantize_int8
from cbd_cache.cache.info import cache_info
from cbd_cache.cache.reader import CacheReader
from cbd_cache.data.manifest import Manifest
from cbd_cache.system.logs import log
from cbd_cache.system.storage import read_json
from cbd_cache.workdir import Workdir

DTYPES = ("float32", "float16", "int8")
CLI = [sys.executable, "-m", "cli"]


def cli(*args: str) -> None:
    log("$ cbd-cache " + " ".join(args))
    subprocess.run([*CLI, *args], cwd=ROOT, check=True)


def base_workdir(root: Path, teachers_from: Path | None) -> Workdir:
    base = Workdir(root / "base")
    if teachers_from and not base.manifest.is_file():
        for sub in ("data", "teachers"):
            shutil.copytree(teachers_from / sub, base.root / sub, dirs_exist_ok=True)
    cli("prepare", "--workdir", str(base.root.resolve()))
    cli("train-teacher", "--workdir", str(base.root.resolve()))
    return base


def dtype_workdir(root: Path, base: Workdir, dtype: str) -> Workdir:
    wd = Workdir(root / dtype)
    wd.root.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "teachers"):
        if not (wd.root / sub).exists():
            (wd.root / sub).symlink_to((base.root / sub).resolve())
    cli("export", "--workdir", str(wd.root.resolve()), "--set", f"export.dtype={dtype}")
    return wd


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def compare(wds: dict[str, Workdir]) -> dict:
    """Cosine of every float16 / int8 descriptor to the float32 one, and bytes per (image . view . teacher)."""
    manifest = Manifest.load(wds["float32"].manifest)
    ref_group = zarr.open_group(str(wds["float32"].cache), mode="r")
    teachers = sorted(cache_info(wds["float32"].cache)["teachers"])
    out: dict = {"teachers": teachers, "rows": manifest.train.num_samples}
    for dtype in ("float16", "int8"):
        group = zarr.open_group(str(wds[dtype].cache), mode="r")
        reader = CacheReader(wds[dtype].cache, manifest, teachers)
        stored, served = [], []
        for t in teachers:
            ref = ref_group[f"teachers/{t}/descriptors"][:]
            raw = group[f"teachers/{t}/descriptors"][:]
            if dtype == "int8":
                raw = dequantize_int8(raw, group[f"teachers/{t}/scales"][:])
            stored.append(cosines(raw, ref).ravel())
            served.append(cosines(reader.descriptors(t, 0, manifest.train.num_samples), ref).ravel())
        stored, served = np.concatenate(stored), np.concatenate(served)
        out[dtype] = {"cos_mean": float(stored.mean()), "cos_min": float(stored.min()),
                      "served_cos_mean": float(served.mean()), "served_cos_min": float(served.min()),
                      "vectors": int(stored.size)}
    for dtype in DTYPES:
        info = cache_info(wds[dtype].cache)
        per = info["views_stored"] * len(info["teachers"])
        desc = sum(v["bytes_stored"] for n, v in info["arrays"].items() if n.endswith(("/descriptors", "/scales")))
        out.setdefault(dtype, {}).update(descriptor_bytes=desc, total_bytes=info["bytes_on_disk"],
                                         descriptor_bytes_per_ivt=desc / per, total_bytes_per_ivt=info["bytes_on_disk"] / per)
    for dtype in DTYPES:
        out[dtype]["descriptor_vs_float16"] = out[dtype]["descriptor_bytes"] / out["float16"]["descriptor_bytes"]
        out[dtype]["total_vs_float16"] = out[dtype]["total_bytes"] / out["float16"]["total_bytes"]
    return out


def students(wds: dict[str, Workdir], seeds: list[int]) -> dict:
    out = {}
    for dtype in ("float16", "int8"):
        runs = []
        for seed in seeds:
            cli("train-student", "--workdir", str(wds[dtype].root.resolve()), "--set", f"student.seed={seed}")
            folder = wds[dtype].student_dir(f"student_seed={seed}")
            report, run = read_json(folder / "eval.json"), read_json(folder / "run.json")
            runs.append({"seed": seed, "top1": report["top1"], "many": report["many"], "medium": report["medium"],
                         "few": report["few"], "train_wall_s": run["train_wall_s"]})
        top1 = np.array([r["top1"] for r in runs])
        out[dtype] = {"runs": runs, "top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=1)) if len(runs) > 1
                      else 0.0, "top1_min": float(top1.min()), "top1_max": float(top1.max())}
    f16, i8 = out["float16"], out["int8"]
    out["int8_within_float16_range"] = f16["top1_min"] <= i8["top1_mean"] <= f16["top1_max"]
    out["mean_diff"] = i8["top1_mean"] - f16["top1_mean"]
    return out


def markdown(res: dict) -> str:
    q = res["quality"]
    lines = ["# int8 cache against float16 (embedded default: Fashion-MNIST-LT, 4 ResNet-8 teachers, A = 8, d = 64)",
             "", "{head}",
             f"{q['rows']} images x 8 views x {len(q['teachers'])} teachers = {q['float16']['vectors']:,} descriptors. "
             "Cosine to the float32 export of the same teachers: as stored, and as `CacheReader` serves it (float16).",
             "", "| export.dtype | descriptor bytes | ÷ float16 | bytes / (image·view·teacher) | cache total ÷ float16 | "
             "mean cos | min cos | served mean cos | served min cos |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in DTYPES:
        r = q[dtype]
        cos = (f"{r['cos_mean']:.6f} | {r['cos_min']:.6f} | {r['served_cos_mean']:.6f} | {r['served_cos_min']:.6f}"
               if "cos_mean" in r else "1 | 1 | 1 | 1")
        lines.append(f"| {dtype} | {r['descriptor_bytes']:,} | {r['descriptor_vs_float16']:.4f} | "
                     f"{r['descriptor_bytes_per_ivt']:.2f} | {r['total_vs_float16']:.4f} | {cos} |")
    if "students" in res:
        s = res["students"]
        lines += ["", "Student (CBD, K = 4, class-balanced, the embedded default's recipe), test top-1 (%):", "",
                  "| cache | " + " | ".join(f"seed {r['seed']}" for r in s["float16"]["runs"]) +
                  " | mean ± std | many / medium / few (mean) |",
                  "|---|" + "---:|" * len(s["float16"]["runs"]) + "---:|---|"]
        for dtype in ("float16", "int8"):
            d = s[dtype]
            groups = " / ".join(f"{np.mean([r[g] for r in d['runs']]):.1f}" for g in ("many", "medium", "few"))
            lines.append(f"| {dtype} | " + " | ".join(f"{r['top1']:.2f}" for r in d["runs"]) +
                         f" | {d['top1_mean']:.2f} ± {d['top1_std']:.2f} | {groups} |")
        lines += ["", f"int8 − float16 mean top-1: {s['mean_diff']:+.2f} points; int8 mean within the float16 seeds' "
                      f"range [{s['float16']['top1_min']:.2f}, {s['float16']['top1_max']:.2f}]: "
                      f"{'yes' if s['int8_within_float16_range'] else 'no'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/int8")
    ap.add_argument("--teachers-from", type=Path, help="a workdir whose data/ and teachers/ to copy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-students", action="store_true", help="bytes and cosines only")
    a = ap.parse_args()
    root = Path(a.root)
    base = base_workdir(root, a.teachers_from)
    wds = {dtype: dtype_workdir(root, base, dtype) for dtype in DTYPES}
    res = {"quality": compare(wds)}
    if not a.no_students:
        res["students"] = students(wds, a.seeds)
    write_results("int8", res, markdown(res))
    print(markdown(res).replace("{head}", ""))


if __name__ == "__main__":
    main()
