"""iNaturalist 2017 / 2018 (and later years): COCO-style `train<year>.json` and `val<year>.json`.

Each file has `images` (id, file_name relative to `data.root`), `annotations` (image_id,
category_id; one per image) and `categories` (id, name). Classes are the training file's
categories in id order, so class c is category id c where the ids run 0..C-1 (as in 2017 and 2018).
The test files carry no labels and are not read; iNaturalist reports accuracy on val.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbd_cache.data.sources.base import Record
from cbd_cache.data.sources.files import FileSource
from cbd_cache.errors import ConfigError

if TYPE_CHECKING:   # a type only
    from cbd_cache.config import DataCfg


class INaturalist(FileSource):
    def __init__(self, cfg: DataCfg):
        super().__init__(cfg, "inat")
        trains = sorted(self.root.glob("train[0-9][0-9][0-9][0-9].json"))
        if len(trains) != 1:
            found = ", ".join(p.name for p in trains) or "none"
            raise ConfigError(f"data.root={cfg.root}: expected one train<year>.json such as train2018.json (found {found})")
        year = trains[0].stem.removeprefix("train")
        files = {"train": trains[0], "val": self.root / f"val{year}.json"}
        files = {s: p for s, p in files.items() if p.is_file()}
        self.splits = tuple(files)
        train = load_coco(files["train"])
        categories = sorted(train["categories"], key=lambda c: c["id"])
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.class_index = {c["id"]: i for i, c in enumerate(categories)}
        self._records = {s: self._parse(s, p.name, train if s == "train" else load_coco(p)) for s, p in files.items()}
        self.description["files"] = {s: p.name for s, p in files.items()}

    def _parse(self, split: str, name: str, coco: dict[str, Any]) -> list[Record]:
        """One record per image with exactly one annotation of a known category; anything else is a label problem."""
        by_image: dict[Any, list[Any]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a.get("image_id"), []).append(a.get("category_id"))
        records: list[Record] = []
        ids = set()
        for i, img in enumerate(coco["images"]):
            iid, path = img.get("id"), img.get("file_name")
            where = f"{name} images[{i}] (id {iid}, {path!r})"
            if not isinstance(path, str):
                self.check.problem(split, where, f"images[{i}]", "no file_name")
                continue
            if iid in ids:
                self.check.problem(split, where, path, f"duplicate image id {iid}")
                continue
            ids.add(iid)
            cats = by_image.get(iid, [])
            if len(cats) != 1:
                self.check.problem(split, where, path, f"{len(cats)} annotations, expected 1")
                continue
            if cats[0] not in self.class_index:
                self.check.problem(split, where, path, f"category_id {cats[0]} outside the class range "
                                   f"(not among the {len(self.class_index)} categories of the training file)")
                continue
            self.add(records, split, where, path, self.class_index[cats[0]])
        listed = {img.get("id") for img in coco["images"]}
        for i, a in enumerate(coco["annotations"]):
            if a.get("image_id") not in listed:
                self.check.problem(split, f"{name} annotations[{i}]", f"annotations[{i}]",
                                   f"image_id {a.get('image_id')!r} has no entry in images")
        return self.drop_missing(records, split)

    def records(self, split: str) -> list[Record]:
        return self._records[split]


def load_coco(path: Path) -> dict[str, Any]:
    try:
        coco = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ConfigError(f"{path}: not a COCO-style file (no `{key}` list)")
    return coco
