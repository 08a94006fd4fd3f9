"""Export: resumable, settings-checked, refusing teachers whose outputs are not finite; one cache, many
teachers: a teacher added, replaced or dropped alone, bit-identical to an export of all at once."""
import shutil

import numpy as np
import pytest
import torch
import torchvision
import zarr
from click.testing import CliRunner

from cbd_cache import pipeline
from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import Busy, CacheError, ConfigError
from cbd_cache.models.checkpoints import load_checkpoint, save_checkpoint
from cbd_cache.stages.export import export_cache
from cbd_cache.stages.imported import import_teacher
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.locks import hold
from cbd_cache.system.runtime import make_runtime
from cbd_cache.workdir import Workdir, cache_lock
from cli import main

from .conftest import SMOKE, smoke_config
from .test_resume import array_hashes


def test_export_resumes_only_the_unfinished_shards(smoke_copy):
    cfg = smoke_config()
    group = zarr.open_group(str(smoke_copy.cache), mode="r+")
    before = group["teachers/aug0/descriptors"][:]
    group["teachers/aug0/shard_done"][3:] = 0
    group["teachers/aug0/descriptors"][group["view_offset"][96]:] = 0  # shards 3.. (32 rows each) lost
    untouched = (smoke_copy.cache / "teachers" / "aug0" / "descriptors" / "c" / "0" / "0").stat().st_mtime_ns
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    after = zarr.open_group(str(smoke_copy.cache), mode="r")
    assert after["teachers/aug0/shard_done"][:].all()
    np.testing.assert_allclose(after["teachers/aug0/descriptors"][:].astype(np.float32), before.astype(np.float32), atol=1e-3)
    # shard 0 was finished, so its chunk was not rewritten
    assert (smoke_copy.cache / "teachers" / "aug0" / "descriptors" / "c" / "0" / "0").stat().st_mtime_ns == untouched


def test_export_refuses_to_resume_a_cache_made_with_other_settings(smoke_copy):
    cfg = smoke_config("export.views=3")
    with pytest.raises(CacheError, match="views_per_image"):
        export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))


def test_export_refuses_a_teacher_with_non_finite_outputs(smoke_copy, monkeypatch):
    """NaN is the fill value that marks a missing chunk, so no NaN is ever written as a target."""
    from cbd_cache.stages import export

    cfg = smoke_config()
    shutil.rmtree(smoke_copy.cache)
    monkeypatch.setattr(export, "teacher_target", lambda v: torch.full_like(v, float("nan")))
    with pytest.raises(CacheError, match=r"teacher std0 gives non-finite outputs on shard \d+ .*train or import it again"):
        export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))


# ------------------------------------------------------------------------------- one cache, many teachers
IMAGENET = "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"


def with_imported_teacher(wd, folder, name: str = "rn18"):
    """The smoke pipeline plus a third teacher, an imported torchvision ResNet-18 (random weights saved by a
    script), imported into `wd`; returns the pipeline file."""
    pipeline = folder / "three.toml"
    pipeline.write_text(SMOKE.read_text() + f'\n[[teachers]]\nname = "{name}"\nsource = "imported"\n'
                        f'arch = "resnet18"\n{IMAGENET}')
    source = folder / "rn18.pth"
    if not source.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), source)
    cfg = load_config(pipeline)
    import_teacher(cfg, wd, make_runtime(cfg.pipeline), name, source)
    return pipeline


def without_cache(src, dst):
    shutil.copytree(src.root, dst.root, ignore=shutil.ignore_patterns("cache.zarr*"))
    return dst


@pytest.mark.slow
def test_adding_a_teacher_runs_only_it_and_equals_an_export_of_all(smoke_copy, tmp_path, capsys):
    """Export 2 teachers, add an imported third: only it runs, and every array (its group's, the shared
    views) equals an export of the 3 from scratch, bit for bit."""
    pipeline = with_imported_teacher(smoke_copy, tmp_path)
    scratch = without_cache(smoke_copy, Workdir(tmp_path / "scratch"))
    cfg = load_config(pipeline)
    before = array_hashes(smoke_copy.cache)
    capsys.readouterr()
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    log = capsys.readouterr().err
    assert "adding teacher rn18 (resnet18" in log and "running rn18 (8 shards); std0, aug0 complete, not run" in log
    export_cache(cfg, scratch, make_runtime(cfg.pipeline))
    assert "running std0 (8 shards), aug0 (8 shards), rn18 (8 shards)" in capsys.readouterr().err
    added, whole = array_hashes(smoke_copy.cache), array_hashes(scratch.cache)
    assert added == whole and {k for k in added if k.startswith("teachers/rn18/")} == {
        "teachers/rn18/descriptors", "teachers/rn18/shard_done"}
    assert {k: v for k, v in added.items() if not k.startswith("teachers/rn18/")} == before   # the rest untouched
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    assert "is complete for std0, aug0, rn18" in capsys.readouterr().err


def test_add_replace_and_drop_keep_int8_logits_and_draws_bit_identical(smoke_copy, tmp_path, capsys):
    """On a draws-allocated int8 cache with logits: one teacher, then the other added, equals both at once; a
    group dropped and added again, or replaced, is the same bytes; a dropped teacher is refused to a student,
    the other still served."""
    cfg = smoke_config("export.dtype=int8", "export.logits=true", "export.allocation=draws", "export.views=4")
    runtime = make_runtime(cfg.pipeline)
    wd = without_cache(smoke_copy, Workdir(tmp_path / "parts"))
    both = without_cache(smoke_copy, Workdir(tmp_path / "both"))
    pipeline.export(cfg, wd, runtime, teachers=["aug0"])
    capsys.readouterr()
    pipeline.export(cfg, wd, runtime)
    assert "running std0 (8 shards); aug0 complete, not run" in capsys.readouterr().err
    pipeline.export(cfg, both, runtime)
    expected = array_hashes(both.cache)
    assert array_hashes(wd.cache) == expected and "teachers/std0/scales" in expected and \
        "teachers/aug0/logits" in expected

    with hold(cache_lock(wd.cache, "teacher-aug0"), "an export of aug0"):
        with pytest.raises(Busy, match=r"teacher aug0 of .*cache.zarr is in use by process"):
            pipeline.drop_teacher(wd, "aug0")
    pipeline.drop_teacher(wd, "aug0")
    assert not (wd.cache / "teachers" / "aug0").exists() and not list(tmp_path.glob("parts/cache.zarr.dropped-*"))
    manifest = Manifest.load(wd.manifest)
    with pytest.raises(CacheError, match=r"no descriptors for teacher\(s\) \['aug0'\]; it holds \['std0'\]"):
        CacheReader(wd.cache, manifest, ["std0", "aug0"])
    CacheReader(wd.cache, manifest, ["std0"], with_logits=True).read(0, 32)
    with pytest.raises(CacheError, match="holds no teacher 'aug0'"):
        pipeline.drop_teacher(wd, "aug0")
    pipeline.export(cfg, wd, runtime)
    assert array_hashes(wd.cache) == expected
    capsys.readouterr()
    pipeline.export(cfg, wd, runtime, replace=["std0"])
    log = capsys.readouterr().err
    assert "replacing teacher std0" in log and "running std0 (8 shards); aug0 complete, not run" not in log
    assert "running std0 (8 shards)" in log and array_hashes(wd.cache) == expected


def retrain(ckpt) -> None:
    """The teacher at `ckpt` as if trained again: other weights, so another checkpoint hash."""
    net, meta = load_checkpoint(ckpt)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.01)
    save_checkpoint(ckpt, net, meta["network"], {k: v for k, v in meta.items() if k != "network"})


def test_a_retrained_teacher_is_refused_until_replace_rewrites_its_group_alone(smoke_copy, capsys):
    cfg = smoke_config()
    runtime = make_runtime(cfg.pipeline)
    ckpt = smoke_copy.teacher_checkpoint("aug0")
    retrain(ckpt)
    std0 = {p: p.stat().st_mtime_ns for p in (smoke_copy.cache / "teachers" / "std0").rglob("*")}
    with pytest.raises(CacheError, match=r"teacher aug0 was retrained since its group was written .*"
                                         r"`cbd-cache export --replace aug0` rewrites that group alone"):
        pipeline.export(cfg, smoke_copy, runtime)
    with pytest.raises(ConfigError, match="no teacher named 'ghost'"):
        pipeline.export(cfg, smoke_copy, runtime, replace=["ghost"])
    with pytest.raises(ConfigError, match="--replace aug0: it is not among --teachers std0"):
        pipeline.export(cfg, smoke_copy, runtime, teachers=["std0"], replace=["aug0"])
    capsys.readouterr()
    pipeline.export(cfg, smoke_copy, runtime, replace=["aug0"])
    assert "running aug0 (8 shards)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (smoke_copy.cache / "teachers" / "std0").rglob("*")} == std0
    reader = CacheReader(smoke_copy.cache, Manifest.load(smoke_copy.manifest), ["std0", "aug0"],
                         checkpoint_hashes={"aug0": file_sha256(ckpt)})
    assert reader.records["aug0"]["checkpoint_sha256"] == file_sha256(ckpt)


# Runs the CLI in a subprocess whose export pauses before each shard's views (outside the shared lock), and
# says when: two of them on one cache then write their shards interleaved.
RACER = r"""
import sys, time
from cbd_cache.cache.writer import CacheWriter

write_views = CacheWriter.write_views
def paced(self, index, views):
    print(f"VIEWS {index} {time.time():.3f}", file=sys.stderr, flush=True)
    time.sleep(0.3)
    return write_views(self, index, views)
CacheWriter.write_views = paced

import cli
sys.argv = ["cbd-cache", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.slow
def test_two_exports_of_different_teachers_at_once_give_one_exports_cache(smoke_workdir, tmp_path):
    """`export --teachers std0` and `export --teachers aug0` at once on one new cache: one creates it, both write
    their groups shard by shard side by side, the shared views are written once (and checked by the other),
    and the cache is the one a single export of both writes, array by array."""
    import subprocess
    import sys

    from .conftest import ROOT

    wd, single = (without_cache(smoke_workdir, Workdir(tmp_path / n)) for n in ("wd", "single"))
    common = ["--pipeline", str(SMOKE), "--workdir", str(wd.root)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, "export", *common, "--teachers", name], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True) for name in ("std0", "aug0")]
    logs = [r.communicate(timeout=300)[1] for r in racers]
    for racer, log in zip(racers, logs):
        assert racer.returncode == 0, log[-3000:]
    times = [[float(line.split()[2]) for line in log.splitlines() if line.startswith("VIEWS ")] for log in logs]
    assert all(len(t) == 8 for t in times) and max(t[0] for t in times) < min(t[-1] for t in times)   # side by side
    assert "running std0 (8 shards)" in logs[0] and "running aug0 (8 shards)" in logs[1]
    one = subprocess.run([sys.executable, "-m", "cli", "export", "--pipeline", str(SMOKE), "--workdir",
                          str(single.root)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert array_hashes(wd.cache) == array_hashes(single.cache)
    assert sorted(p.name for p in (tmp_path / "wd" / "cache.zarr.locks").iterdir()) == [
        "shared.lock", "teacher-aug0.lock", "teacher-std0.lock"]


@pytest.mark.slow
def test_a_retrained_teacher_is_one_line_to_train_student_and_export_replace_fixes_it(smoke_copy):
    """Through the command line: train-student and export refuse a teacher retrained since its group was
    written, in one line naming it and `export --replace`; that command rewrites it and the student trains."""
    common = ["--pipeline", str(SMOKE), "--workdir", str(smoke_copy.root)]
    ckpt = smoke_copy.teacher_checkpoint("aug0")
    retrain(ckpt)

    def cbd(*args):
        return CliRunner().invoke(main, [*args, *common, "--set", "student.epochs=1"])
    for refused in (cbd("train-student"), cbd("export")):
        assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
        lines = refused.stderr.strip().splitlines()
        assert lines[-1].startswith("cbd-cache: error:") and "teacher aug0 was retrained" in lines[-1]
        assert "cbd-cache export --replace aug0" in lines[-1] and len([x for x in lines if "error" in x]) == 1
    fixed = cbd("export", "--replace", "aug0")
    assert fixed.exit_code == 0 and "running aug0 (8 shards)" in fixed.stderr, fixed.output
    trained = cbd("train-student")
    assert trained.exit_code == 0, trained.output
