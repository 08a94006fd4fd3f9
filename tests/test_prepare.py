"""`cbd-cache prepare` on the three file formats: nothing lost, JPEG untouched, resumable, and the dry run."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import JOURNAL, Journal, prepare
from cbd_cache.data.shards import iter_shard
from cbd_cache.data.sources import DataError
from cbd_cache.data.sources.files import path_key
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.storage import write_json
from cbd_cache.workdir import Workdir
from cli import main

from .conftest import ROOT, SMOKE
from .image_fixtures import (
    CLASSES,
    CORRUPT,
    FORMATS,
    MUST_SHOW_CORRUPT,
    corrupt_items,
    data_overrides,
    good_items,
    write_dataset,
)


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def shard_samples(manifest: Manifest, split: str) -> dict:
    return {s.key: s for info in manifest.splits[split].shards for s in iter_shard(manifest.shard_path(info))}


def assert_counts_add_up(manifest: Manifest) -> None:
    """listed = in shards + rejected + left out by the profile + held out as val, split by split."""
    for split, info in manifest.splits.items():
        rejected = sum(r["split"] == split for r in manifest.rejected)
        assert info.listed == info.num_samples + rejected + info.profile_dropped + info.held_out, split
        assert sum(info.class_counts) == info.num_samples == sum(s.rows for s in info.shards)


@pytest.mark.parametrize("fmt", FORMATS)
def test_three_corrupt_files_among_200_good_ones(tmp_path, fmt):
    """Must show: 200 samples in the shards, 3 named rejections, exit 0 with a warning line; JPEG bytes untouched."""
    train = good_items("train", 200) + corrupt_items("train", MUST_SHOW_CORRUPT)
    held_out = "val" if fmt == "inat" else "test"
    root = write_dataset(tmp_path / "src", fmt, {"train": train, held_out: good_items(held_out, 20, seed=1)})
    wd = tmp_path / "wd"
    result = cli("prepare", "--pipeline", str(SMOKE), "--workdir", str(wd), *sets(data_overrides(fmt, root)))
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: 3 source items left out \(3 unreadable images, 0 label problems\); listed in .*report.md",
                     result.output)
    manifest = Manifest.load(wd / "data" / "manifest.json")
    assert manifest.train.num_samples == 200 and manifest.splits[held_out].num_samples == 20
    assert manifest.source["format"] == fmt and manifest.train.listed == 203
    assert_counts_add_up(manifest)
    bad = {rel: CORRUPT[name][2] for (rel, _, _), name in zip(corrupt_items("train", MUST_SHOW_CORRUPT),
                                                               MUST_SHOW_CORRUPT)}
    assert {r["item"]: r["kind"] for r in manifest.rejected} == {rel: "unreadable" for rel in bad}
    for r in manifest.rejected:
        assert bad[r["item"]] in r["reason"].lower()
    report = (wd / "data" / "report.md").read_text()
    assert "| train | 203 | 200 | 3 | 0 | 0 |" in report and all(rel in report for rel in bad)

    samples = shard_samples(manifest, "train")
    assert len(samples) == 200
    jpegs = 0
    for rel, label, data in good_items("train", 200):
        sample = samples[path_key(rel)]
        assert manifest.class_names[sample.label] == CLASSES[label] and sample.ext == ("jpg" if rel.endswith(".JPEG") else "png")
        assert hashlib.sha256(sample.data).hexdigest() == hashlib.sha256((root / rel).read_bytes()).hexdigest()
        jpegs += sample.ext == "jpg"
    assert jpegs == 100


def test_every_unreadable_kind_is_reported_and_a_cmyk_jpeg_is_kept(tmp_path):
    from PIL import Image

    from .image_fixtures import encode

    cmyk = ("train/cat/cmyk.jpg", 0, encode(Image.new("CMYK", (9, 7), (0, 50, 100, 10)), "JPEG"))
    train = good_items("train", 30) + corrupt_items("train", tuple(CORRUPT)) + [cmyk]
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": train, "test": good_items("test", 5, seed=1)})
    manifest = prepare(load_config(SMOKE, data_overrides("imagefolder", root)), Workdir(tmp_path / "wd"))
    assert manifest.train.num_samples == 31 and len(manifest.rejected) == len(CORRUPT)
    for (rel, _, _), name in zip(corrupt_items("train", tuple(CORRUPT)), CORRUPT):
        reason = next(r["reason"] for r in manifest.rejected if r["item"] == rel)
        assert CORRUPT[name][2].lower() in reason.lower(), (name, reason)
    assert shard_samples(manifest, "train")[path_key(cmyk[0])].data == cmyk[2]
    assert_counts_add_up(manifest)


def test_label_problem_stops_prepare_with_the_line_unless_skipped(tmp_path):
    root = write_dataset(tmp_path / "src", "imagenet_lt", {"train": good_items("train", 40),
                                                           "test": good_items("test", 10, seed=1)})
    with open(root / "Fixture_LT_test.txt", "a") as f:
        f.write("test/cat/img.0000.JPEG 12\n")
    wd = tmp_path / "wd"
    args = ["prepare", "--pipeline", str(SMOKE), "--workdir", str(wd), *sets(data_overrides("imagenet_lt", root))]
    result = cli(*args)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("cbd-cache: error: Fixture_LT_test.txt line 11 ('test/cat/img.0000.JPEG 12'): label 12 "
                           "outside the class range [0, 5)") and "data.on_error=skip" in line
    assert not wd.exists()
    result = cli(*args, "--set", "data.on_error=skip")
    assert result.exit_code == 0 and "warning: 1 source items left out (0 unreadable images, 1 label problems)" \
        in result.output
    manifest = Manifest.load(wd / "data" / "manifest.json")
    assert manifest.splits["test"].listed == 11 and manifest.splits["test"].num_samples == 10
    assert manifest.rejected[0]["kind"] == "label" and "line 11" in manifest.rejected[0]["where"]
    assert_counts_add_up(manifest)


def test_killed_prepare_resumes_to_the_same_fingerprint(tmp_path):
    """Must show: kill -9 mid-way, re-run, same manifest fingerprint as an uninterrupted prepare."""
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": good_items("train", 200),
                                                           "test": good_items("test", 30, seed=1)})
    overrides = data_overrides("imagefolder", root)
    reference = prepare(load_config(SMOKE, overrides), Workdir(tmp_path / "ref"))
    assert len(reference.train.shards) == 4

    # The copy has a FIFO where shard 2's first image should be: reading it blocks, so the killed
    # prepare has provably written shards 0 and 1 and no more. No timing guesses.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    info = reference.train.shards[2]
    first = next(iter_shard(reference.shard_path(info))).key
    blocker = copy / {path_key(rel): rel for rel, _, _ in good_items("train", 200)}[first]
    original = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    wd = tmp_path / "wd"
    args = [str(Path(sys.executable).parent / "cbd-cache"), "prepare", "--pipeline", str(SMOKE), "--workdir", str(wd),
            *sets(data_overrides("imagefolder", copy)), "--set", "pipeline.workers=2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    journal = wd / "data" / JOURNAL
    deadline = time.monotonic() + 120
    try:
        while not (journal.is_file() and len(journal.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)   # it cannot pass the FIFO; give it the chance to write more if it (wrongly) could
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the parent and its reader processes, one blocked on the FIFO
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(journal.read_text().splitlines()) == 3 and not (wd / "data" / "manifest.json").exists()
    written = {p: p.stat().st_mtime_ns for p in (wd / "data").glob("train-00000[01].tar")}
    assert len(written) == 2

    blocker.unlink()
    blocker.write_bytes(original)
    result = cli("prepare", "--pipeline", str(SMOKE), "--workdir", str(wd), *sets(data_overrides("imagefolder", copy)))
    assert result.exit_code == 0, result.output
    assert "[prepare train] resuming after shard 1: 128/200 records done" in result.output
    assert {p: p.stat().st_mtime_ns for p in written} == written   # the finished shards were not written again
    resumed = Manifest.load(wd / "data" / "manifest.json")
    assert resumed.fingerprint == reference.fingerprint
    assert not journal.exists() and not list((wd / "data").glob(".*partial"))


def test_journal_keeps_intact_entries_only(tmp_path):
    header = {"data_config": {"a": 1}, "plan": "p"}
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"x" * 10)
    entry = {"split": "train", "name": shard.name, "start": 0, "stop": 1, "sha256": "h", "bytes": 10, "next": 1,
             "rejected": []}
    (tmp_path / JOURNAL).write_text(json.dumps({"header": header}) + "\n" + json.dumps(entry) + "\n"
                                    + json.dumps({**entry, "name": None, "next": 2}) + "\n" + '{"split": "tr')
    journal = Journal(tmp_path / JOURNAL, header)
    journal.close()
    assert [e["next"] for e in journal.entries] == [1, 2]        # the torn last line is dropped
    shard.write_bytes(b"x" * 9)                                   # a shard that changed size is redone
    assert Journal(tmp_path / JOURNAL, header).entries == []
    assert Journal(tmp_path / JOURNAL, {**header, "plan": "q"}).entries == []   # other data: start again


def test_preparing_again_removes_stale_shards_and_a_dataset_needs_a_held_out_split(tmp_path):
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": good_items("train", 100),
                                                           "val": good_items("val", 5, seed=1)})
    wd = Workdir(tmp_path / "wd")
    overrides = data_overrides("imagefolder", root)
    assert len(prepare(load_config(SMOKE, overrides), wd).train.shards) == 2
    manifest = prepare(load_config(SMOKE, [*overrides, "data.shard_size=100"]), wd)
    assert sorted(p.name for p in wd.data.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert manifest.train.num_samples == 100
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="no val or test split to evaluate on"):
        prepare(load_config(SMOKE, [*overrides, "data.seed=1"]), wd)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": good_items("train", 103),
                                                           "val": good_items("val", 10, seed=1)})
    wd = tmp_path / "wd"
    result = cli("prepare", "--dry-run", "--pipeline", str(SMOKE), "--workdir", str(wd),
                 *sets(data_overrides("imagefolder", root)))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "images listed: train 103, val 10" in out
    assert "16..31 images       5 classes" in out and "all, largest first: cat 21, dog 21, owl 21, eel 20, yak 20" in out
    assert "shards: train 2, val 1 (64 images each" in out
    # 103 rows x A=2 x (2 teachers x 64 x 2 bytes + 5 x 4 bytes) = 56,856 bytes
    assert re.search(r"cache: [\d.]+ KiB for N=103 x A=2 views \(uniform allocation: 2..2 per image\) x K=2 teachers, "
                     r"d=64, float16", out)
    assert re.search(r"export 2 x resnet8: [\d,]+ img/s measured on cpu .*\nexport estimate: \d+", out)
    int8 = cli("prepare", "--dry-run", "--pipeline", str(SMOKE), "--workdir", str(wd),
               *sets([*data_overrides("imagefolder", root), "export.dtype=int8"]))   # was a KeyError
    assert int8.exit_code == 0 and "x K=2 teachers, d=64, int8" in int8.stdout, int8.output
    assert not wd.exists()


def test_projected_cache_size_matches_an_exported_cache(smoke_workdir):
    import zarr

    from cbd_cache.data.shards import read_labels
    from cbd_cache.tools.dryrun import projected_cache_bytes

    manifest = Manifest.load(smoke_workdir.manifest)
    group = zarr.open_group(str(smoke_workdir.cache), mode="r")
    labels = read_labels(manifest, "train")
    for overrides in ((), ("export.dtype=int8", "export.logits=true")):   # int8 adds scales; logits stay float16
        projected = projected_cache_bytes(load_config(SMOKE, overrides), labels, manifest.train.class_counts)
        assert set(projected) >= {"views", "view_count", "view_offset", "teachers/std0/descriptors"}
        if not overrides:
            assert projected == {name: group[name].nbytes for name in projected}
        else:
            assert projected["teachers/std0/scales"] == group["views"].shape[0] * 2
            assert projected["teachers/std0/descriptors"] == group["teachers/std0/descriptors"].nbytes // 2
            assert projected["teachers/std0/logits"] == group["views"].shape[0] * manifest.num_classes * 2


def test_evaluation_reports_every_held_out_split(tmp_path):
    """val and test each get top-1 and many / medium / few, with the groups from the training counts."""
    from cbd_cache.models.checkpoints import network_spec, save_checkpoint
    from cbd_cache.models.networks import Network
    from cbd_cache.stages.evaluate import evaluate_workdir
    from cbd_cache.system.runtime import make_runtime

    root = write_dataset(tmp_path / "src", "imagefolder", {"train": good_items("train", 60),
                                                           "val": good_items("val", 10, seed=1),
                                                           "test": good_items("test", 15, seed=2)})
    cfg = load_config(SMOKE, [*data_overrides("imagefolder", root), "views.image_px=12"])
    wd = Workdir(tmp_path / "wd")
    manifest = prepare(cfg, wd)
    assert manifest.eval_splits == ["val", "test"] and manifest.eval_split == "test"
    net = Network("resnet8", 3, manifest.num_classes, 20.0)
    save_checkpoint(wd.teacher_checkpoint("std0"), net, network_spec(net, "resnet8", 3, manifest.num_classes, 20.0),
                    {"name": "std0"})
    write_json(wd.teacher_dir("std0") / "run.json", {"checkpoint_sha256": file_sha256(wd.teacher_checkpoint("std0"))})
    rows = evaluate_workdir(cfg, wd, make_runtime(cfg.pipeline))
    assert [r["model"] for r in rows] == ["std0"]
    assert rows[0]["splits"]["val"]["num_test"] == 10 and rows[0]["splits"]["test"]["num_test"] == 15
    assert rows[0]["num_test"] == 15 and rows[0]["groups"] == ["few"] * 5 and rows[0]["few"] is not None
    md = wd.results_md.read_text()
    assert "## val (10 images)" in md and "## test (15 images)" in md and md.count("| std0 | teacher (standard) |") == 2
    saved = json.loads(wd.results_json.read_text())[0]["splits"]
    assert set(saved) == {"val", "test"} and set(saved["val"]) == {"top1", "many", "medium", "few", "ece"}
    folder = wd.teacher_dir("std0")       # calibration and per class, beside eval.json
    assert 0 <= saved["test"]["ece"] <= 100 and (folder / "reliability.png").stat().st_size > 5000
    lines = (folder / "per_class.csv").read_text().splitlines()
    assert lines[0] == "class,name,train_count,group,accuracy" and len(lines) == 1 + manifest.num_classes
    assert lines[1].split(",")[:4] == ["0", f'"{manifest.class_names[0]}"', str(manifest.train.class_counts[0]), "few"]


def test_a_class_left_without_training_images_and_one_class_data_are_warned(tmp_path, capfd):
    train = [item for item in good_items("train", 20) if item[1] != 4] + [("train/eel/broken.png", 4, b"junk")]
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": train, "test": good_items("test", 5, seed=1)})
    manifest = prepare(load_config(SMOKE, data_overrides("imagefolder", root)), Workdir(tmp_path / "wd"))
    assert manifest.train.class_counts[manifest.class_names.index("eel")] == 0
    assert "warning: 1 class(es) have no training image (eel): no model can learn them" in capfd.readouterr().err
    one = write_dataset(tmp_path / "one", "imagefolder", {"train": [i for i in good_items("train", 10) if i[1] == 0],
                                                          "test": [i for i in good_items("test", 5) if i[1] == 0]})
    prepare(load_config(SMOKE, data_overrides("imagefolder", one)), Workdir(tmp_path / "wd1"))
    assert "warning: the data has one class ('cat')" in capfd.readouterr().err


@pytest.mark.parametrize("name,fmt", [("imagenet_lt_official", "imagenet_lt"), ("inat18_official", "inat")])
def test_official_recipes_pass_the_dry_run(tmp_path, name, fmt):
    """The official code's recipes as shipped (batch 128, lr 0.05, SimCLR-style data-aug teachers) plan cleanly
    on a small dataset of their format; only the data location and a small timing batch are set."""
    root = write_dataset(tmp_path / "src", fmt, {"train": good_items("train", 40), "val": good_items("val", 10, seed=1)})
    pipeline = ROOT / "pipelines" / f"{name}.toml"
    cfg = load_config(pipeline)
    assert [(t.batch_size, t.lr, t.aug_style) for t in cfg.teachers if t.type == "data_aug"] == [(128, 0.05, "official")] * 2
    assert (cfg.student.batch_size, cfg.student.lr) == (128, 0.05)
    wd = tmp_path / "wd"
    result = cli("prepare", "--dry-run", "--pipeline", str(pipeline), "--workdir", str(wd),
                 "--set", f"data.root={root}", "--set", "export.batch_size=2")
    assert result.exit_code == 0, result.output
    assert "images listed: train 40, val 10" in result.stdout and "K=4 teachers, d=2048" in result.stdout
    assert not wd.exists()


def test_max_short_px_stores_photos_at_a_bounded_size(tmp_path):
    """data.max_short_px: larger images are stored resized to it (another fingerprint), smaller ones byte for byte;
    `predict` bounds a file the same way, so it sees what the shards hold."""
    import io

    import numpy as np
    from PIL import Image

    from cbd_cache.data.shards import decode_image
    from cbd_cache.data.sources import Record
    from cbd_cache.data.sources.images import bound_image
    from cbd_cache.data.sources.images import bounded as bounded_source
    from cbd_cache.tools.predict import ImageFiles
    from cbd_cache.views import ViewSpec

    def stored(bound: int) -> tuple[Manifest, list]:
        cfg = load_config(SMOKE, ("data.image_px=40", f"data.max_short_px={bound}"))
        wd = Workdir(tmp_path / f"b{bound}")
        prepare(cfg, wd)
        manifest = Manifest.load(wd.manifest)
        return manifest, [s for sh in manifest.train.shards for s in iter_shard(manifest.shard_path(sh))]
    whole, samples = stored(0)
    small, bounded = stored(24)
    assert small.fingerprint != whole.fingerprint and [s.key for s in samples] == [s.key for s in bounded]
    assert all(decode_image(s.data, 3).shape == (3, 40, 40) for s in samples)
    assert all(decode_image(s.data, 3).shape == (3, 24, 24) for s in bounded)
    assert all(decode_image(s.data, 3).shape == (3, 40, 40) for s in stored(40)[1])   # not larger: unchanged
    rgb = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    assert decode_image(bound_image(buf.getvalue(), "jpg", 20), 3).shape == (3, 20, 40)
    assert bound_image(buf.getvalue(), "jpg", 30) == buf.getvalue()
    (tmp_path / "x.jpg").write_bytes(buf.getvalue())
    spec = ViewSpec(16, (0.35, 1), (0.75, 4 / 3), True, 0)
    read, _ = bounded_source(ImageFiles(3), 20).read(Record("0", 0, str(tmp_path / "x.jpg")))   # what predict reads
    assert torch.equal(view_of_bytes(read, spec), view_of_bytes(bound_image(buf.getvalue(), "jpg", 20), spec))


def view_of_bytes(data: bytes, spec) -> "torch.Tensor":
    from cbd_cache.data.shards import decode_image
    from cbd_cache.views import eval_view
    return eval_view(decode_image(data, 3), spec)


def test_a_val_split_is_held_out_of_the_images_the_long_tail_cut_leaves_out():
    """Balanced, disjoint from the training set (which is the cut it would be without val), seeded; refused when a
    class has too few left out; not made where the profile keeps everything or the source has its own val."""
    from cbd_cache.data.prepare import plan_splits, val_origin
    from cbd_cache.data.sources import open_source

    cfg = load_config(SMOKE, ["data.val_per_class=7"])
    plans = plan_splits(open_source(cfg.data), cfg)
    train, val = plans["train"], plans["val"]
    assert list(plans) == ["train", "val", "test"]
    assert {r.key for r in train.records}.isdisjoint(r.key for r in val.records)
    assert [sum(r.label == c for r in val.records) for c in range(10)] == [7] * 10
    assert train.held_out == 70 and val.listed == 70 and train.listed == train.profile_dropped + 70 + len(train.records)
    assert [r.key for r in val.records] == [r.key for r in plan_splits(open_source(cfg.data), cfg)["val"].records]
    assert "held out of the source's training images" in val_origin(open_source(cfg.data), cfg)
    fmnist = load_config(ROOT / "pipelines" / "fashion_mnist_lt.toml", ["data.val_per_class=5000"])
    with pytest.raises(DataError, match=r"data.val_per_class=5000: class '.+' has 4720 training images the long-tail "
                                        r"profile leaves out; lower data.val_per_class to 4720 or less"):
        plan_splits(open_source(fmnist.data), fmnist)     # the 1280-image class has 6000 - 1280 left
    kept_all = load_config(SMOKE, ["data.val_per_class=7", "data.profile=none"])
    assert "val" not in plan_splits(open_source(kept_all.data), kept_all)
    assert "data.profile=none keeps every training image" in val_origin(open_source(kept_all.data), kept_all)
