"""The manifest: what `prepare` wrote, and the fingerprint that ties a cache to exactly this data."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cbd_cache.system.storage import Location, exists, join, parent, read_json, write_json

MANIFEST_SCHEMA = 1
EVAL_SPLITS = ("val", "test")


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
        write_json(path, d)

    @classmethod
    def load(cls, path: Location) -> "Manifest":
        if not exists(path):
            raise FileNotFoundError(f"{path}: no manifest; run `cbd-cache prepare` first")
        d = read_json(path)
        if d.get("schema_version") != MANIFEST_SCHEMA:
            raise ValueError(f"{path}: manifest schema {d.get('schema_version')}, this tool reads {MANIFEST_SCHEMA}")
        splits = {k: SplitInfo(**{**v, "shards": [ShardInfo(**s) for s in v["shards"]]})
                  for k, v in d.pop("splits").items()}
        return cls(splits=splits, folder=parent(path), **d)
