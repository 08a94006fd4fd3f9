"""Loaders: the shards (and, for the student, the cache) streamed in lockstep, one shard at a time.

- `TrainStream`: the training stream of teachers, students and baselines. Each (rank, worker)
  slot reads whole shards, expands each sample into copies with the sampler, pushes the copies
  through a shuffle buffer and emits a fixed quota per epoch, so every rank takes the same number of
  steps whatever the shard count. With a cache, each draw of an image takes its next stored view
  on a seeded walk without replacement (`sampling.ViewWalk`), and its targets come from the same
  contiguous block read of the cache as the shard's rows.
- `EvalStream`: a split in order, evaluation view, for accuracy and features.
- `ExportStream`: every view of every image of the given shards, for the teachers at export.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cbd_cache.cache.reader import CacheReader, ViewBlock
from cbd_cache.config import TeacherCfg
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.sampling import ViewWalk, copies, repeat_factors, walk_start
from cbd_cache.data.shards import Sample, decode_sample, read_shard
from cbd_cache.views import (
    EncodedBatch,
    ViewSpec,
    concat,
    derive_views,
    eval_view,
    image_dims,
    photometric,
    render,
    replay_flat,
    sample_view,
)

EMPTY = torch.empty(0)


REPLAY_WINDOW_BYTES = 16 << 20   # export replays up to this many bytes of views at once


def worker_slot(rank: int, world: int) -> tuple[int, int]:
    """(this loader worker's slot, number of slots) across all ranks and workers."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return rank * nw + wid, world * nw


@dataclass(frozen=True)
class CacheSpec:
    """How a worker reopens the cache (readers are built inside each worker, not pickled)."""

    path: Path
    teachers: tuple[str, ...]
    views: int
    with_logits: bool = False

    def open(self, manifest: Manifest):
        return CacheReader(self.path, manifest, list(self.teachers), self.views, with_logits=self.with_logits)


# Parsed shards a loader worker keeps: a small dataset's tars are then parsed once, not every epoch.
SHARD_MEMO_BYTES = 128 << 20


class ShardMemo:
    """The most recently used shards' parsed samples (and cache rows), up to a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[int, tuple[tuple, int]] = OrderedDict()

    def get(self, key: int, load) -> tuple:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        value = load()
        size = sum(len(x.data) for x in value[0]) + (value[1].nbytes if value[1] is not None else 0)
        self.items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self.items) > 1:
            self.bytes -= self.items.popitem(last=False)[1][1]
        return value


class TrainStream(IterableDataset):
    """Endless (image, label, row, view index, target, logits) tuples, epoch after epoch.

    views: from the cache when `cache` is given (view index = which of the image's stored views),
    else freshly drawn (view index -1), then `augment`'s photometric noise for data-augmentation teachers.

    Each slot's epoch e is self-contained: its order comes from a generator seeded by (seed, e, slot)
    and item j's view and noise from one seeded by (seed, e, slot, j). So a stream can start at any
    (epoch, item) by replaying the order alone, reading shards but decoding no image: that is how a
    resumed run gets the exact batches the killed one would have had (`place`). A cached view is
    picked when its copy leaves the shuffle buffer: the image's k-th draw of epoch e (counted in the
    order, so a replay counts it too) takes walk position `walk_start(e, r, row) + k`.
    """

    def __init__(self, manifest: Manifest, spec: ViewSpec, *, sampling: str, seed: int, samples_per_epoch: int,
                 shuffle_buffer: int, cache: CacheSpec | None = None, augment: TeacherCfg | None = None,
                 rank: int = 0, world: int = 1):
        self.manifest, self.spec = manifest, spec
        self.factors = repeat_factors(manifest.train.class_counts, sampling)
        self.seed, self.samples_per_epoch, self.shuffle_buffer = seed, samples_per_epoch, shuffle_buffer
        self.cache, self.augment = cache, augment
        self.augmenting = augment is not None and augment.type == "data_aug"
        self.rank, self.world = rank, world
        self.batches_done, self.batch_size = 0, 1

    def place(self, rank: int, world: int, batches_done: int = 0, batch_size: int = 1) -> "TrainStream":
        """This stream for `rank` of `world`, after the rank has consumed `batches_done` batches of `batch_size`."""
        placed = copy.copy(self)
        placed.rank, placed.world, placed.batches_done, placed.batch_size = rank, world, batches_done, batch_size
        return placed

    def start(self) -> tuple[int, int, int]:
        """(slot, slots, samples this slot has already emitted) for the calling loader worker.

        A DataLoader takes batch b from worker b mod W. Restarted after `batches_done` batches, its
        worker w continues what worker (w + batches_done) mod W was doing.
        """
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        logical = (wid + self.batches_done) % nw
        done = max(0, -(-(self.batches_done - logical) // nw)) * self.batch_size
        return self.rank * nw + logical, self.world * nw, done

    def load(self, index: int, reader) -> tuple:
        """Shard `index`'s samples, and its rows of the cache (a `ViewBlock`) when there is one."""
        info = self.manifest.train.shards[index]
        samples = read_shard(self.manifest.shard_path(info), info.start, info.stop, info.sha256)
        return samples, (reader.read(info.start, info.stop) if reader is not None else None)

    def expand(self, slot: int, slots: int, epoch: int, rng: np.random.Generator, reader,
               memo: "ShardMemo") -> Iterator[tuple]:
        """Endless pre-shuffle copies (sample, its index in the shard, the shard's cache block) for one epoch:
        this slot's shards, cycled, each sample repeated by its factor."""
        shards = self.manifest.train.shards
        order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(shards))
        mine = list(order[slot::slots]) or [order[slot % len(shards)]]
        while True:
            for s in mine:
                samples, block = memo.get(int(s), lambda: self.load(int(s), reader))
                for i, sample in enumerate(samples):
                    for _ in range(copies(self.factors[sample.label], rng.random())):
                        yield sample, i, block
            mine = list(rng.permutation(mine))

    def epoch_items(self, slot: int, slots: int, epoch: int, reader, memo: "ShardMemo",
                    walk: ViewWalk | None = None) -> Iterator[tuple]:
        """One epoch of this slot: `samples_per_epoch // slots` items, in the order the shuffle buffer gives
        (`walk`: the slot's ViewWalk, kept from epoch to epoch; the views do not depend on it)."""
        rng = np.random.default_rng([self.seed, epoch, slot])
        source = self.expand(slot, slots, epoch, rng, reader, memo)
        buffer: list[tuple] = []
        drawn: dict[int, int] = {}                          # row -> its draws so far this epoch
        walk = walk or ViewWalk(self.seed)
        for _ in range(self.samples_per_epoch // slots):
            while len(buffer) < self.shuffle_buffer:
                buffer.append(next(source))
            j = int(rng.integers(len(buffer)))
            item, buffer[j] = buffer[j], buffer[-1]
            buffer.pop()
            sample, i, block = item
            if block is None:
                yield sample, None, -1, None, None
                continue
            k = drawn.get(sample.row, 0)
            drawn[sample.row] = k + 1
            count = int(block.count[i])
            a = walk.view(sample.row, walk_start(epoch, self.factors[sample.label], sample.row) + k, count)
            v = int(block.offset[i]) + a
            yield sample, block.views[v], a, block.targets[v], None if block.logits is None else block.logits[v]

    def __iter__(self) -> Iterator[tuple]:
        slot, slots, done = self.start()
        quota = self.samples_per_epoch // slots
        if quota < 1:
            raise ValueError(f"an epoch of {self.samples_per_epoch} samples cannot feed {slots} loader slots")
        reader = self.cache.open(self.manifest) if self.cache else None
        memo = ShardMemo(SHARD_MEMO_BYTES)
        epoch, skip = divmod(done, quota)
        walk = ViewWalk(self.seed)
        while True:
            items = self.epoch_items(slot, slots, epoch, reader, memo, walk)
            for _ in range(skip):        # fast-forward: the order only, no image decoded
                next(items)
            for j, item in enumerate(items, start=skip):
                yield self.materialize(item, (self.seed, epoch, slot, j))
            epoch, skip = epoch + 1, 0

    def materialize(self, item: tuple, rng_seed: tuple[int, ...]) -> tuple:
        """The item's image, uint8 (float once photometrically augmented), with its label, row and targets.

        Its generator (fresh view, photometric noise) is seeded only when one is needed: seeding
        costs about as much as replaying a 28 px view, and a cached view needs none.
        """
        sample, view, a, target, logits = item
        # photometric noise needs pixels here: an augmenting stream decodes on the CPU whatever the policy
        spec = dataclasses.replace(self.spec, decode="full") if self.augmenting and self.spec.decode == "gpu" else self.spec
        rng = np.random.default_rng(list(rng_seed)) if view is None or self.augmenting else None
        image = None
        if view is None:
            height, width, image = image_dims(sample, spec, self.manifest.channels)
            view = sample_view(rng, height, width, spec)
        x = render(sample, view, spec, self.manifest.channels, image)
        x = x if spec.decode == "gpu" else x[0]
        if self.augmenting:
            x = photometric(x, rng, self.augment)
        return (x, sample.label, sample.row, a,
                EMPTY if target is None else torch.from_numpy(np.asarray(target)),
                EMPTY if logits is None else torch.from_numpy(np.asarray(logits)))


class EvalStream(IterableDataset):
    """(image, label, row) for every sample of a split, under the evaluation view; shards split over workers."""

    def __init__(self, manifest: Manifest, split: str, spec: ViewSpec):
        self.manifest, self.split, self.spec = manifest, split, spec

    def __iter__(self) -> Iterator[tuple]:
        slot, slots = worker_slot(0, 1)
        for info in self.manifest.splits[self.split].shards[slot::slots]:
            for sample in read_shard(self.manifest.shard_path(info), info.start, info.stop, info.sha256):
                image = decode_sample(sample, self.manifest.channels)
                yield eval_view(image, self.spec), sample.label, sample.row


class ExportStream(IterableDataset):
    """Batches of (shard index, rows, view counts, views int32 (m, 5), images uint8 (m, C, px, px)) over whole shards.

    Row r gets `views[r]` views (an int: every row the same), image-major: view a of image `key` is
    `derive_views(view_seed, key, ...)[a]`, replayed exactly as the student's `TrainStream` replays
    the stored parameters. A batch holds whole rows, as many as fit in `batch_images` views (at least one).
    """

    def __init__(self, manifest: Manifest, shard_indices: list[int], spec: ViewSpec, view_seed: int,
                 views: int | np.ndarray, batch_images: int):
        self.manifest, self.shard_indices, self.spec = manifest, shard_indices, spec
        self.view_seed, self.views, self.batch_images = view_seed, views, batch_images

    def count(self, row: int) -> int:
        return int(self.views) if np.isscalar(self.views) else int(self.views[row])

    def replay(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, "torch.Tensor | EncodedBatch"]:
        """Rows, their view counts, views (m, 5) and their pixels (m, C, px, px) (`views.render`; an
        `EncodedBatch` under decode = "gpu"), image-major."""
        channels = self.manifest.channels
        dims = [image_dims(sample, self.spec, channels) for sample in samples]
        counts = [self.count(sample.row) for sample in samples]
        per_image = [derive_views(self.view_seed, sample.key, c, h, w, self.spec)
                     for sample, (h, w, _), c in zip(samples, dims, counts)]
        views = np.concatenate(per_image)
        images = [image for _, _, image in dims]
        rows = torch.tensor([sample.row for sample in samples])
        if self.spec.decode == "full" and len({image.shape for image in images}) == 1:
            # the embedded default: one resize per crop size, bit for bit `render`'s pixels
            pixels = replay_flat(torch.stack(images), views, np.repeat(np.arange(len(images)), counts),
                                 self.spec.image_px)
        else:                                            # photos of many sizes: one resize per view
            pixels = concat([render(sample, v, self.spec, channels, image)
                             for sample, v, image in zip(samples, per_image, images)])
        return rows, torch.tensor(counts), views, pixels

    def batches(self, counts: list[int]) -> list[tuple[int, int]]:
        """Consecutive row ranges of at most `batch_images` views each (a row with more is a batch alone)."""
        out, start, total = [], 0, 0
        for i, c in enumerate(counts):
            if i > start and total + c > self.batch_images:
                out.append((start, i))
                start, total = i, 0
            total += c
        return out + ([(start, len(counts))] if counts else [])

    def __iter__(self) -> Iterator[tuple]:
        """Replays whole batches at a time, several when they are small: the more views replay together,
        the more share a crop size, hence a resize call (the embedded default replays a shard at once)."""
        slot, slots = worker_slot(0, 1)
        view_bytes = self.manifest.channels * self.spec.image_px ** 2
        for s in self.shard_indices[slot::slots]:
            info = self.manifest.train.shards[s]
            samples = read_shard(self.manifest.shard_path(info), info.start, info.stop, info.sha256)
            counts = [self.count(sample.row) for sample in samples]
            batches = self.batches(counts)
            while batches:                      # a window: whole batches, up to REPLAY_WINDOW_BYTES of views
                window = [batches.pop(0)]
                size = sum(counts[slice(*window[0])]) * view_bytes
                while batches and size + sum(counts[slice(*batches[0])]) * view_bytes <= REPLAY_WINDOW_BYTES:
                    size += sum(counts[slice(*batches[0])]) * view_bytes
                    window.append(batches.pop(0))
                lo = window[0][0]
                rows, row_counts, views, pixels = self.replay(samples[lo:window[-1][1]])
                first = np.concatenate([[0], np.cumsum(row_counts.numpy())])
                for b0, b1 in window:
                    v0, v1 = first[b0 - lo], first[b1 - lo]
                    yield (s, rows[b0 - lo:b1 - lo], row_counts[b0 - lo:b1 - lo], torch.from_numpy(views[v0:v1]),
                           pixels[v0:v1])


class DescriptorStream(IterableDataset):
    """Endless (descriptor, label) copies: the sampler's copies of each image, each its next stored view.

    Like `TrainStream` (same repeat factors, N samples an epoch, the same walk without replacement
    over each image's views) but over an in-memory `ViewBlock` of every row, so the shuffle is a full
    permutation, and the walk counts every earlier draw exactly: the sequence is global and replayed
    from its start.
    """

    def __init__(self, block: ViewBlock, labels: np.ndarray, class_counts: list[int], sampling: str, seed: int):
        self.block, self.labels = block, labels
        self.factors = repeat_factors(class_counts, sampling)
        self.seed = seed
        self.samples_per_epoch = len(labels)
        self.rank, self.world, self.skip = 0, 1, 0

    def place(self, rank: int, world: int, batches_done: int = 0, batch_size: int = 1) -> "DescriptorStream":
        """Rank `rank` takes every `world`-th copy of the one global sequence, after `batches_done` batches."""
        placed = copy.copy(self)
        placed.rank, placed.world, placed.skip = rank, world, batches_done * batch_size * world
        return placed

    def sequence(self) -> Iterator[tuple[int, int]]:
        """The global, endless (row, flat view index) sequence: a fresh permutation of the sampler's copies per pass."""
        epoch, drawn = 0, np.zeros(len(self.labels), dtype=np.int64)
        offset, count = self.block.offset, self.block.count
        while True:
            rng = np.random.default_rng([self.seed, epoch, 0xC27])
            n = [copies(self.factors[y], u) for y, u in zip(self.labels, rng.random(len(self.labels)))]
            walk = ViewWalk(self.seed)
            for r in rng.permutation(np.repeat(np.arange(len(self.labels)), n)).tolist():
                drawn[r] += 1
                yield r, int(offset[r]) + walk.view(r, int(drawn[r]) - 1, int(count[r]))
            epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for r, v in itertools.islice(self.sequence(), self.skip + self.rank, None, self.world):
            yield torch.from_numpy(self.block.targets[v]), int(self.labels[r])
