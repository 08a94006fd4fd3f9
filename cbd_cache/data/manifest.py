"""The manifest: what `prepare` wrote, and the fingerprint that ties a cache to exactly this data.

It checks itself on every load: the `checksum` (SHA-256 of every other field) is recomputed from the
file, the fingerprint from the class names and shards, and the counts must add up; a torn, edited
or foreign manifest is refused in one line (`FileDamaged`) that says `prepare` writes it again. One
that an older cbd-cache wrote without a checksum is refused too: `prepare` checks its class counts
against the shards' labels and adds it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cbd_cache.errors import FileDamaged
from cbd_cache.system.storage import Location, exists, join, parent, read_json, write_json

MANIFEST_SCHEMA = 1
EVAL_SPLITS = ("val", "test")
HEAL = "run `cbd-cache prepare` (same --pipeline, --workdir and --set): it checks the data and writes the manifest again"


@dataclass
class ShardInfo:
    name: str        # file name, relative to the manifest's folder
    start: int       # first manifest row in the shard
    stop: int        # one past the last row
    sha256: str      # hash of the samples' keys, labels and image bytes

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class SplitInfo:
    num_samples: int
    class_counts: list[int]
    shards: list[ShardInfo]
    listed: int = 0            # source items: num_samples + this split's rejected items + profile_dropped + held_out
    profile_dropped: int = 0   # training images the long-tail profile left out on purpose
    held_out: int = 0          # training images held out as the val split (data.val_per_class)


@dataclass
class Manifest:
    name: str
    class_names: list[str]
    channels: int
    splits: dict[str, SplitInfo]
    source: dict[str, Any]
    data_config: dict[str, Any]           # the data section that produced it; `prepare` skips when equal
    fingerprint: str = ""
    checksum: str = ""        # SHA-256 of every other field as saved: any edit of the file shows
    rejected: list[dict[str, Any]] = field(default_factory=list)   # {split, item, reason, kind: unreadable | label}
    schema_version: int = MANIFEST_SCHEMA
    folder: Location = field(default=Path("."), repr=False, compare=False)   # a path or an fsspec URL

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> SplitInfo:
        return self.splits["train"]

    @property
    def eval_splits(self) -> list[str]:
        """The held-out splits evaluation reports on, in order (val, test)."""
        return [s for s in EVAL_SPLITS if s in self.splits]

    @property
    def eval_split(self) -> str:
        """The headline split: test where the dataset has one (ImageNet-LT, Places-LT), else val (iNaturalist)."""
        return "test" if "test" in self.splits else self.eval_splits[0]

    def shard_path(self, shard: ShardInfo) -> Location:
        return join(self.folder, shard.name)

    def compute_fingerprint(self) -> str:
        """Content hash: class names, then every split's shard hashes and row ranges, in order."""
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        for split in sorted(self.splits):
            for s in self.splits[split].shards:
                h.update(f"{split}:{s.start}:{s.stop}:{s.sha256}\n".encode())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        d = asdict(self)
        d.pop("folder")
        d["checksum"] = self.checksum = _checksum(d)
        write_json(path, d)

    @classmethod
    def load(cls, path: Location) -> "Manifest":
        """The manifest at `path`, checked (module docstring); FileDamaged names the file and the fix."""
        manifest = cls.read(path)
        if not manifest.checksum:
            raise FileDamaged(f"{path} has no checksum (an older cbd-cache wrote it); {HEAL}")
        return manifest

    @classmethod
    def read(cls, path: Location) -> "Manifest":
        """`load`, but a manifest without a checksum passes (`prepare` checks it against the shards)."""
        if not exists(path):
            raise FileNotFoundError(f"{path}: no manifest; run `cbd-cache prepare` first")
        try:
            d = read_json(path)
        except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
            raise FileDamaged(f"{path} is torn (not JSON: {e}); {HEAL}") from None
        if not isinstance(d, dict):
            raise FileDamaged(f"{path} is not a manifest (a JSON {type(d).__name__}); {HEAL}")
        if d.get("checksum") and d["checksum"] != _checksum(d):
            raise FileDamaged(f"{path} was edited or damaged since prepare wrote it (its checksum does not match "
                              f"its contents); {HEAL}")
        if d.get("schema_version") != MANIFEST_SCHEMA:
            raise FileDamaged(f"{path}: manifest schema {d.get('schema_version')!r}, this cbd-cache reads "
                              f"{MANIFEST_SCHEMA}; {HEAL}")
        try:
            splits = {k: SplitInfo(**{**v, "shards": [ShardInfo(**s) for s in v["shards"]]})
                      for k, v in d.pop("splits").items()}
            manifest = cls(splits=splits, folder=parent(path), **d)
        except (KeyError, TypeError, AttributeError) as e:
            raise FileDamaged(f"{path} is not a manifest of this cbd-cache ({type(e).__name__}: {e}); {HEAL}") from None
        problem = manifest.inconsistency()
        if problem:
            raise FileDamaged(f"{path} was edited or damaged: {problem}; {HEAL}")
        return manifest

    def inconsistency(self) -> str | None:
        """What does not add up: the fingerprint against the class names and shards, the counts against them."""
        if self.fingerprint != self.compute_fingerprint():
            return "its fingerprint does not match its class names and shards"
        if "train" not in self.splits or not self.class_names:
            return "it has no training split or no class names"
        for name, split in self.splits.items():
            if len(split.class_counts) != self.num_classes:
                return f"{name} has {len(split.class_counts)} class counts for {self.num_classes} class names"
            if sum(split.class_counts) != split.num_samples:
                return f"{name}'s class counts add up to {sum(split.class_counts)}, not its {split.num_samples} samples"
            stops = [0] + [s.stop for s in split.shards]
            if [s.start for s in split.shards] != stops[:-1] or stops[-1] != split.num_samples:
                return f"{name}'s shards do not cover rows 0..{split.num_samples - 1} in order"
        return None


def _checksum(d: dict[str, Any]) -> str:
    """SHA-256 of a manifest's fields other than `checksum`, as JSON with sorted keys."""
    return hashlib.sha256(json.dumps({k: v for k, v in d.items() if k != "checksum"}, sort_keys=True).encode()).hexdigest()
