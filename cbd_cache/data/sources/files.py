"""What the three on-disk formats share: images as files under `data.root`, keyed by their relative path.

A record's key is its path relative to `data.root` (so it is the same on every run and every
machine), with the file name's dots escaped: WebDataset splits a tar member's name at the first dot
of its file name, so `n01440764_10026.JPEG` becomes `n01440764_10026%2EJPEG`.
"""
from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbd_cache.data.sources.base import LabelCheck, Record, Source, Unreadable
from cbd_cache.data.sources.images import shard_image
from cbd_cache.errors import ConfigError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg


def path_key(rel: str) -> str:
    """A unique, stable WebDataset key for a relative path (an injective escape of the file name)."""
    folder, name = posixpath.split(rel)
    name = name.replace("%", "%25").replace(".", "%2E")
    return f"{folder}/{name}" if folder else name


def clean_relpath(path: str) -> str | None:
    """`path` as a normalised POSIX path relative to the root, or None if it leaves the root."""
    rel = posixpath.normpath(path.replace("\\", "/").lstrip("/"))
    return None if rel in (".", "") or rel.startswith("../") or rel == ".." else rel


class FileSource(Source):
    """A reader whose records are image files under `root`; subclasses list them with `add`."""

    channels = 3

    def __init__(self, cfg: DataCfg, fmt: str):
        self.root = Path(cfg.root)
        if not self.root.is_dir():
            raise ConfigError(f"data.root={cfg.root}: no such directory (data.format={fmt})")
        self.check = LabelCheck(cfg.on_error)
        self.skipped = self.check.items
        self.seen: dict[str, str] = {}          # relative path -> where it was first listed
        self.description: dict[str, Any] = {"format": fmt, "root": str(self.root)}

    def add(self, records: list[Record], split: str, where: str, path: str, label: int,
            num_classes: int | None = None) -> None:
        """Append the record for `path` unless it is a label problem (outside the root, out of range, duplicate)."""
        rel = clean_relpath(path)
        if rel is None:
            return self.check.problem(split, where, path, f"path {path!r} is outside data.root")
        if num_classes is not None and not 0 <= label < num_classes:
            return self.check.problem(split, where, rel, f"label {label} outside the class range [0, {num_classes})")
        if rel in self.seen:
            return self.check.problem(split, where, rel, f"duplicate path {rel} (first listed at {self.seen[rel]})")
        self.seen[rel] = where
        records.append(Record(path_key(rel), label, rel))

    def drop_missing(self, records: list[Record], split: str) -> list[Record]:
        """Records whose file exists; a missing one is a label problem. One directory listing per folder."""
        by_folder: dict[str, set[str]] = defaultdict(set)
        for r in records:
            by_folder[posixpath.dirname(r.ref)].add(posixpath.basename(r.ref))
        present: set[str] = set()
        for folder, names in by_folder.items():
            try:
                with os.scandir(self.root / folder) as it:
                    present.update(posixpath.join(folder, e.name) if folder else e.name
                                   for e in it if e.name in names and not e.is_dir())
            except (FileNotFoundError, NotADirectoryError):
                pass
        kept = []
        for r in records:
            if r.ref in present:
                kept.append(r)
            else:
                self.check.problem(split, self.seen[r.ref], r.ref, f"no such file {self.root / r.ref}")
        return kept

    def item(self, record: Record) -> str:
        return record.ref

    def read(self, record: Record) -> tuple[bytes, str]:
        try:
            data = (self.root / record.ref).read_bytes()
        except OSError as e:
            raise Unreadable(f"cannot read the file: {e.strerror or e}") from None
        return shard_image(data)
