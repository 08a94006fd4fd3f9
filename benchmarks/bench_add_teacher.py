"""Adding a teacher to a cache against exporting every teacher again, on the smoke pipeline.

Two teachers (std0, aug0) are exported; a third is then added to that cache with a plain `export`
(only it runs), and, side by side, all three are exported from scratch into an empty cache. The
third teacher is an imported torchvision ResNet-18 (random weights saved by this script, as
tests/test_imported.py makes one), and, for a third teacher that costs what the other two cost, a
third built-in ResNet-8. Teachers are untrained (a forward pass costs the same whatever the
weights). Each export is timed in-process (the `pipeline.export` call, no interpreter start-up);
the added group is checked bit for bit against the from-scratch export. What every export pays
whatever its teachers (decoding and replaying the views, writing) is timed too: an export of the
complete cache whose views alone are marked not done runs no teacher. Writes
results/bench_add_teacher.{md,json}.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import zarr
from common import ROOT, untrained_teachers, write_results

from cbd_cache import pipeline
from cbd_cache.config import load_config
from cbd_cache.data.prepare import prepare
from cbd_cache.stages.imported import import_teacher
from cbd_cache.system.runtime import make_runtime
from cbd_cache.workdir import Workdir

SMOKE = ROOT / "pipelines" / "smoke.toml"
THIRD = {"rn18": 'name = "rn18"\nsource = "imported"\narch = "resnet18"\n'
                 'mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n',
         "std1": 'name = "std1"\ntype = "standard"\nseed = 3\n'}


def array_hashes(path: Path) -> dict[str, str]:
    out = {}

    def walk(group, prefix):
        for name, arr in group.arrays():
            data = np.ascontiguousarray(arr[:])
            out[prefix + name] = hashlib.sha256(f"{data.dtype}{data.shape}".encode() + data.tobytes()).hexdigest()
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")
    walk(zarr.open_group(str(path), mode="r"), "")
    return out


def timed_export(pipeline_file: Path, wd: Workdir, overrides: list[str], teachers: list[str] = ()) -> tuple[float, str]:
    """Seconds of one `pipeline.export` call, and its log."""
    cfg = load_config(pipeline_file, overrides)
    runtime = make_runtime(cfg.pipeline)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        start = time.perf_counter()
        pipeline.export(cfg, wd, runtime, teachers=list(teachers))
        seconds = time.perf_counter() - start
    return seconds, err.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_add_teacher.py", description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=16, help="export.views (A) of every export")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three exports per third teacher")
    parser.add_argument("--note", default="", help="a line about the conditions (e.g. a loaded machine)")
    args = parser.parse_args()
    overrides = [f"export.views={args.views}"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Workdir(Path(tmp) / "base")
        files = {}
        for name, entry in THIRD.items():
            files[name] = Path(tmp) / f"three_{name}.toml"
            files[name].write_text(SMOKE.read_text() + "\n[[teachers]]\n" + entry)
        cfg = load_config(files["std1"], overrides)
        prepare(cfg, base)
        untrained_teachers(cfg, base)                  # std0, aug0, std1: ResNet-8s at initialisation
        torch.manual_seed(0)
        source = Path(tmp) / "rn18.pth"
        torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), source)
        rn18 = load_config(files["rn18"], overrides)
        with contextlib.redirect_stderr(io.StringIO()):
            import_teacher(rn18, base, make_runtime(rn18.pipeline), "rn18", source)
        for name, pipeline_file in files.items():
            rows = []
            for r in range(args.rounds):
                parts, scratch = (Workdir(Path(tmp) / f"{name}_{r}_{k}") for k in ("parts", "scratch"))
                for wd in (parts, scratch):
                    shutil.copytree(base.root, wd.root, ignore=shutil.ignore_patterns("cache.zarr*"))
                two, _ = timed_export(pipeline_file, parts, overrides, ["std0", "aug0"])
                add, log = timed_export(pipeline_file, parts, overrides)
                assert f"running {name} (" in log and "std0, aug0 complete, not run" in log, log
                three, _ = timed_export(pipeline_file, scratch, overrides)
                same = array_hashes(parts.cache) == array_hashes(scratch.cache)
                zarr.open_group(str(scratch.cache), mode="r+")["views_done"][:] = 0
                replay, log = timed_export(pipeline_file, scratch, overrides)
                assert "writing the shared views only, no teacher runs" in log, log
                rows.append({"two": two, "add": add, "three": three, "replay": replay, "arrays_equal": same})
            med = {k: statistics.median(x[k] for x in rows) for k in ("two", "add", "three", "replay")}
            results.append({"third": name, "rounds": rows, "median": med, "add_over_three": med["add"] / med["three"],
                            "teacher_share": (med["add"] - med["replay"]) / (med["three"] - med["replay"]),
                            "arrays_equal": all(x["arrays_equal"] for x in rows)})
    lines = ["# Adding a teacher to a cache", "", "{head}" + (f"{args.note}\n\n" if args.note else ""),
             f"Smoke pipeline (227 training images, 8 shards), A = {args.views} views per image, untrained teachers; "
             f"median of {args.rounds} rounds, seconds of the `pipeline.export` call.", "",
             "| third teacher | export std0 + aug0 | add the third (only it runs) | all three from scratch | "
             "add / from scratch | views alone (no teacher) | teachers' part: (add − views) / (scratch − views) | "
             "added cache = from-scratch cache, array by array |", "|---|---|---|---|---|---|---|---|"]
    for x in results:
        m = x["median"]
        lines.append(f"| {x['third']} | {m['two']:.2f} | {m['add']:.2f} | {m['three']:.2f} | "
                     f"{x['add_over_three']:.2f} | {m['replay']:.2f} | {x['teacher_share']:.2f} | "
                     f"{'yes' if x['arrays_equal'] else 'NO'} |")
    lines += ["", "Every export also decodes and replays every image's views and writes them (the \"views alone\" "
              "column), whatever teachers it runs; an add pays that once more. The teachers' part of the time is "
              "what an add saves in proportion: one of three ResNet-8s is about a third of it here; the ResNet-18 "
              "costs more than the two ResNet-8s together."]
    write_results("bench_add_teacher", {"views": args.views, "rounds": args.rounds, "note": args.note,
                                        "results": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
