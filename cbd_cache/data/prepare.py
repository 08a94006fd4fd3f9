"""`cbd-cache prepare`: a source's records -> long-tail cut -> shuffled WebDataset shards + manifest + report.

Streaming, bounded and resumable. Worker processes read the records, in order and a bounded window
at a time, and check each image (`Source.read`), then decode what a shard will store with the
decoder training uses (`data.isolated`): what prepare accepts, training can decode. That
decoder (libpng) can kill its process on input PIL accepts, so it runs in workers only; a chunk
whose worker died is read again one item per process, and the item that kills one is unreadable.
Each shard takes the next `data.shard_size` readable images. A finished shard is appended to a
journal, so a killed prepare continues at the next shard, and writes the same bytes: the same
manifest fingerprint. Run again on prepared data, prepare hashes every shard and rebuilds, bit for
bit, any that is missing, truncated or changed.

Nothing is lost in silence. Every source item ends up in a shard, or in the report
(W/data/report.md, and `rejected` in the manifest), or is left out by the long-tail profile on
purpose: listed = in shards + rejected + profile_dropped + held_out, per split (held_out: training
images that became the val split, which lists them again).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbd_cache.config import Config
from cbd_cache.data.isolated import read_in_order
from cbd_cache.data.longtail import cifar_lt_subset, longtail_subset, profile_counts
from cbd_cache.data.manifest import EVAL_SPLITS, HEAL, Manifest, ShardInfo, SplitInfo
from cbd_cache.data.shards import Sample, ShardWriter, content_hash, read_labels, shard_intact, shard_name
from cbd_cache.data.sources import DataError, Record, Source, open_source
from cbd_cache.data.sources.images import bounded
from cbd_cache.errors import FileDamaged
from cbd_cache.system.logs import Progress, log
from cbd_cache.system.runtime import cpu_count
from cbd_cache.system.storage import atomic_write_bytes
from cbd_cache.workdir import Workdir

JOURNAL = "prepare.journal"
REPORT = "report.md"
SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
LOG_REJECTS = 10  # items named on the console (per split for unreadable ones); the report names them all


@dataclass
class SplitPlan:
    records: list[Record]   # what will be read, in shard order
    listed: int             # the split's source items, label problems included
    profile_dropped: int    # training items the long-tail profile leaves out
    held_out: int = 0       # training items held out as the val split (`data.val_per_class`)


def select_train(records: list[Record], cfg: Config, num_classes: int) -> list[Record]:
    """Apply the long-tail profile (if any), then shuffle so every shard mixes classes."""
    d = cfg.data
    if d.profile in ("exponential", "imagenet_lt_shape"):
        labels = np.array([r.label for r in records])
        counts = profile_counts(d.profile, d.n_max, d.imbalance_factor, num_classes)
        try:
            records = [records[i] for i in longtail_subset(labels, num_classes, counts, d.seed)]
        except ValueError as e:
            raise DataError(f"data.profile={d.profile}: {e}, or use data.profile=none for a long-tailed source") from None
    elif d.profile == "cifar_lt":
        labels = np.array([r.label for r in records])
        try:
            records = [records[i] for i in cifar_lt_subset(labels, num_classes, d.imbalance_factor)]
        except ValueError as e:
            raise DataError(f"data.profile=cifar_lt: {e}; it cuts a balanced CIFAR training set") from None
    order = np.random.default_rng([d.seed, 0x5A4D]).permutation(len(records))
    return [records[i] for i in order]


def val_origin(source: Source, cfg: Config) -> str:
    """Where the val split comes from, in words (the manifest, the dry run and the reports say it)."""
    if "val" in source.splits:
        return "the source's own val split"
    if cfg.data.val_per_class == 0:
        return "none (data.val_per_class = 0): a choice made on val (student.tau = -1) is refused"
    if cfg.data.profile == "none":
        return ("none: data.profile=none keeps every training image, so none is left to hold out; a choice made on "
                "val (student.tau = -1) is refused")
    return (f"{cfg.data.val_per_class} per class held out of the source's training images that the long-tail "
            "profile leaves out, so never in the training set")


def hold_out_val(records: list[Record], kept: list[Record], cfg: Config, names: list[str]) -> list[Record]:
    """`data.val_per_class` images per class, seeded, from the training records the profile left out: a
    balanced val split disjoint from the training set. Refused when a class has too few left out."""
    n, taken = cfg.data.val_per_class, {r.key for r in kept}
    rng = np.random.default_rng([cfg.data.seed, 0x7A1])
    val = []
    for c, name in enumerate(names):
        left = [r for r in records if r.label == c and r.key not in taken]
        if len(left) < n:
            raise DataError(f"data.val_per_class={n}: class {name!r} has {len(left)} training images the long-tail "
                            f"profile leaves out; lower data.val_per_class to {len(left)} or less (0: no val split)")
        val += [left[i] for i in sorted(rng.choice(len(left), size=n, replace=False))]
    return val


def plan_splits(source: Source, cfg: Config) -> dict[str, SplitPlan]:
    """Every split's records in shard order. Cheap (listing only); label problems stop it here, before any shard.

    A source with no val split gets one held out of its training images (`hold_out_val`) when
    `data.val_per_class` > 0 and the profile leaves images out (`val_origin` says which).
    """
    if not any(s in source.splits for s in EVAL_SPLITS):
        raise DataError(f"{cfg.data.format} at data.root={cfg.data.root}: no val or test split to evaluate on "
                        f"(found only {', '.join(source.splits)})")
    plans = {}
    for split in source.splits:
        records = source.records(split)
        skipped = sum(1 for p in source.skipped if p["split"] == split)
        kept = select_train(records, cfg, len(source.class_names)) if split == "train" else records
        plans[split] = SplitPlan(kept, len(records) + skipped, len(records) - len(kept))
        if split == "train" and "val" not in source.splits and cfg.data.val_per_class and cfg.data.profile != "none":
            val = hold_out_val(records, kept, cfg, source.class_names)
            plans[split].profile_dropped -= len(val)
            plans[split].held_out = len(val)
            plans["val"] = SplitPlan(val, len(val), 0)
    return plans


def plan_digest(plans: dict[str, SplitPlan]) -> str:
    h = hashlib.sha256()
    for split, plan in plans.items():
        for r in plan.records:
            h.update(f"{split}\0{r.key}\0{r.label}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ journal
class Journal:
    """Finished shards, one JSON line each, after a header line naming the data and the plan.

    Opening it keeps the entries whose header matches and whose shard files are intact, up to the
    first that is not (a torn last line, a missing or resized shard): prepare resumes after them.
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.entries: list[dict[str, Any]] = []
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and _json_or_none(lines[0]) == {"header": header}:
            for line in lines[1:]:
                entry = _json_or_none(line)
                if entry is None or not self._intact(entry):
                    break
                self.entries.append(entry)
        kept = [json.dumps({"header": header})] + [json.dumps(e) for e in self.entries]
        atomic_write_bytes(path, ("\n".join(kept) + "\n").encode())
        self.file = open(path, "a")

    def _intact(self, entry: dict[str, Any]) -> bool:
        if entry.get("name") is None:
            return True
        shard = self.path.parent / entry["name"]
        return shard.is_file() and shard.stat().st_size == entry["bytes"]

    def done(self, split: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["split"] == split]

    def append(self, entry: dict[str, Any]) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.entries.append(entry)

    def close(self) -> None:
        self.file.close()


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------------------------ writing
def write_split(source: Source, split: str, plan: SplitPlan, wd: Workdir, shard_size: int, journal: Journal,
                workers: int) -> tuple[list[ShardInfo], list[dict[str, Any]]]:
    """Shards of the split's readable records, and its unreadable ones; resumes after the journal's last shard."""
    done = journal.done(split)
    shards = [ShardInfo(e["name"], e["start"], e["stop"], e["sha256"]) for e in done if e["name"]]
    rejected = [r for e in done for r in e["rejected"]]
    pos = done[-1]["next"] if done else 0
    total = len(plan.records)
    if pos == total:
        return shards, rejected
    if pos:
        log(f"[prepare {split}] resuming after shard {len(shards) - 1}: {pos}/{total} records done")
    row, index = (shards[-1].stop if shards else 0), len(shards)
    progress = Progress(f"prepare {split}", total - pos)
    writer, start, pending, nbytes = None, row, [], 0
    for record, data, ext in read_in_order(source, plan.records[pos:], workers):
        pos += 1
        if data is None:
            pending.append({"split": split, "item": source.item(record), "key": record.key, "reason": ext,
                            "kind": "unreadable"})
            if len(rejected) + len(pending) <= LOG_REJECTS:
                log(f"[prepare {split}] unreadable, left out: {source.item(record)}: {ext}")
        else:
            if writer is None:
                writer, start = ShardWriter(wd.data / shard_name(split, index)), row
            writer.write(Sample(record.key, record.label, row, data, ext))
            row += 1
            nbytes += len(data)
        if row - start == shard_size or pos == total:
            entry: dict[str, Any] = {"split": split, "name": None, "next": pos, "rejected": pending}
            if writer is not None:
                shards.append(ShardInfo(shard_name(split, index), start, row, writer.close()))
                entry.update(name=shards[-1].name, start=start, stop=row, sha256=shards[-1].sha256,
                             bytes=(wd.data / shards[-1].name).stat().st_size)
                writer, start, index = None, row, index + 1
            journal.append(entry)
            rejected += pending
            pending = []
        progress.advance(1)
        if progress.due():
            mb_per_s = nbytes / 2**20 / max(time.perf_counter() - progress.start, 1e-9)
            progress.report(f"{mb_per_s:,.1f} MB/s  {len(rejected) + len(pending)} unreadable")
    return shards, rejected


def prepare(cfg: Config, wd: Workdir, source: Source | None = None) -> Manifest:
    """Shards + manifest + report from `data.format`'s reader, or from `source` when given (benchmarks bring their own)."""
    data_config = dataclasses.asdict(cfg.data)
    plans, existing = None, None
    if wd.manifest.is_file():
        try:
            existing = Manifest.read(wd.manifest)
        except FileDamaged as e:
            log(f"[prepare] {str(e).removesuffix(f'; {HEAL}')}; preparing again (the same shards, bit for bit)")
    if existing is not None and existing.data_config != data_config:
        log(f"[prepare] {wd.manifest} was made from other data settings; preparing again")
    elif existing is not None:
        kept, source, plans = keep_prepared(existing, cfg, wd, source)
        if kept is not None:
            return kept
    source = bounded(source or open_source(cfg.data), cfg.data.max_short_px)
    plans = plans or plan_splits(source, cfg)
    for p in source.skipped[:LOG_REJECTS]:
        log(f"[prepare] label problem, left out: {p['where']}: {p['reason']}")
    wd.data.mkdir(parents=True, exist_ok=True)
    journal = Journal(wd.data / JOURNAL, {"data_config": data_config, "plan": plan_digest(plans)})
    wd.manifest.unlink(missing_ok=True)   # its shards are about to change: no stage may read them meanwhile
    workers = cpu_count() if cfg.pipeline.workers < 0 else cfg.pipeline.workers
    num_classes = len(source.class_names)
    splits, rejected = {}, list(source.skipped)
    try:
        for split, plan in plans.items():
            shards, unreadable = write_split(source, split, plan, wd, cfg.data.shard_size, journal, workers)
            rejected += unreadable
            bad = {r["key"] for r in unreadable}
            counts = Counter(r.label for r in plan.records if r.key not in bad)
            splits[split] = SplitInfo(shards[-1].stop if shards else 0, [counts[c] for c in range(num_classes)],
                                      shards, plan.listed, plan.profile_dropped, plan.held_out)
    finally:
        journal.close()
    if splits["train"].num_samples == 0:
        raise DataError(f"{source.description}: no readable training image ({len(rejected)} items rejected)")
    manifest = Manifest(name=cfg.pipeline.name, class_names=list(source.class_names), channels=source.channels,
                        splits=splits, source={**source.description, "val": val_origin(source, cfg)}, data_config=data_config, rejected=rejected,
                        folder=wd.data)
    manifest.fingerprint = manifest.compute_fingerprint()
    (wd.data / REPORT).write_text(report_markdown(manifest))
    manifest.save(wd.manifest)
    remove_stale_files(wd.data, manifest)
    (wd.data / JOURNAL).unlink()
    train = splits["train"]
    log(f"[prepare] {train.num_samples} training images in {len(train.shards)} shards, class counts "
        f"{max(train.class_counts)}..{min(train.class_counts)}; "
        + ", ".join(f"{s} {splits[s].num_samples}" for s in splits if s != "train")
        + f"; fingerprint {manifest.fingerprint[:12]}; val: {manifest.source['val']}")
    if rejected:
        kinds = Counter(r["kind"] for r in rejected)
        log(f"[prepare] warning: {len(rejected)} source items left out ({kinds['unreadable']} unreadable images, "
            f"{kinds['label']} label problems{f', {n} not image files' if (n := kinds['ignored']) else ''}); "
            f"listed in {wd.data / REPORT}")
    for warning in class_warnings(manifest):
        log(f"[prepare] warning: {warning}")
    return manifest


def keep_prepared(existing: Manifest, cfg: Config, wd: Workdir, source: Source | None
                  ) -> tuple[Manifest | None, Source | None, dict[str, SplitPlan] | None]:
    """(the manifest or None to prepare again, the source, the plans): intact shards kept, damaged ones rebuilt."""
    (wd.data / JOURNAL).unlink(missing_ok=True)   # left by a prepare killed after its manifest
    damaged, plans = shards_to_rebuild(existing), None
    if not damaged:
        log(f"[prepare] {wd.manifest} is up to date ({existing.train.num_samples} training images, "
            "every shard intact); skipping")
        return sealed(existing, wd.manifest), source, plans
    log(f"[prepare] {len(damaged)} shard(s) missing, truncated or changed: "
        f"{', '.join(info.name for _, info in damaged)}; rebuilding them")
    source = bounded(source or open_source(cfg.data), cfg.data.max_short_px)
    plans = plan_splits(source, cfg)
    if all(rebuild_shard(source, plans[split], existing, split, info, wd, cfg) for split, info in damaged):
        log(f"[prepare] rebuilt {len(damaged)} shard(s), bit for bit; fingerprint {existing.fingerprint[:12]}")
        return sealed(existing, wd.manifest), source, plans
    log(f"[prepare] the source at data.root={cfg.data.root} changed since it was prepared; preparing again")
    return None, source, plans


def sealed(manifest: Manifest, path: Path) -> Manifest | None:
    """The manifest; one an older cbd-cache wrote without a checksum gets it once its counts are its shards' labels'."""
    if not manifest.checksum and any(np.bincount(read_labels(manifest, split), minlength=manifest.num_classes).tolist()
                                     != info.class_counts for split, info in manifest.splits.items()):
        log(f"[prepare] {path}: its class counts are not the shards'; preparing again")
        return None
    if not manifest.checksum:
        manifest.save(path)
        log(f"[prepare] {path}: its class counts agree with the shards; checksum added")
    return manifest


def class_warnings(manifest: Manifest) -> list[str]:
    """What makes the training classes unfit to learn from: a single class, or classes with no image."""
    warnings = []
    if manifest.num_classes == 1:
        warnings.append(f"the data has one class ({manifest.class_names[0]!r}): every model scores 100% by "
                        "predicting it; check data.root")
    empty = [n for n, count in zip(manifest.class_names, manifest.train.class_counts) if count == 0]
    if empty:
        listed = ", ".join(empty[:LOG_REJECTS]) + (f" and {len(empty) - LOG_REJECTS} more" if len(empty) > LOG_REJECTS else "")
        warnings.append(f"{len(empty)} class(es) have no training image ({listed}): no model can learn them; "
                        f"see {manifest.folder / REPORT} for what was left out")
    return warnings


def shards_to_rebuild(manifest: Manifest) -> list[tuple[str, ShardInfo]]:
    """(split, shard) of every shard that is missing, truncated or no longer matches its hash (reads them all)."""
    return [(split, info) for split, s in manifest.splits.items() for info in s.shards
            if not shard_intact(manifest.shard_path(info), info.start, info.stop, info.sha256)]


def rebuild_shard(source: Source, plan: SplitPlan, manifest: Manifest, split: str, info: ShardInfo, wd: Workdir,
                  cfg: Config) -> bool:
    """Write one shard again from the source; False (and nothing written) if the source no longer gives its bytes.

    Rows are numbered over the split's readable records in plan order, so the shard's records are
    the plan's, less the unreadable ones the manifest lists, at [start, stop).
    """
    unreadable = {r["key"] for r in manifest.rejected if r["split"] == split and r["kind"] == "unreadable"}
    records = [r for r in plan.records if r.key not in unreadable][info.start:info.stop]
    workers = cpu_count() if cfg.pipeline.workers < 0 else cfg.pipeline.workers
    samples = []
    for row, (record, data, ext) in enumerate(read_in_order(source, records, workers), start=info.start):
        if data is None:
            return False
        samples.append(Sample(record.key, record.label, row, data, ext))
    if len(samples) != info.rows or content_hash(samples) != info.sha256:
        return False
    writer = ShardWriter(wd.data / info.name)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return True


def remove_stale_files(folder: Path, manifest: Manifest) -> None:
    """Shards of an earlier, larger prepare and half-written ones: nothing in data/ the manifest does not name."""
    keep = {s.name for split in manifest.splits.values() for s in split.shards}
    for p in folder.iterdir():
        if (SHARD_FILE.match(p.name) and p.name not in keep) or p.name.endswith(".partial"):
            p.unlink()


def report_markdown(manifest: Manifest) -> str:
    """Per split: listed = in shards + unreadable + label problems + not image files + left out by the profile
    + held out as val; then every left-out item."""
    lines = [f"# prepare report: {manifest.name}", "",
             f"source: {json.dumps(manifest.source)}", "",
             f"val: {manifest.source.get('val', '–')}", "",
             "| split | listed | in shards | unreadable | label problems | not image files | left out by profile "
             "| held out as val |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for split, info in manifest.splits.items():
        kinds = Counter(r["kind"] for r in manifest.rejected if r["split"] == split)
        lines.append(f"| {split} | {info.listed} | {info.num_samples} | {kinds['unreadable']} | {kinds['label']} "
                     f"| {kinds['ignored']} | {info.profile_dropped} | {info.held_out} |")
    lines += ["", f"## Left out ({len(manifest.rejected)})", ""]
    if manifest.rejected:
        lines += ["| split | item | kind | reason |", "|---|---|---|---|"]
        lines += [f"| {r['split']} | {_cell(r['item'])} | {r['kind']} | {_cell(r['reason'])} |" for r in manifest.rejected]
    else:
        lines.append("Nothing: every listed item is in a shard (or was left out by the long-tail profile).")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
