"""Damage tried as a user would, training through the CLI in a subprocess.

The cache: a chunk deleted, truncated, byte-flipped or rewritten as another dtype (with a valid
checksum), an array's metadata deleted or retyped, a views chunk deleted. The data: a shard
truncated, deleted or with a byte flipped, and a PNG that PIL accepts but libpng kills its process on.

In every case no stage trains or evaluates with exit 0, no process segfaults, no traceback is
printed (one `cbd-cache: error:` line names the array or shard and the repair), `cache verify`
reports cache damage with exit 1, and the named repair (`cbd-cache export --repair`, `cbd-cache
prepare`) restores the cache or shards bit-identical to the undamaged ones.
"""
import hashlib
import io
import json
import struct
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import iter_shard
from cli import main

from .cli_faults import batch, case, error_line, hashes
from .conftest import ROOT, SMOKE
from .image_fixtures import data_overrides, good_items, write_dataset


def cbd(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result, *words):
    """Failed (not 0, not a signal), no traceback, and exactly one error line, the last, naming `words`."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cbd-cache: error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]


def data_files(wd) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((wd.root / "data").iterdir())}


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete(path):
    path.unlink()


def flip_image_byte(path):
    """One byte inside the first image's data: the tar stays well formed, only the content hash can tell."""
    data = bytearray(path.read_bytes())
    first = next(iter_shard(path))
    at = bytes(data).index(first.data) + len(first.data) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, delete, flip_image_byte])
def test_a_damaged_shard_stops_training_and_prepare_rebuilds_it(smoke_copy, damage):
    wd = smoke_copy
    common = ["--pipeline", str(SMOKE), "--workdir", str(wd.root)]
    before = data_files(wd)
    manifest = Manifest.load(wd.manifest)
    train_shard, test_shard = manifest.train.shards[1].name, manifest.splits["test"].shards[0].name
    damage(wd.root / "data" / train_shard)
    result = cbd("train-student", *common, "--set", "student.epochs=1")
    assert_one_line_error(result, train_shard, "cbd-cache prepare")
    assert not (wd.root / "students" / "student_epochs=1" / "checkpoint.pt").exists()

    damage(wd.root / "data" / test_shard)   # evaluation reads the test shards (eval.json reuse aside)
    (wd.teacher_dir("std0") / "eval.json").unlink()
    assert_one_line_error(cbd("evaluate", *common), test_shard, "cbd-cache prepare")

    repaired = cbd("prepare", *common)
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "rebuilding them" in repaired.stderr and "bit for bit" in repaired.stderr
    assert data_files(wd) == before
    assert "every shard intact" in cbd("prepare", *common).stderr


def bad_crc_png(seed: int) -> bytes:
    """A PNG with one byte of its IDAT chunk's CRC flipped: PIL decodes it, libpng aborts the process."""
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 14, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    data[at + 4 + length] ^= 0xFF   # the first byte of the CRC after the chunk's data
    return bytes(data)


@pytest.mark.slow
def test_a_png_that_kills_libpng_is_reported_unreadable_and_training_runs(tmp_path):
    bad = bad_crc_png(7)
    with Image.open(io.BytesIO(bad)) as img:   # PIL accepts it...
        img.load()
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; from torchvision.io import decode_image; "
                            "decode_image(torch.frombuffer(bytearray(sys.stdin.buffer.read()), dtype=torch.uint8))"],
                           input=bad, capture_output=True)
    assert probe.returncode < 0   # ...and torchvision's decoder dies of it (SIGSEGV / SIGABRT)

    train = good_items("train", 40) + [("train/cat/bad_crc.png", 0, bad)]
    root = write_dataset(tmp_path / "src", "imagefolder", {"train": train, "test": good_items("test", 10, seed=1)})
    wd = tmp_path / "wd"
    sets = [x for o in [*data_overrides("imagefolder", root), "views.image_px=12", "teacher.epochs=1"]
            for x in ("--set", o)]
    common = ["--pipeline", str(SMOKE), "--workdir", str(wd), *sets]
    prepared = cbd("prepare", *common)
    assert prepared.returncode == 0 and "Traceback" not in prepared.stderr, prepared.stderr[-2000:]
    manifest = Manifest.load(wd / "data" / "manifest.json")
    assert [(r["item"], r["kind"]) for r in manifest.rejected] == [("train/cat/bad_crc.png", "unreadable")]
    assert "decoder crashed" in manifest.rejected[0]["reason"]
    assert manifest.train.num_samples == 40
    trained = cbd("train-teacher", *common, "--name", "std0")
    assert trained.returncode == 0, trained.stderr[-2000:]


def test_a_decode_failure_names_the_shard_and_key(tmp_path):
    from cbd_cache.data.shards import Sample, decode_sample
    from cbd_cache.errors import ShardDamaged

    sample = Sample("train/cat/x", 0, 5, b"not an image", "png", shard=str(tmp_path / "train-000000.tar"))
    with pytest.raises(ShardDamaged, match=r"train-000000\.tar: sample train/cat/x \(row 5\) cannot be decoded"):
        decode_sample(sample, 3)


def test_a_changed_shard_fails_on_first_read_and_once_checked_is_not_rehashed(smoke_copy, monkeypatch):
    from cbd_cache.data import shards

    manifest = Manifest.load(smoke_copy.manifest)
    info = manifest.train.shards[0]
    path = manifest.shard_path(info)
    with pytest.raises(shards.ShardDamaged, match="no longer matches the manifest's hash; run `cbd-cache prepare`"):
        shards.read_shard(path, info.start, info.stop, "0" * 64)
    calls = []
    monkeypatch.setattr(shards, "content_hash", lambda samples: calls.append(1) or info.sha256)
    for _ in range(3):
        shards.read_shard(path, info.start, info.stop, info.sha256)
    assert len(calls) <= 1   # once per shard per process (none if an earlier test here read it)


# ------------------------------------------------------------------------------------------------ the cache
def cache_files(wd) -> dict[str, str]:
    return {str(p.relative_to(wd.cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(wd.cache.rglob("*")) if p.is_file()}


def chunk_of(wd, array: str, c: int = 1):
    return wd.cache / array / "c" / str(c) / "0"


def delete_chunk(wd):
    chunk_of(wd, "teachers/std0/descriptors").unlink()


def truncate_chunk(wd):
    truncate(chunk_of(wd, "teachers/std0/descriptors"))


def flip_chunk_byte(wd):
    path = chunk_of(wd, "teachers/std0/descriptors")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def retype_chunk(wd):
    """The chunk's values written again as float32, with a valid CRC32C: only its size gives it away."""
    path = chunk_of(wd, "teachers/std0/descriptors")
    raw = np.frombuffer(path.read_bytes()[:-4], np.float16).astype(np.float32).tobytes()
    path.write_bytes(raw + google_crc32c.value(raw).to_bytes(4, "little"))


def delete_metadata(wd):
    (wd.cache / "teachers" / "std0" / "descriptors" / "zarr.json").unlink()


def retype_metadata(wd):
    path = wd.cache / "teachers" / "std0" / "descriptors" / "zarr.json"
    path.write_text(path.read_text().replace('"float16"', '"float32"'))


def delete_views_chunk(wd):
    chunk_of(wd, "views").unlink()


def flip_done_mark(wd):
    path = wd.cache / "teachers" / "std0" / "shard_done" / "c" / "2"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


ARRAY = {delete_views_chunk: "views", flip_done_mark: "teachers/std0/shard_done"}


@pytest.mark.slow
@pytest.mark.parametrize("damage", [delete_chunk, truncate_chunk, flip_chunk_byte, retype_chunk, delete_metadata,
                                    retype_metadata, delete_views_chunk, flip_done_mark])
def test_a_damaged_cache_stops_training_verify_names_it_and_repair_restores_it(smoke_copy, damage):
    wd = smoke_copy
    common = ["--pipeline", str(SMOKE), "--workdir", str(wd.root)]
    before = cache_files(wd)
    array = ARRAY.get(damage, "teachers/std0/descriptors")
    damage(wd)
    result = cbd("train-student", *common, "--set", "student.epochs=1")
    named = {flip_done_mark: array, delete_metadata: array, retype_metadata: array}.get(damage, f"{array}/c/1/0")
    assert_one_line_error(result, str(wd.cache), named, "cbd-cache export --repair")
    assert not (wd.root / "students" / "student_epochs=1" / "checkpoint.pt").exists()

    verified = CliRunner().invoke(main, ["cache", "verify", *common])
    assert verified.exit_code == 1 and isinstance(verified.exception, SystemExit), verified.output   # not a crash
    assert f"MISMATCH {array}" in verified.stdout and "FAILED" in verified.stdout, verified.output
    if damage in (delete_chunk, delete_views_chunk, delete_metadata, retype_metadata, flip_done_mark):  # no read needed
        plain = CliRunner().invoke(main, ["export", *common])
        assert plain.exit_code == 1 and "export --repair" in plain.stderr, plain.output

    repaired = CliRunner().invoke(main, ["export", "--repair", *common])
    assert repaired.exit_code == 0, repaired.output
    assert array in repaired.stderr
    assert cache_files(wd) == before
    again = CliRunner().invoke(main, ["cache", "verify", *common])
    assert again.exit_code == 0 and again.stdout.strip().endswith("OK"), again.output


def test_a_cache_without_group_metadata_is_one_line_naming_the_fix(smoke_copy):
    (smoke_copy.cache / "zarr.json").unlink()
    result = CliRunner().invoke(main, ["train-student", "--pipeline", str(SMOKE), "--workdir", str(smoke_copy.root)])
    assert result.exit_code == 2, result.output
    assert f"{smoke_copy.cache} has no readable group metadata" in result.stderr and "rm -r" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_repair_writes_a_lost_or_garbled_root_metadata_again_as_the_settings_give_it(smoke_copy, tmp_path):
    """`export --repair` rewrites the cache's lost zarr.json (group metadata and provenance) from the pipeline's
    settings, when the arrays it holds are the ones those settings give; every other file stays byte for byte."""
    root, meta = smoke_copy.root, smoke_copy.cache / "zarr.json"
    before, attrs = hashes(root, "cache.zarr"), json.loads(meta.read_text())["attributes"]
    results = batch([case("train-student", workdir=root, files={meta: None}),
                     case("export", "--repair", "--set", "export.views=4", workdir=root),
                     case("export", "--repair", workdir=root),
                     case("cache verify", workdir=root),
                     case("export", "--repair", workdir=root, files={meta: b'{"zarr_format": 3, "node'}),
                     case("cache verify", workdir=root)], tmp_path)
    line = error_line(results[0], 2)
    assert "has no readable group metadata" in line and "`cbd-cache export --repair` writes it again" in line
    line = error_line(results[1], 2)
    assert "its arrays are not the ones this pipeline's settings give" in line and "views:" in line
    for repaired, verified in (results[2:4], results[4:6]):
        assert repaired.returncode == 0 and "zarr.json (the group's metadata) again" in repaired.stderr
        assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified.stdout
    after = json.loads(meta.read_text())["attributes"]
    assert {**after, "created_utc": ""} == {**attrs, "created_utc": ""}
    assert {k: v for k, v in hashes(root, "cache.zarr").items() if k != "cache.zarr/zarr.json"} == \
        {k: v for k, v in before.items() if k != "cache.zarr/zarr.json"}
