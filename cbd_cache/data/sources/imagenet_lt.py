"""ImageNet-LT and Places-LT (Liu et al. 2019): split lists of `relative/path.JPEG label` lines.

`data.root` holds `<prefix>_train.txt` (e.g. ImageNet_LT_train.txt) and, where present, `_val.txt`
and `_test.txt`, with the image paths relative to it (symlink the lists next to the images). The
classes are 0 .. max training label; a class is named after the folder of its first training image.
"""
from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from cbd_cache.data.sources.base import SPLITS, Record
from cbd_cache.data.sources.files import FileSource, clean_relpath
from cbd_cache.errors import ConfigError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg

LIST_SUFFIX = "_train.txt"


def class_names_from_paths(first_paths: dict[int, str], num_classes: int) -> list[str]:
    """Class c is called after its first training image's folder (minus a leading split folder such as
    `train/`): `n01440764`, `a/airfield`. Falls back to the numbers when that does not name them apart."""
    names = []
    for c in range(num_classes):
        parts = posixpath.dirname(first_paths.get(c, "")).split("/")
        names.append("/".join(parts[1:] if len(parts) > 1 else parts))
    if "" in names or len(set(names)) < num_classes:
        return [str(c) for c in range(num_classes)]
    return names


class SplitLists(FileSource):
    def __init__(self, cfg: DataCfg):
        super().__init__(cfg, "imagenet_lt")
        lists = sorted(self.root.glob(f"*{LIST_SUFFIX}"))
        if len(lists) != 1:
            found = ", ".join(p.name for p in lists) or "none"
            raise ConfigError(f"data.root={cfg.root}: expected one split list *{LIST_SUFFIX} such as "
                              f"ImageNet_LT_train.txt (found {found})")
        prefix = lists[0].name[:-len(LIST_SUFFIX)]
        paths = {s: self.root / f"{prefix}_{s}.txt" for s in SPLITS}
        self.splits = tuple(s for s in SPLITS if paths[s].is_file())
        lines = {s: self._parse(s, paths[s].name, paths[s].read_text()) for s in self.splits}
        labels = [label for _, _, label in lines["train"]]
        num_classes = max(labels, default=-1) + 1
        if num_classes == 0:
            raise ConfigError(f"{paths['train']}: no training lines")
        self._records: dict[str, list[Record]] = {}
        first: dict[int, str] = {}
        for s in self.splits:
            records: list[Record] = []
            for where, path, label in lines[s]:
                before = len(records)
                self.add(records, s, where, path, label, num_classes)
                if s == "train" and len(records) > before:
                    first.setdefault(label, records[-1].ref)
            self._records[s] = self.drop_missing(records, s)
        self.class_names = class_names_from_paths(first, num_classes)
        self.description["lists"] = {s: paths[s].name for s in self.splits}

    def _parse(self, split: str, name: str, text: str) -> list[tuple[str, str, int]]:
        """(where, path, label) per non-blank line; a line that is not `path label` is a label problem."""
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{name} line {n} ({line.strip()!r})"
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                self.check.problem(split, where, clean_relpath(parts[0]) or line.strip(),
                                   "expected `relative/path label` with an integer label")
                continue
            out.append((where, parts[0].strip(), int(parts[1])))
        return out

    def records(self, split: str) -> list[Record]:
        return self._records[split]
