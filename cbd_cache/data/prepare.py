"""`cbd-cache prepare`: a source's records -> long-tail cut -> shuffled WebDataset shards + manifest."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import Config
from ..runtime import Progress, log
from ..workdir import Workdir
from .longtail import longtail_subset
from .manifest import Manifest, ShardInfo, SplitInfo
from .shards import Sample, ShardWriter, shard_name
from .sources import Record, Source, open_source


def select_train(records: list[Record], cfg: Config, num_classes: int) -> list[Record]:
    """Apply the long-tail profile (if any), then shuffle so every shard mixes classes."""
    d = cfg.data
    if d.profile == "exponential":
        labels = np.array([r.label for r in records])
        records = [records[i] for i in longtail_subset(labels, num_classes, d.n_max, d.imbalance_factor, d.seed)]
    order = np.random.default_rng([d.seed, 0x5A4D]).permutation(len(records))
    return [records[i] for i in order]


def write_split(source: Source, split: str, records: list[Record], wd: Workdir, shard_size: int,
                num_classes: int) -> SplitInfo:
    shards: list[ShardInfo] = []
    counts = [0] * num_classes
    progress = Progress(f"prepare {split}", len(records))
    for index, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start:start + shard_size]
        writer = ShardWriter(wd.data / shard_name(split, index))
        for row, record in enumerate(chunk, start=start):
            if not 0 <= record.label < num_classes:
                raise ValueError(f"{split} record {record.key}: label {record.label} outside [0, {num_classes})")
            data, ext = source.read(record)
            writer.write(Sample(record.key, record.label, row, data, ext))
            counts[record.label] += 1
        shards.append(ShardInfo(shard_name(split, index), start, start + len(chunk), writer.close()))
        progress.update(len(chunk))
    return SplitInfo(len(records), counts, shards)


def prepare(cfg: Config, wd: Workdir, source: Source | None = None) -> Manifest:
    """Shards + manifest from `data.format`'s reader, or from `source` when given (benchmarks bring their own)."""
    data_config = dataclasses.asdict(cfg.data)
    if wd.manifest.is_file():
        existing = Manifest.load(wd.manifest)
        if existing.data_config == data_config:
            log(f"[prepare] {wd.manifest} is up to date ({existing.train.num_samples} training images); skipping")
            return existing
        log(f"[prepare] {wd.manifest} was made from other data settings; preparing again")
    source = source or open_source(cfg.data)
    wd.data.mkdir(parents=True, exist_ok=True)
    num_classes = len(source.class_names)
    splits = {}
    for split in source.splits:
        records = source.records(split)
        if split == "train":
            records = select_train(records, cfg, num_classes)
        splits[split] = write_split(source, split, records, wd, cfg.data.shard_size, num_classes)
    manifest = Manifest(name=cfg.pipeline.name, class_names=list(source.class_names), channels=source.channels,
                        splits=splits, source=source.description, data_config=data_config, folder=wd.data)
    manifest.fingerprint = manifest.compute_fingerprint()
    manifest.save(wd.manifest)
    counts = splits["train"].class_counts
    log(f"[prepare] {splits['train'].num_samples} training images in {len(splits['train'].shards)} shards, "
        f"class counts {max(counts)}..{min(counts)}; fingerprint {manifest.fingerprint[:12]}")
    return manifest
