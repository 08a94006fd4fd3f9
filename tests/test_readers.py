"""Readers: what a shard stores for each kind of image file, record keys, and each format's label problems."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from cbd_cache.config import FORMATS, load_config
from cbd_cache.data.shards import Sample, ShardWriter, decode_image, iter_shard
from cbd_cache.data.sources import READERS, DataError, Unreadable, open_source
from cbd_cache.data.sources.files import clean_relpath, path_key
from cbd_cache.data.sources.images import shard_image

from .conftest import SMOKE
from .image_fixtures import CLASSES, CORRUPT, encode, good_items, jpeg, pixels, write_dataset


def source_for(fmt, root, *overrides):
    return open_source(load_config(SMOKE, [f"data.format={fmt}", f"data.root={root}", *overrides]).data)


# ------------------------------------------------------------------------------ image bytes
def test_the_config_offers_exactly_the_formats_that_have_a_reader():
    """config names the formats (it imports nothing above it); READERS must implement exactly those."""
    assert set(READERS) == set(FORMATS)


def test_jpeg_bytes_pass_through_untouched_even_cmyk_and_grey():
    for data in (jpeg(1), encode(Image.new("CMYK", (9, 7), (0, 50, 100, 10)), "JPEG"),
                 encode(Image.fromarray(pixels(2, channels=1)), "JPEG")):
        stored, ext = shard_image(data)
        assert ext == "jpg" and hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
        assert decode_image(stored, 3).shape[0] == 3      # CMYK and grey decode to RGB for the networks


def test_other_formats_become_lossless_png():
    rgb = pixels(3)
    png = encode(Image.fromarray(rgb), "PNG")
    assert shard_image(png) == (png, "png")               # PNG passes through
    for fmt in ("BMP", "TIFF", "PPM", "WEBP"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        stored, ext = shard_image(encode(Image.fromarray(rgb), fmt, **kw))
        assert ext == "png" and stored.startswith(b"\x89PNG")
        assert np.array_equal(decode_image(stored, 3).permute(1, 2, 0).numpy(), rgb), fmt
    palette = Image.fromarray(rgb).convert("P")
    stored, _ = shard_image(encode(palette, "GIF"))
    assert np.array_equal(np.asarray(Image.open(__import__("io").BytesIO(stored)).convert("RGB")),
                          np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_unreadable_images_are_refused_with_their_reason(name):
    make, _, word = CORRUPT[name]
    with pytest.raises(Unreadable, match=f"(?i){word}"):
        shard_image(make())


def test_a_jpeg_cut_inside_its_pixel_data_is_refused():
    data = encode(Image.fromarray(pixels(4, px=96)), "JPEG", quality=95)
    with pytest.raises(Unreadable, match="truncated"):
        shard_image(data[: int(len(data) * 0.7)])


def test_16_bit_tiff_is_refused():
    with pytest.raises(Unreadable, match="16-bit"):
        shard_image(encode(Image.fromarray(np.full((6, 6), 1000, np.uint16)), "TIFF"))


# ------------------------------------------------------------------------------ keys
def test_keys_are_relative_paths_that_survive_a_shard(tmp_path):
    paths = ["train/n01/n01_1.JPEG", "train/n01/n01%2E1.JPEG", "train/a.b/x.tar.gz.png", "x.jpg", "train/n01/n01_1"]
    keys = [path_key(p) for p in paths]
    assert len(set(keys)) == len(keys) and keys[0] == "train/n01/n01_1%2EJPEG"
    writer = ShardWriter(tmp_path / "s.tar")
    for row, key in enumerate(keys):
        writer.write(Sample(key, row, row, jpeg(row), "jpg"))
    writer.close()
    assert [s.key for s in iter_shard(tmp_path / "s.tar")] == keys
    assert clean_relpath("/data_256/a/x.jpg") == "data_256/a/x.jpg" and clean_relpath("../x.jpg") is None


# ------------------------------------------------------------------------------ formats
def small(split, n=10, seed=0):
    return good_items(split, n, seed)


def test_imagefolder_lists_nested_files_and_leaves_out_what_torchvision_does(tmp_path):
    root = write_dataset(tmp_path / "d", "imagefolder", {"train": small("train", 16), "test": small("test", 5, 1)})
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / ".hidden").mkdir()
    src = source_for("imagefolder", root)
    assert src.splits == ("train", "test") and src.class_names == sorted([*CLASSES, ".hidden"])   # as torchvision
    assert [(p["item"], p["kind"]) for p in src.skipped] == [("train/cat/.DS_Store", "ignored")]
    recs = src.records("train")
    assert len(recs) == 16 and all(r.ref.startswith("train/") and ".DS_Store" not in r.ref for r in recs)
    assert any(r.ref.count("/") == 4 for r in recs)                      # nested below the class folder
    assert {src.class_names[r.label] for r in recs} == {r.ref.split("/")[1] for r in recs}
    assert [r.key for r in recs] == [r.key for r in source_for("imagefolder", root).records("train")]   # stable


def test_imagefolder_label_problems(tmp_path):
    root = write_dataset(tmp_path / "d", "imagefolder", {"train": small("train"), "val": small("val", 5, 1)})
    (root / "val" / "gnu").mkdir()
    (root / "val" / "gnu" / "x.jpg").write_bytes(jpeg(5))
    with pytest.raises(DataError, match=r"val/gnu/x.jpg: class folder 'gnu' is not under train/.*on_error=skip"):
        source_for("imagefolder", root)
    (root / "train" / "loose.jpg").write_bytes(jpeg(6))
    src = source_for("imagefolder", root, "data.on_error=skip")
    assert sorted(p["item"] for p in src.skipped) == ["train/loose.jpg", "val/gnu/x.jpg"]
    assert len(src.records("train")) == 10 and len(src.records("val")) == 5


def test_split_lists_read_imagenet_lt_and_places_lt_lines(tmp_path):
    root = write_dataset(tmp_path / "d", "imagenet_lt", {"train": small("train"), "val": small("val", 5, 1),
                                                         "test": small("test", 5, 2)})
    src = source_for("imagenet_lt", root)
    assert src.splits == ("train", "val", "test") and src.class_names == CLASSES
    assert [r.ref for r in src.records("train")] == [rel for rel, _, _ in small("train")]   # file order
    # Places-LT style: a leading slash, a first folder that is not a split; names from the folders
    (root / "Fixture_LT_train.txt").write_text("".join(f"/{rel} {label}\n" for rel, label, _ in small("train")))
    assert [r.label for r in source_for("imagenet_lt", root).records("train")] == [lb for _, lb, _ in small("train")]


@pytest.mark.parametrize("line, message", [
    ("val/cat/img.0000.JPEG 7", r"line 6 \('val/cat/img.0000.JPEG 7'\): label 7 outside the class range \[0, 5\)"),
    ("val/cat/img.0000.JPEG", r"line 6 .*expected `relative/path label`"),
    ("train/cat/img.0000.JPEG 0", r"line 6 .*duplicate path train/cat/img.0000.JPEG \(first listed at "
                                  r"Fixture_LT_train.txt line 1"),
    ("val/cat/missing.jpg 0", r"line 6 .*no such file .*val/cat/missing.jpg"),
])
def test_split_list_label_problems_stop_with_the_line(tmp_path, line, message):
    root = write_dataset(tmp_path / "d", "imagenet_lt", {"train": small("train"), "val": small("val", 5, 1)})
    with open(root / "Fixture_LT_val.txt", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=f"Fixture_LT_val.txt {message}"):
        source_for("imagenet_lt", root)
    src = source_for("imagenet_lt", root, "data.on_error=skip")
    assert len(src.skipped) == 1 and src.skipped[0]["split"] == "val" and len(src.records("val")) == 5


def test_inat_json_classes_from_categories_and_label_problems(tmp_path):
    root = write_dataset(tmp_path / "d", "inat", {"train": small("train"), "val": small("val", 5, 1)})
    src = source_for("inat", root)
    assert src.splits == ("train", "val") and src.class_names == CLASSES
    assert [r.label for r in src.records("val")] == [lb for _, lb, _ in small("val", 5, 1)]
    coco = json.loads((root / "val2018.json").read_text())
    coco["annotations"][0]["category_id"] = 42                       # a category the training file lacks
    coco["images"].append({"id": 900, "file_name": "val/cat/ghost.jpg"})   # no annotation
    coco["images"].append({"id": 901, "file_name": coco["images"][1]["file_name"]})
    coco["annotations"].append({"id": 901, "image_id": 901, "category_id": 0})
    (root / "val2018.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"val2018.json images\[0\] .*category_id 42 outside the class range"):
        source_for("inat", root)
    src = source_for("inat", root, "data.on_error=skip")
    reasons = [p["reason"] for p in src.skipped]
    assert len(reasons) == 3 and "0 annotations, expected 1" in reasons[1] and "duplicate path" in reasons[2]
    assert len(src.records("val")) == 4


def test_missing_inat_image_is_a_label_problem(tmp_path):
    root = write_dataset(tmp_path / "d", "inat", {"train": small("train")})
    (root / small("train")[3][0]).unlink()
    with pytest.raises(DataError, match=r"train2018.json images\[3\] .*no such file"):
        source_for("inat", root)


def test_format_errors_name_the_key(tmp_path):
    from cbd_cache.errors import ConfigError

    for fmt, word in (("imagenet_lt", "_train.txt"), ("inat", "train<year>.json"), ("imagefolder", "train/")):
        with pytest.raises(ConfigError, match=f"data.root=.*{word}"):
            source_for(fmt, tmp_path)
    with pytest.raises(ConfigError, match="data.on_error='maybe'"):
        load_config(SMOKE, ["data.on_error=maybe"])
