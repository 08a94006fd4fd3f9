"""The paper table's Markdown and JSON: every section's rows, the paper's numbers beside them, the checks."""
from __future__ import annotations

import contextlib
import shlex
import time
from pathlib import Path
from typing import Sequence

from cbd_cache.config import ALLOCATIONS, DISTILL, Config, load_config
from cbd_cache.data.longtail import SHOT_GROUPS, shot_group
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_labels
from cbd_cache.experiments.paper_checks import _row, checks
from cbd_cache.experiments.paper_comparison import comparison_lines, summary_lines
from cbd_cache.experiments.paper_design import (
    ALPHAS,
    HEADLINE_VIEWS,
    PAPER_NCM,
    PAPER_TABLE2,
    PER_CLASS,
    SEEDS,
    VIEWS,
    first_aug,
    sections,
    stage1,
    table2,
    teacher_mixes,
)
from cbd_cache.experiments.paper_plots import plot_alpha, plot_per_class, plot_views
from cbd_cache.experiments.sweep import METRICS, Run, seeds_text, summarise
from cbd_cache.system.logs import format_seconds, log
from cbd_cache.system.machine import code_commit, machine, machine_text
from cbd_cache.system.storage import read_json, write_json
from cbd_cache.system.tables import markdown_table, pm
from cbd_cache.tools.dryrun import projected_cache_bytes
from cbd_cache.workdir import Workdir


class Timing:
    """Wall seconds of every step that did work (max per step), and one record per invocation (a chunk: when, at
    which commit, on which machine, with which options, its wall), kept across chunked invocations."""

    def __init__(self, path: Path, chunk: dict | None = None):
        self.path = path
        data = read_json(path) if path.is_file() else {"steps": {}, "chunks": []}
        if "steps" not in data:   # written before chunks were recorded: its invocations are unknown
            data = {"steps": data, "chunks": [], "earlier_chunks_unrecorded": True}
        self.data, self.steps, self.chunks = data, data["steps"], data["chunks"]
        self.t0, self.chunk = time.time(), None
        if chunk is not None:
            self.chunk = {"started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": code_commit(),
                          "machine": machine_text(machine()), **chunk, "wall_s": 0.0}
            self.chunks.append(self.chunk)
            self.write()

    def record(self, step: str, seconds: float) -> None:
        self.steps[step] = max(self.steps.get(step, 0.0), round(seconds, 1))
        self.write()

    def write(self) -> None:
        """Save; this invocation's wall so far goes with it, so a chunk killed later keeps what it did."""
        if self.chunk is not None:
            self.chunk["wall_s"] = round(time.time() - self.t0, 1)
        write_json(self.path, self.data)

    @contextlib.contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        yield
        self.record(step, time.perf_counter() - t0)

    def total(self, prefix: str = "") -> float:
        return sum(v for k, v in self.steps.items() if k.startswith(prefix))

    def chunks_text(self) -> str:
        """'Ran on <machine> (cpu) in 2 invocations (<when, commit, options, wall>; ...): **1h49m01s wall** in all.'"""
        if not self.chunks:
            return "Its invocations were not recorded (a timing file from before they were)."
        where = {f"{c['machine']} ({c['device']})" for c in self.chunks}
        one = where.pop() if len(where) == 1 else None     # one machine: named once
        parts = [f"{c['started_utc']} UTC at commit `{c['commit']}`"
                 + ("" if one else f" on {c['machine']} ({c['device']})")
                 + f", `{c['options']}`: {format_seconds(c['wall_s'])}" for c in self.chunks]
        text = (f"Ran{f' on {one}' if one else ''} in {len(parts)} invocation{'s' if len(parts) > 1 else ''} "
                f"({'; '.join(parts)}): **{format_seconds(sum(c['wall_s'] for c in self.chunks))} wall** in all")
        return text + (", not counting the ones before invocations were recorded."
                       if self.data.get("earlier_chunks_unrecorded") else ".")


def write_paper_table(cfg: Config, base: Sequence[str], wd: Workdir, runs: dict[str, list[Run]], ncm: list[dict],
                      timing: Timing, out: Path, complete: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.pipeline.name
    base_cfg = load_config(cfg.source, base)
    summary = {k: summarise(rs, wd) for k, rs in runs.items()}
    manifest = Manifest.load(wd.manifest)
    counts = manifest.train.class_counts
    groups = [shot_group(n) for n in counts]
    plots = {"alpha": out / f"{name}_alpha.png", "views": out / f"{name}_views.png",
             "per_class": out / f"{name}_per_class.png"}
    plot_alpha(summary, plots["alpha"])
    cache_bytes = budget_bytes(cfg.source, base, manifest)
    plot_views(summary["views"], plots["views"])
    plot_per_class(summary["table2"], plots["per_class"])
    sets = " ".join(f"--set {shlex.quote(o)}" for o in base)
    base_overrides_added = [o for o in base if o.startswith("teachers.")]
    sweep = f"cbd-cache sweep --pipeline {shlex.quote(cfg.source)} --workdir {shlex.quote(str(wd.root))} {sets}"
    total = timing.total()
    check_lines = checks(summary, ncm, HEADLINE_VIEWS, cache_bytes)
    lines = [
        f"# The paper's protocol on {name}, {len(SEEDS)} seeds",
        "",
        f"Made by `make paper-table`, i.e. `cbd-cache paper-table --pipeline {shlex.quote(cfg.source)} "
        f"--workdir {shlex.quote(str(wd.root))} --out {shlex.quote(str(out))}`"
        f"{'' if complete else ' (**partial: not every run is finished yet**)'}. Each row below is "
        f"also `{sweep} <row's --set> --seeds {','.join(map(str, SEEDS))}`, which finds the same runs "
        "finished. Numbers are mean ± sample std over the seeds of top-1 and of the mean per-class accuracy of "
        "the many / medium / few-shot groups, on the balanced test set.",
        "",
        f"Data: {manifest.train.num_samples} training images in {len(counts)} classes, {max(counts)} down to "
        f"{min(counts)} per class ("
        + ", ".join(f"{groups.count(g)} {g}-shot" for g in SHOT_GROUPS)
        + f"), {manifest.splits[manifest.eval_split].num_samples} {manifest.eval_split} images; val: "
        f"{manifest.source.get('val', 'none')}. One export: {len(base_cfg.teachers)} teachers "
        f"x A = {base_cfg.export.views} views, with logits; A = {base_cfg.student.views} "
        f"(`student.views={base_cfg.student.views}`) everywhere else.",
        "",
        f"Work: **{format_seconds(total)}** (prepare + teachers + export "
        f"{format_seconds(timing.total('prepare') + timing.total('teacher') + timing.total('export'))}, "
        f"{sum(1 for k in timing.steps if k.startswith('student'))} student runs "
        f"{format_seconds(timing.total('student'))}, NCM {format_seconds(timing.total('ncm'))}), summed over "
        f"every step of every process (`{wd.root}/paper_table_timing.json`). {timing.chunks_text()}",
        "",
        *summary_lines(summary, ncm, check_lines),
        "",
        "## Table 2: long-tailed recognition",
        "",
    ]
    sets_of = dict(table2(base_cfg))
    rows = []
    for r in summary["table2"]:
        paper = PAPER_TABLE2.get(r["label"])
        ptxt = f"{paper[3]} ({paper[0]} / {paper[1]} / {paper[2]})" if paper else "–"
        settings = " ".join(f"`{s.split('.', 1)[1]}`" for s in sets_of[r["label"]]) or "(defaults)"
        rows.append([r["label"], settings, *(pm(r[m]) for m in (*METRICS, "ece")), seeds_text(r), ptxt])
    if first_aug(base_cfg) is None:
        rows.append(["Fine-tuning (data-aug), cRT (data-aug)", "not run: the pipeline has no data-aug teacher",
                     *["–"] * 7])
    lines += table(["method", "student settings", "top-1", "many", "medium", "few", "ECE", "seeds",
                    "paper ImageNet-LT all (many / med / few)"], rows, "llrrrrrrl")
    lines += ["", "## Table 3: NCM on each model's features", "",
              "Features centred on the training mean, L2-normalised; nearest class mean. `cbd-cache ncm "
              f"--workdir {wd.root} MODEL [--features cache]` computes one.", ""]
    lines += table(["features", "top-1", "many", "medium", "few", "models", "paper ImageNet-LT all"],
                   [[r["label"], *(pm(r[m]) for m in METRICS), seeds_text(r), PAPER_NCM.get(r["label"], "–")]
                    for r in ncm])
    lines += comparison_lines(base_cfg, wd, manifest, summary, runs, out, name)
    alpha_rows = summary["alpha"]
    lines += ["", f"## Figure 3: top-1 against alpha (teacher {stage1(base_cfg)}, K = 1)", "",
              f"![alpha]({plots['alpha'].name})", ""]
    lines += table(["distillation", *(f"alpha={a}" for a in ALPHAS)],
                   [[d, *(pm(_row(alpha_rows, f"{d}, alpha={a}")["top1"]) for a in ALPHAS)] for d in DISTILL])
    lines += ["", f"Logit distillation: T = {base_cfg.student.temperature}, the teachers' cached logits; "
              "hybrid adds both terms under one alpha (see `cbd_cache/losses.py`). alpha = 0 is cross-entropy "
              "only: the Standard-Class-Bal row of Table 2.",
              "", f"## Table 1: which teachers (CBD, cached, A = {base_cfg.student.views})", "",
              "The paper's rows: K = 1 (one standard / one data-aug), K = 2 (two standard / two data-aug / one of "
              "each), K = 3 (one standard + two data-aug), K = 4 (two + two), K = 5 (two standard + three data-aug)."
              + (f" The fifth teacher is trained for this table only (`--set {base_overrides_added[0]}`) and added "
                 "to the one cache as a group of its own (`export --teachers`: the others are not run again)."
                 if base_overrides_added else ""), ""]
    mix_sets = dict(next(s for s in sections(base_cfg, wd.root) if s.key == "mix").points)
    std_n = sum(t.type == "standard" for t in base_cfg.teachers)
    rows = []
    for m in teacher_mixes(base_cfg):
        k = m.standard + m.data_aug
        r = _row(summary["mix"], m.label) if m.teachers else None
        if r is None:
            rows.append([k, m.composition, "–", f"not run: the pipeline has {std_n} standard and "
                         f"{len(base_cfg.teachers) - std_n} data-aug teachers", *["–"] * 5])
            continue
        settings = " ".join(f"`{x.split('.', 1)[1]}`" for x in mix_sets[m.label]) or "(defaults)"
        rows.append([k, m.composition, m.label, settings, *(pm(r[x]) for x in METRICS), seeds_text(r)])
    lines += table(["K", "mix", "teachers", "student settings", "top-1", "many", "medium", "few", "seeds"], rows,
                   "rlllrrrrr")
    lines += ["", f"## The view budget: where cached views go (CBD_ENS, K = {len(base_cfg.student_teachers())})", "",
              "uniform: every image gets A views. draws: image i gets max(1, round(A * r_c(i))) views, r_c its "
              "class's class-balanced repeat factor, i.e. views where the student's draws are, for the same "
              "budget of about N * A views (`export.allocation`). Each allocation's rows are one A = 16 export "
              "read at `student.views=A` (a prefix of each image's views, exactly what an A export holds); the "
              "bytes are those of an A export of that allocation (float16, no logits), from the cache schema's "
              "layout, chunk padding included. 'teachers on the stored views' (`student.targets=replay`) runs "
              "the teachers on the cache's views instead of reading their targets: it tests the cache's fidelity.",
              "", f"![views]({plots['views'].name})", ""]
    rows = []
    for r in summary["views"]:
        alloc, _, rest = r["label"].partition(" A=")
        a = rest.split(",")[0] if rest else "–"
        if r["label"] == "online":
            alloc = "online (teachers every step, fresh views)"
        elif "teachers on" in r["label"]:
            alloc += ", teachers on the stored views"
        mib = f"{cache_bytes[r['label']] / 2**20:.2f}" if r["label"] in cache_bytes else "–"
        rows.append([alloc, a, *(pm2(r[m]) for m in METRICS), mib, seeds_text(r)])
    lines += table(["allocation", "A", "top-1", "many", "medium", "few", "cache MiB", "seeds"], rows)
    lines += ["", "## Per class: accuracy against training images", "", f"![per class]({plots['per_class'].name})", ""]
    per = {m: _row(summary["table2"], m) for m in PER_CLASS}
    lines += table(["class", "train images", *PER_CLASS],
                   [[manifest.class_names[c], counts[c],
                     *(f"{per[m]['per_class'][c]:.1f}" if per[m] and per[m]["per_class"] else "–" for m in PER_CLASS)]
                    for c in sorted(range(len(counts)), key=lambda c: -counts[c])])
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    write_json(out / f"{name}.json", {"complete": complete, "base_overrides": list(base), "seeds": list(SEEDS),
                                      "sections": summary, "ncm": ncm, "timing_s": timing.steps,
                                      "invocations": timing.chunks})
    log(f"[paper-table] wrote {md}" + ("" if complete else " (partial)"))
    return md


def table(header: Sequence[str], rows, align: str = "") -> list[str]:
    """`tables.markdown_table` as lines of the report."""
    return markdown_table(header, rows, align).rstrip("\n").split("\n")


def budget_bytes(pipeline: str, base: Sequence[str], manifest: Manifest) -> dict[str, int]:
    """Bytes of an A export of each allocation (float16 descriptors, no logits), by view-study label."""
    labels = read_labels(manifest, "train")
    out = {}
    for alloc in ALLOCATIONS:
        for v in VIEWS:
            cfg = load_config(pipeline, (*base, f"export.views={v}", f"export.allocation={alloc}",
                                         "export.logits=false", "student.views=0"))
            out[f"{alloc} A={v}"] = sum(projected_cache_bytes(cfg, labels, manifest.train.class_counts).values())
    return out


def pm2(s: dict) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"
