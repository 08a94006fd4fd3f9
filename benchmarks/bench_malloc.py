"""What `allocator.keep_freed_memory` saves: ResNet-50 inference at 224 px on CPU, in fresh processes,
under glibc's default allocator settings, under our earlier ones (mmap threshold at glibc's 32 MiB
ceiling, trim threshold 256 MiB: activations above 32 MiB were still mapped afresh every batch)
and under the current ones (no mapping, no trimming), alternating.

Each process builds an untrained torchvision ResNet-50 (the speed does not depend on the weights),
runs one warm-up batch and then --batches timed batches of random images, and reports wall
seconds, system seconds and minor page faults of the timed batches. Fresh processes, because
where a long-lived heap puts the next large block depends on everything allocated before it.

    .venv/bin/python benchmarks/bench_malloc.py                 # 3 rounds x 3 settings, batch 32

Writes results/bench_malloc.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import log, write_results

CHILD = """
import ctypes, json, resource, sys, time, torch, torchvision
from cbd_cache.allocator import keep_freed_memory
setting, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if setting == "keep_freed_memory":
    keep_freed_memory()
elif setting == "mmap_above_32mib":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 << 20)     # M_MMAP_THRESHOLD
    libc.mallopt(-1, 256 << 20)    # M_TRIM_THRESHOLD
net = torchvision.models.resnet50().eval()
x = torch.rand(batch, 3, 224, 224)
with torch.no_grad():
    net(x)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
        net(x)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "sys_s": after.ru_stime - before.ru_stime,
                  "page_faults": after.ru_minflt - before.ru_minflt, "max_rss_mib": after.ru_maxrss / 1024}))
"""
SETTINGS = ("glibc_default", "mmap_above_32mib", "keep_freed_memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for r in range(a.rounds):
        for setting in SETTINGS[::1 if r % 2 == 0 else -1]:     # ABC CBA: drift cancels
            out = subprocess.check_output([sys.executable, "-c", CHILD, setting, str(a.batch_size), str(a.batches)],
                                          text=True)
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            log(f"[malloc] round {r + 1}/{a.rounds} {setting}: {runs[setting][-1]}")
    med = {s: {k: statistics.median(run[k] for run in runs[s]) for k in runs[s][0]} for s in SETTINGS}
    ours = runs["keep_freed_memory"]
    speedup = {s: [o["wall_s"] / k["wall_s"] for o, k in zip(runs[s], ours)] for s in SETTINGS[:-1]}
    res = {"batch_size": a.batch_size, "batches": a.batches, "rounds": a.rounds, "runs": runs, "median": med,
           "speedup_per_round": speedup, "speedup": {s: statistics.median(v) for s, v in speedup.items()}}
    lines = ["# CPU allocator settings: ResNet-50 inference at 224 px", "", "{head}",
             f"Untrained torchvision ResNet-50, batch {a.batch_size}, {a.batches} timed batches after one warm-up, "
             "one fresh process per run, the settings in forward then reverse order, round by round. Medians over the rounds; "
             "keep_freed_memory's speedup = that setting's wall ÷ keep_freed_memory's, per round, median.", "",
             "| setting | wall (s) | system (s) | page faults | peak RSS (MiB) | keep_freed_memory's speedup (rounds) |",
             "|---|---:|---:|---:|---:|---|"]
    for s in SETTINGS:
        m = med[s]
        gain = (f"**{res['speedup'][s]:.3f}** ({', '.join(f'{v:.3f}' for v in speedup[s])})" if s in speedup else "")
        lines.append(f"| {s} | {m['wall_s']:.2f} | {m['sys_s']:.2f} | {m['page_faults']:,.0f} | {m['max_rss_mib']:,.0f} | {gain} |")
    lines.append("")
    write_results("bench_malloc", res, "\n".join(lines))
    print("\n".join(lines).replace("{head}", ""))


if __name__ == "__main__":
    main()
