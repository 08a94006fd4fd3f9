"""What every reader provides: records per split, and one record's encoded bytes."""
from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cbd_cache.errors import DataError

SPLITS = ("train", "val", "test")   # in this order; a format has train and any of the others


class Unreadable(Exception):
    """An image that cannot go into a shard; `prepare` leaves it out and lists it in the report."""


@dataclass(frozen=True)
class Record:
    key: str      # stable, unique within the dataset; seeds each image's views, so never reuse one
    label: int
    ref: Any      # the reader's handle: an array index, a path relative to data.root


class Source(ABC):
    class_names: list[str]
    channels: int                       # 1: grey, 3: RGB; what images decode to
    splits: tuple[str, ...] = ("train", "test")
    description: dict[str, Any]         # recorded in the manifest
    skipped: list[dict[str, Any]] = []  # label problems left out under data.on_error=skip (see LabelCheck)
    balanced_train: bool = False        # the training split is a whole balanced set that data.profile cuts:
                                        # the paper table's upper bound trains on all of it

    @abstractmethod
    def records(self, split: str) -> list[Record]:
        """Every record of a split, in a stable order."""

    def summary(self) -> list[str]:
        """Lines `prepare --dry-run` adds about the source itself (a generated set: what it is made of)."""
        return []

    def item(self, record: Record) -> str:
        """How the report names a record: its file where it has one."""
        return record.key

    @abstractmethod
    def read(self, record: Record) -> tuple[bytes, str]:
        """(encoded image bytes, extension): JPEG passes through untouched, anything else becomes PNG.

        Raises `Unreadable` for an image that cannot be stored; `prepare` reports it and goes on.
        """


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class LabelCheck:
    """Label problems (bad line, label out of range, duplicate or missing path) of one source.

    `data.on_error = "stop"` raises DataError at the first, naming the offending line; `"skip"`
    leaves the item out and keeps it in `items`, which `prepare` writes to the report.
    """

    HINT = "fix the source, or add --set data.on_error=skip to leave such items out (they are reported)"

    def __init__(self, on_error: str):
        self.skip = on_error == "skip"
        self.items: list[dict[str, Any]] = []

    def problem(self, split: str, where: str, item: str, reason: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {reason}; {self.HINT}")
        self.items.append({"split": split, "item": item, "where": where, "reason": reason, "kind": "label"})

