"""Expected faults end in one line and the right exit code; a bug keeps its traceback; --debug shows it."""
import errno
import os

import pytest
from click.testing import CliRunner

import cli
from cbd_cache import errors, pipeline
from cbd_cache.config import load_config
from cbd_cache.data.sources.imagefolder import ImageFolder

from .conftest import SMOKE
from .image_fixtures import data_overrides, good_items, write_dataset


def run(monkeypatch, exc, *flags):
    def fail(*args, **kwargs):
        raise exc
    monkeypatch.setattr(pipeline, "prepare", fail)
    return CliRunner().invoke(cli.main, [*flags, "prepare", "--pipeline", str(SMOKE), "--workdir", "/tmp/my runs/w"])


@pytest.mark.parametrize("exc, code, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/tmp/my runs/w/data/x.tar"), 1,
     ["no space left", "'/tmp/my runs/w/data/x.tar'", "run the same command again"]),
    (OSError(errno.EROFS, "Read-only file system", "/tmp/my runs/w/data"), 2,
     ["cannot write '/tmp/my runs/w/data' (Read-only file system)", "writable --workdir"]),
    (PermissionError(errno.EACCES, "Permission denied", "/tmp/my runs/w"), 2, ["cannot write", "Permission denied"]),
    (KeyboardInterrupt(), 130, ["interrupted by SIGINT: prepare stopped", "run the same command again"]),
])
def test_expected_faults_are_one_line(monkeypatch, exc, code, words):
    result = run(monkeypatch, exc)
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbd-cache: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_debug_shows_the_traceback_and_a_bug_keeps_it(monkeypatch):
    result = run(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/x"), "--debug")
    assert isinstance(result.exception, OSError) and result.exit_code == 1 and "cbd-cache: error" not in result.stderr
    result = run(monkeypatch, ZeroDivisionError("a bug"))
    assert isinstance(result.exception, ZeroDivisionError)   # not swallowed into one line


def test_a_worker_reraised_error_prints_its_original_message():
    wrapped = RuntimeError("Caught ShardDamaged in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in f\ncbd_cache.errors.ShardDamaged: "
                           "W/data/train-000001.tar: the shard is missing; run `cbd-cache prepare`\n")
    assert errors.one_line(wrapped) == "W/data/train-000001.tar: the shard is missing; run `cbd-cache prepare`"


def test_imagefolder_follows_torchvision_and_reads_each_folder_once(tmp_path):
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": good_items("train", 10),
                                                           "test": good_items("test", 5, seed=1)})
    (root / "train" / ".hidden").mkdir()                           # torchvision counts hidden class folders
    (root / "train" / ".hidden" / "a.PNG").write_bytes((root / "train" / "cat" / "img.0000.JPEG").read_bytes())
    (root / "train" / "cat" / "m.png.bak").write_bytes(b"backup")   # not an image extension
    (root / "train" / "cat" / "README").write_bytes(b"notes")
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "loop")   # a loop: read once
    source = ImageFolder(load_config(SMOKE, data_overrides("imagefolder", root)).data)
    assert source.class_names == sorted(["cat", "dog", "owl", "yak", "eel", ".hidden"])
    try:
        from torchvision.datasets.folder import find_classes
        assert source.class_names == find_classes(str(root / "train"))[0]
    except ImportError:  # pragma: no cover
        pass
    refs = [r.ref for r in source.records("train")]
    assert len(refs) == 11 and "train/.hidden/a.PNG" in refs and not any("/loop/" in r for r in refs)
    ignored = {s["item"]: s["reason"] for s in source.skipped}
    assert set(ignored) == {"train/cat/m.png.bak", "train/cat/README", "train/cat/loop"}
    assert "symlink loop" in ignored["train/cat/loop"] and "not an image file" in ignored["train/cat/README"]
