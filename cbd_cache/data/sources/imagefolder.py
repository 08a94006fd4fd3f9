"""ImageFolder: `root/train/<class>/<image>`, plus `root/val/...` and `root/test/...` where they exist.

As torchvision's `ImageFolder` does, so class indices agree with it: the classes are the folders
under `train/` in sorted order (hidden ones included), and the images are the files below a class
folder, nested folders included, whose extension is one of torchvision's (`images.IMAGE_SUFFIXES`, any
case). Every other file is left out and listed in the prepare report. Unlike torchvision, a
symlinked folder is read once: a link back to a folder already read (a loop) is left out and listed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbd_cache.data.sources.base import SPLITS, Record
from cbd_cache.data.sources.files import FileSource
from cbd_cache.data.sources.images import IMAGE_SUFFIXES, is_image_file
from cbd_cache.errors import ConfigError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg



def walk_files(root: Path, top: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(every file below root/top, sorted POSIX paths relative to root; (folder, reason) of each folder
    not entered because its real path was read already: a symlink loop, or a second link to one folder)."""
    found, skipped = [], []
    seen = {os.path.realpath(root / top)}
    for folder, dirs, files in os.walk(root / top, followlinks=True):
        rel = Path(folder).relative_to(root).as_posix()
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, d))
            if real in seen:
                skipped.append((f"{rel}/{d}", f"a link to a folder already read ({real}): symlink loop or duplicate"))
            else:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        found.extend(f"{rel}/{f}" for f in files)
    return sorted(found), skipped


class ImageFolder(FileSource):
    def __init__(self, cfg: DataCfg):
        super().__init__(cfg, "imagefolder")
        if not (self.root / "train").is_dir():
            raise ConfigError(f"data.root={cfg.root}: no train/ folder; expected root/train/<class>/<image> "
                              "(and, optionally, root/val/<class>/... and root/test/<class>/...)")
        with os.scandir(self.root / "train") as it:
            self.class_names = sorted(e.name for e in it if e.is_dir())
        if not self.class_names:
            raise ConfigError(f"data.root={cfg.root}: no class folders under train/")
        index = {name: c for c, name in enumerate(self.class_names)}
        self.splits = tuple(s for s in SPLITS if (self.root / s).is_dir())
        self._records: dict[str, list[Record]] = {}
        for split in self.splits:
            records: list[Record] = []
            files, loops = walk_files(self.root, split)
            for rel, reason in loops:
                self.ignore(split, rel, reason)
            for rel in files:
                parts = rel.split("/")
                if not is_image_file(parts[-1]):
                    self.ignore(split, rel, f"not an image file: the extension is not one of {' '.join(IMAGE_SUFFIXES)}")
                elif len(parts) < 3:
                    self.check.problem(split, rel, rel, "not inside a class folder")
                elif parts[1] not in index:
                    self.check.problem(split, rel, rel, f"class folder {parts[1]!r} is not under train/, "
                                       f"so its label is outside the {len(index)} training classes")
                else:
                    self.add(records, split, rel, rel, index[parts[1]])
            self._records[split] = records

    def ignore(self, split: str, item: str, reason: str) -> None:
        """Left out as torchvision would leave it out; listed in the report, not an error."""
        entry: dict[str, Any] = {"split": split, "item": item, "where": item, "reason": reason, "kind": "ignored"}
        self.skipped.append(entry)

    def records(self, split: str) -> list[Record]:
        return self._records[split]
