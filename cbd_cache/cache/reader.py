"""Reading a cache for a student: checked against the data and teachers first, then whole blocks of rows."""
from __future__ import annotations

import shlex
from dataclasses import dataclass

import numpy as np
import zarr

from cbd_cache.cache.codec import dequantize_int8
from cbd_cache.cache.schema import (
    TEACHER_DONE,
    VIEWS_DONE,
    cache_counts,
    claimed_counts_agree,
    make_layout,
    row_specs,
    shared_specs,
    teacher_array,
    teacher_specs,
)
from cbd_cache.cache.store import (
    REPAIR,
    chunk_key,
    damaged,
    holes,
    metadata_problems,
    open_group,
    provenance_of,
    read_chunks,
    read_whole,
    teacher_folders,
    teacher_record,
    why,
)
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import CacheDamaged, CacheError
from cbd_cache.system.storage import Location, join


@dataclass(frozen=True)
class ViewBlock:
    """A run of rows' cached views, flat: row j's are [offset[j], offset[j] + count[j]) of each array."""

    views: np.ndarray            # (M, 5) int32
    targets: np.ndarray          # (M, sum d) float16/float32
    logits: np.ndarray | None    # (M, K*C) or None
    offset: np.ndarray           # (n,) int64
    count: np.ndarray            # (n,) int64, the views the reader serves (a prefix of those stored)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.views, self.targets, self.logits, self.offset, self.count) if a is not None)

    def every_view(self) -> np.ndarray:
        """Flat indices of every served view, row after row."""
        starts = np.repeat(self.offset - np.cumsum(self.count) + self.count, self.count)
        return starts + np.arange(int(self.count.sum()))


class CacheReader:
    """Serves rows' views and targets to the student, after checking the cache fits.

    Targets are the chosen teachers' descriptors concatenated in the order asked, each already
    L2-normalised at export. `views = V` serves each image the views an export with budget A = V
    (and the cache's allocation) would hold: a prefix of the stored ones, as view a never depends
    on the budget (on a "draws" cache this reads the labels once). An int8 cache is dequantised
    here, to float16, so the student never sees the storage format.
    """

    def __init__(self, path: Location, manifest: Manifest, teachers: list[str], views: int = 0,
                 checkpoint_hashes: dict[str, str] | None = None, with_logits: bool = False):
        self.path = path
        group = open_group(self.path)
        prov = provenance_of(group)
        check_data(path, prov, manifest)
        for name, problem in metadata_problems(group, row_specs(prov)).items():
            raise damaged(path, name, problem)
        counts = read_whole(group, path, "view_count")
        if not claimed_counts_agree(prov, counts, manifest.train.class_counts):
            raise CacheDamaged(f"{path}: view_count does not hold the views per image its provenance claims "
                               f"({prov['allocation']} allocation of A = {prov['views_per_image']}, min_views "
                               f"{prov['min_views']}); run `cbd-cache cache verify`, or export the cache again")
        self.layout = make_layout(prov["shards"], counts, prov["chunk_views"])
        records = {t: teacher_record(group, path, t) for t in teachers}     # only those read are checked
        missing = [t for t in teachers if records[t] is None]
        if missing:
            folders = teacher_folders(path)
            cut = [t for t in missing if t in folders]
            raise CacheError(f"{self.path} has no descriptors for teacher(s) {missing}"
                             + (f" ({', '.join(cut)}: an export was cut short, or its group metadata lost)" if cut else "")
                             + f"; it holds {[f for f in folders if f not in cut]}. Run `cbd-cache export` to add them")
        for name, sha in (checkpoint_hashes or {}).items():
            cached = records[name]["checkpoint_sha256"] if name in records else None
            if name in teachers and cached != sha:
                raise CacheError(f"{self.path}: teacher {name} was retrained after its export (checkpoint {sha[:12]}, "
                                 f"cache {cached[:12]}); run `cbd-cache export --replace {name}` to rewrite its group")
        self.specs = shared_specs(prov, self.layout)
        for t in teachers:
            self.specs.update(teacher_specs(prov, self.layout, t, records[t]["descriptor_dim"]))
        used = ["views", VIEWS_DONE, *(teacher_array(t, k) for t in teachers for k in
                                       ("descriptors", "scales", TEACHER_DONE, *(["logits"] if with_logits else [])))]
        for name, problem in metadata_problems(group, {k: self.specs[k] for k in used if k in self.specs}).items():
            raise damaged(path, name, problem)
        done = read_whole(group, path, VIEWS_DONE)
        if not done.all():
            raise CacheError(f"{self.path} is incomplete: {int(done.sum())}/{len(done)} shards exported; "
                             "run `cbd-cache export` to finish it")
        for t in teachers:
            done = read_whole(group, path, teacher_array(t, TEACHER_DONE))
            if not done.all():
                raise CacheError(f"{self.path}: teacher {t} is incomplete: {int(done.sum())}/{len(done)} shards "
                                 "exported; run `cbd-cache export` to finish it")
        if with_logits and not prov["logits"]:
            raise CacheError(f"{self.path} holds no teacher logits; export with --set export.logits=true")
        if views > prov["views_per_image"]:
            raise CacheError(f"{self.path} holds a budget of {prov['views_per_image']} views per image "
                             f"({prov['allocation']} allocation), {views} were asked for")
        self.group = group
        self.prov = prov
        self.records = {t: records[t] for t in teachers}
        self.teachers = list(teachers)
        self.views = views or prov["views_per_image"]
        self.with_logits = with_logits
        self.dims = [records[t]["descriptor_dim"] for t in teachers]
        self.counts = self.layout.counts
        if self.views != prov["views_per_image"]:
            self.counts = np.minimum(self.counts, cache_counts(manifest, self.views, prov["allocation"],
                                                               prov["min_views"]))
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        """An array of the group, opened once: each `group[name]` re-reads and parses its zarr.json."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def read(self, start: int, stop: int) -> ViewBlock:
        """Rows [start, stop) (a shard, or several in a row): each array one contiguous slice, no per-sample reads."""
        lo = int(self.layout.offsets[start])
        hi = int(self.layout.offsets[stop - 1] + self.layout.counts[stop - 1])
        views = self.read_array("views", lo, hi)
        parts = [self.descriptors(t, lo, hi) for t in self.teachers]
        targets = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        logits = None
        if self.with_logits:
            zs = [self.read_array(teacher_array(t, "logits"), lo, hi) for t in self.teachers]
            logits = np.concatenate(zs, axis=-1) if len(zs) > 1 else zs[0]
        return ViewBlock(views, targets, logits, self.layout.offsets[start:stop] - lo, self.counts[start:stop])

    def descriptors(self, teacher: str, lo: int, hi: int) -> np.ndarray:
        """One teacher's descriptors of flat views [lo, hi): float16/float32 as stored, int8 dequantised."""
        d = self.read_array(teacher_array(teacher, "descriptors"), lo, hi)
        if self.prov["dtype"] != "int8":
            return d
        return dequantize_int8(d, self.read_array(teacher_array(teacher, "scales"), lo, hi), np.float16)

    def read_array(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Flat views [lo, hi) of one array; a chunk that fails its check, or is missing, raises CacheDamaged."""
        cv = self.layout.chunk_views

        def chunk_damaged(chunk: int, what: str) -> CacheDamaged:
            shard = int(np.searchsorted(self.layout.blocks[:, 1], chunk * cv, side="right"))
            return CacheDamaged(f"{join(self.path, chunk_key(name, self.specs[name], chunk))} (shard {shard}) "
                                f"{what}; {REPAIR}")

        try:
            x = self.array(name)[lo:hi]
        except ValueError:
            for c, part in read_chunks(self.array(name), lo, hi):     # which chunk
                if isinstance(part, ValueError):
                    raise chunk_damaged(c, why(part)) from None
            raise
        bad = holes(x, self.specs[name].fill)
        if len(bad):
            raise chunk_damaged((lo + int(bad[0])) // cv, "is missing")
        return x


def check_data(path: Location, prov: dict, manifest: Manifest) -> None:
    """The cache was exported from this manifest's data, shard for shard: each shard's row range in the
    provenance is the manifest's (swapped ranges would pair rows with another image's targets)."""
    if prov["manifest_fingerprint"] != manifest.fingerprint:
        raise CacheError(
            f"{path} was exported for data with fingerprint {prov['manifest_fingerprint'][:12]}, but "
            f"the manifest {join(manifest.folder, 'manifest.json')} has {manifest.fingerprint[:12]}; "
            "re-run `cbd-cache export` for this data")
    ranges = [[s.start, s.stop] for s in manifest.train.shards]
    if prov["shards"] != ranges:
        bad = next((i for i, (a, b) in enumerate(zip(prov["shards"], ranges)) if a != b), min(len(ranges),
                                                                                             len(prov["shards"])))
        raise CacheDamaged(f"{path}: the shard row ranges in its provenance differ from the manifest's (first at "
                           f"shard {bad}); the cache's rows would not be the data's. Export it again: "
                           f"rm -r {shlex.quote(str(path))} && cbd-cache export")
