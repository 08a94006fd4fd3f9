"""Shared and remote storage (fsspec memory:// and file:// here, no network), atomic writes, and `cache verify`."""
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cbd_cache.cache.reader import CacheReader
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import CacheError
from cbd_cache.pipeline import train_student
from cbd_cache.stages.export import export_cache
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.storage import atomic_write_bytes, location
from cbd_cache.tools.verify import verify_cache
from cbd_cache.workdir import Workdir
from cli import main

from .conftest import SMOKE, smoke_config
from .test_resume import array_hashes


def test_shards_and_cache_on_an_fsspec_url(smoke_workdir, tmp_path):
    """prepare uploads to a memory:// data_url; export writes a memory:// cache equal to the local one;
    a student trains from both; verify passes."""
    url = "memory://cbd-test"
    overrides = [f"pipeline.data_url={url}/data", f"pipeline.cache_url={url}/cache.zarr", "student.epochs=1"]
    root = tmp_path / "wd"
    shutil.copytree(smoke_workdir.root, root, ignore=shutil.ignore_patterns("cache.zarr", "data"))
    result = CliRunner().invoke(main, ["prepare", "--pipeline", str(SMOKE), "--workdir", str(root),
                                       *[x for o in overrides for x in ("--set", o)]])
    assert result.exit_code == 0, result.stderr
    assert "uploading" in result.stderr
    cfg = smoke_config(*overrides)
    wd = Workdir(root, cfg.pipeline.data_url, cfg.pipeline.cache_url)
    assert wd.manifest == f"{url}/data/manifest.json"
    manifest = Manifest.load(wd.manifest)
    assert manifest.fingerprint == Manifest.load(smoke_workdir.manifest).fingerprint
    runtime = make_runtime(cfg.pipeline)
    export_cache(cfg, wd, runtime)
    assert array_hashes(wd.cache) == array_hashes(smoke_workdir.cache)
    train_student(cfg, wd, runtime)
    assert (root / "students" / "student_epochs=1" / "eval.json").is_file()
    checkpoints = {t.name: wd.teacher_checkpoint(t.name) for t in cfg.teachers}
    assert verify_cache(wd.cache, manifest, checkpoints, runtime, rows=16)["problems"] == []


def test_file_urls_are_local_paths(tmp_path):
    assert location(f"file://{tmp_path}/c.zarr") == tmp_path / "c.zarr"
    assert location("s3://bucket/run/") == "s3://bucket/run"


def test_verify_passes_a_sound_cache_and_names_each_kind_of_damage(smoke_copy):
    cfg = smoke_config()
    manifest = Manifest.load(smoke_copy.manifest)
    runtime = make_runtime(cfg.pipeline)
    checkpoints = {t.name: smoke_copy.teacher_checkpoint(t.name) for t in cfg.teachers}
    n = manifest.train.num_samples
    sound = verify_cache(smoke_copy.cache, manifest, checkpoints, runtime, rows=n)
    assert sound["problems"] == [] and sound["rows_checked"] == n
    assert sound["teachers_recomputed"] == ["aug0", "std0"]
    assert max(sound["max_cosine_error"].values()) < 1e-4           # float16 storage only

    group = zarr.open_group(str(smoke_copy.cache), mode="r+")
    d = group["teachers/std0/descriptors"]
    offsets = group["view_offset"][:]          # A = 2: row r's views are offsets[r], offsets[r] + 1
    d[offsets[10]:offsets[12]] = -d[offsets[10]:offsets[12]]   # two rows negated: still unit-norm, only recomputing
    # sees it (not swapped: a barely trained teacher's views of two images can lie within the tolerance)
    negated = verify_cache(smoke_copy.cache, manifest, checkpoints, runtime, rows=n)
    assert len(negated["problems"]) == 1 and "teachers/std0/descriptors" in negated["problems"][0]
    assert negated["groups"] == {"views": [], "std0": negated["problems"], "aug0": []}     # by group
    assert negated["max_cosine_error"]["std0"] > 5e-3 and negated["max_cosine_error"]["aug0"] < 1e-4
    d[offsets[40]:offsets[40] + 2] = 0         # a lost row
    group["views_done"][7] = 0                 # and an unfinished shard
    result = CliRunner().invoke(main, ["cache", "verify", "--pipeline", str(SMOKE), "--workdir", str(smoke_copy.root)])
    assert result.exit_code == 1
    assert "incomplete: 7/8 shards" in result.stdout and "FAILED" in result.stdout
    assert "teachers/std0/descriptors: 1 rows of shard 1 are not unit-norm (first: row 40)" in result.stdout
    assert "  teacher aug0: OK (rows recomputed)" in result.stdout and "  views (shared): 1 problem(s)" in result.stdout


def test_train_student_refuses_an_incomplete_cache(smoke_copy):
    zarr.open_group(str(smoke_copy.cache), mode="r+")["views_done"][0] = 0
    result = CliRunner().invoke(main, ["train-student", "--pipeline", str(SMOKE), "--workdir", str(smoke_copy.root)])
    assert result.exit_code == 2 and "incomplete: 7/8 shards exported" in result.stderr
    assert not (smoke_copy.root / "students").exists()


def test_a_cut_short_creation_is_redone_and_a_foreign_folder_is_left_alone(smoke_copy):
    cfg = smoke_config()
    group = zarr.open_group(str(smoke_copy.cache), mode="r+")
    del group.attrs["provenance"]              # as if killed before the provenance was written
    with pytest.raises(CacheError, match="cut short"):
        CacheReader(smoke_copy.cache, Manifest.load(smoke_copy.manifest), ["std0"])
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    assert zarr.open_group(str(smoke_copy.cache), mode="r")["teachers/std0/shard_done"][:].all()
    foreign = smoke_copy.root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    wd = Workdir(smoke_copy.root, cache_url=str(foreign))
    with pytest.raises(CacheError, match="not a cbd-cache cache"):
        export_cache(cfg, wd, make_runtime(cfg.pipeline))
    assert (foreign / "notes.txt").read_text() == "keep me"
    np.testing.assert_array_equal(zarr.open_group(str(smoke_copy.cache), mode="r")["views_done"][:], 1)


def test_atomic_writes_replace_regular_files_only_and_give_the_umask(tmp_path):
    """A new file gets the umask's mode (not mkstemp's 0600), an old one keeps its own; a symlink's target
    is written and the link stays; a FIFO and /dev/null are written in place; a folder is refused."""
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new", b"a")
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    (tmp_path / "mine").write_bytes(b"old")
    (tmp_path / "mine").chmod(0o600)
    atomic_write_bytes(tmp_path / "mine", b"b")
    assert stat.S_IMODE((tmp_path / "mine").stat().st_mode) == 0o600 and (tmp_path / "mine").read_bytes() == b"b"

    (tmp_path / "link").symlink_to(tmp_path / "mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "sub" / "later")
    atomic_write_bytes(tmp_path / "link", b"c")
    atomic_write_bytes(tmp_path / "dangling", b"d")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "mine").read_bytes() == b"c"
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "sub" / "later").read_bytes() == b"d"

    os.mkfifo(tmp_path / "fifo")
    got = []
    reader = threading.Thread(target=lambda: got.append((tmp_path / "fifo").read_bytes()))
    reader.start()
    atomic_write_bytes(tmp_path / "fifo", b"e")
    reader.join(timeout=10)
    assert got == [b"e"] and stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)
    atomic_write_bytes(Path("/dev/null"), b"f")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path, b"g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "fifo", "link", "mine", "new", "sub"]
