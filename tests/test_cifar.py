"""The CIFAR reader and the community's CIFAR-LT cut (Cao et al. 2019), on pickles the tests write."""
import io
import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cbd_cache.config import load_config
from cbd_cache.data.longtail import cifar_lt_counts, cifar_lt_subset
from cbd_cache.data.prepare import select_train
from cbd_cache.data.sources import Record, open_source
from cbd_cache.errors import ConfigError
from cli import main

from .conftest import ROOT, SMOKE

# Published training-set sizes (Cao et al. 2019, Table 1 setups; Zhou et al. 2020 BBN)
PUBLISHED = {(10, 10): 20431, (10, 50): 13996, (10, 100): 12406, (10, 200): 11203,
             (100, 10): 19573, (100, 50): 12608, (100, 100): 10847, (100, 200): 9502}


def write_cifar(root, classes: int, train_per_class: int, test_per_class: int, seed: int = 0):
    """A CIFAR-format folder: cifar-10-batches-py (5 train batches) or cifar-100-python (one train file)."""
    rng = np.random.default_rng(seed)
    ten = classes == 10
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if ten else b"fine_labels"

    def batch(labels):
        return {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), key: list(map(int, labels))}
    train = rng.permutation(np.repeat(np.arange(classes), train_per_class))
    test = np.repeat(np.arange(classes), test_per_class)
    parts = np.array_split(train, 5) if ten else [train]
    names = ["data_batch_%d" % (i + 1) for i in range(5)] if ten else ["train"]
    for name, labels in zip(names, parts):
        pickle.dump(batch(labels), open(folder / name, "wb"))
    pickle.dump(batch(test), open(folder / ("test_batch" if ten else "test"), "wb"))
    meta = {b"label_names" if ten else b"fine_label_names": [f"c{i}".encode() for i in range(classes)]}
    pickle.dump(meta, open(folder / ("batches.meta" if ten else "meta"), "wb"))
    return folder


@pytest.mark.parametrize("classes,factor", sorted(PUBLISHED))
def test_cifar_lt_counts_equal_the_published_profiles(classes, factor):
    counts = cifar_lt_counts(50000 // classes, factor, classes)
    assert sum(counts) == PUBLISHED[classes, factor]
    assert counts[0] == 50000 // classes and counts[-1] == int(50000 // classes / factor)


def test_prepare_cuts_cifar100_lt_at_if_100_to_the_published_class_counts():
    """Through the profile prepare applies: 500, 477, 455, ... 5 in label order, 10,847 images."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 500))
    records = [Record(f"train-{i:05d}", int(y), i) for i, y in enumerate(labels)]
    cfg = load_config(SMOKE, ["data.profile=cifar_lt", "data.imbalance_factor=100"])
    kept = select_train(records, cfg, 100)
    counts = np.bincount([r.label for r in kept], minlength=100)
    assert counts.tolist() == cifar_lt_counts(500, 100, 100) and len(kept) == 10847
    assert counts[:3].tolist() == [500, 477, 455] and counts[-1] == 5
    assert np.array_equal(np.sort([r.ref for r in kept]), cifar_lt_subset(labels, 100, 100))   # same images


def test_the_reader_gives_the_pickled_pixels_in_order(tmp_path):
    folder = write_cifar(tmp_path, 100, 3, 2)
    source = open_source(load_config(SMOKE, ["data.format=cifar", f"data.root={tmp_path}"]).data)
    assert source.class_names[:2] == ["c0", "c1"] and len(source.class_names) == 100
    assert [len(source.records(s)) for s in ("train", "test")] == [300, 200]
    raw = pickle.load(open(folder / "train", "rb"), encoding="bytes")
    first = source.records("train")[0]
    assert first.label == raw[b"fine_labels"][0]
    pixels = np.array(Image.open(io.BytesIO(source.read(first)[0])))
    assert np.array_equal(pixels, raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_a_folder_without_cifar_says_where_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match=r"no cifar-10-batches-py/ or cifar-100-python/ folder; download"):
        open_source(load_config(SMOKE, ["data.format=cifar", f"data.root={tmp_path}"]).data)


def test_dry_run_on_a_generated_cifar10_folder(tmp_path):
    write_cifar(tmp_path, 10, 50, 5)
    sets = ["data.format=cifar", f"data.root={tmp_path}", "data.profile=cifar_lt", "data.imbalance_factor=10"]
    args = ["prepare", "--dry-run", "--pipeline", str(SMOKE), "--workdir", str(tmp_path / "wd"),
            *[x for s in sets for x in ("--set", s)]]
    # CIFAR-LT keeps every image of its head class: none is left to hold out as val (smoke asks for 10 per class)
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "data.val_per_class=10: class 'c0' has 0 training images the long-tail " \
        "profile leaves out; lower data.val_per_class to 0 or less (0: no val split)" in refused.output
    result = CliRunner().invoke(main, [*args, "--set", "data.val_per_class=0"])
    assert result.exit_code == 0, result.output
    assert "val: none (data.val_per_class = 0)" in result.stdout
    total = sum(cifar_lt_counts(50, 10, 10))
    assert "images listed: train 500, test 50" in result.stdout
    assert f"training images after data.profile=cifar_lt: {total:,} in 10 classes" in result.stdout
    assert not (tmp_path / "wd").exists()


def test_the_cifar100_lt_pipeline_dry_runs_on_a_generated_cifar100_folder(tmp_path):
    write_cifar(tmp_path, 100, 20, 2)
    result = CliRunner().invoke(main, ["prepare", "--dry-run", "--pipeline", str(ROOT / "pipelines" / "cifar100_lt.toml"),
                                       "--workdir", str(tmp_path / "wd"), "--set", f"data.root={tmp_path}",
                                       "--set", "data.imbalance_factor=10"])
    assert result.exit_code == 0, result.output
    assert "images listed: train 2,000, test 200" in result.stdout
    assert f"training images after data.profile=cifar_lt: {sum(cifar_lt_counts(20, 10, 100)):,} in 100 classes" \
        in result.stdout
    assert "x K=4 teachers, d=64" in result.stdout
