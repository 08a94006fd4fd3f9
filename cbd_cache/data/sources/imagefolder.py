"""ImageFolder: `root/train/<class>/<image>`, plus `root/val/...` and `root/test/...` where they exist.

Classes are the folders under `train/`, in sorted order. Images may sit in nested folders below
their class folder. Every non-hidden file is a source item: one that is not an image is reported as
unreadable, not skipped in silence. Hidden files and folders (`.DS_Store`, `.git`) are not items.
"""
from __future__ import annotations

import os
from pathlib import Path

from ...config import ConfigError, DataCfg
from .base import SPLITS, Record
from .files import FileSource


def visible(name: str) -> bool:
    return not name.startswith(".")


def walk_files(root: Path, top: str) -> list[str]:
    """Every visible file below root/top, as sorted POSIX paths relative to root."""
    found = []
    for folder, dirs, files in os.walk(root / top, followlinks=True):
        dirs[:] = sorted(d for d in dirs if visible(d))
        rel = Path(folder).relative_to(root).as_posix()
        found.extend(f"{rel}/{f}" for f in files if visible(f))
    return sorted(found)


class ImageFolder(FileSource):
    def __init__(self, cfg: DataCfg):
        super().__init__(cfg, "imagefolder")
        if not (self.root / "train").is_dir():
            raise ConfigError(f"data.root={cfg.root}: no train/ folder; expected root/train/<class>/<image> "
                              "(and, optionally, root/val/<class>/... and root/test/<class>/...)")
        with os.scandir(self.root / "train") as it:
            self.class_names = sorted(e.name for e in it if e.is_dir() and visible(e.name))
        if not self.class_names:
            raise ConfigError(f"data.root={cfg.root}: no class folders under train/")
        index = {name: c for c, name in enumerate(self.class_names)}
        self.splits = tuple(s for s in SPLITS if (self.root / s).is_dir())
        self._records: dict[str, list[Record]] = {}
        for split in self.splits:
            records: list[Record] = []
            for rel in walk_files(self.root, split):
                parts = rel.split("/")
                if len(parts) < 3:
                    self.check.problem(split, rel, rel, "not inside a class folder")
                elif parts[1] not in index:
                    self.check.problem(split, rel, rel, f"class folder {parts[1]!r} is not under train/, "
                                       f"so its label is outside the {len(index)} training classes")
                else:
                    self.add(records, split, rel, rel, index[parts[1]])
            self._records[split] = records

    def records(self, split: str) -> list[Record]:
        return self._records[split]
