
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from cbd_cache.cache import CacheError, CacheReader, cache_info
from cbd_cache.checkpoint import load_checkpoint
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import decode_image, read_shard
from cbd_cache.export import export_cache
from cbd_cache.runtime import make_runtime
from cbd_cache.views import ViewSpec, replay, to_unit

from .conftest import smoke_config


def test_cache_row_i_holds_the_descriptors_of_manifest_sample_i(smoke_workdir):
    """Recompute teacher descriptors for samples read from the shards and compare with cache row = sample.row."""
    cfg = smoke_config()
    manifest = Manifest.load(smoke_workdir.manifest)
    group = zarr.open_group(str(smoke_workdir.cache), mode="r")
    spec = ViewSpec.from_cfg(cfg.views)
    nets = {t.name: load_checkpoint(smoke_workdir.teacher_checkpoint(t.name))[0].eval() for t in cfg.teachers}
    checked = 0
    for info in manifest.train.shards[::3]:                  # several shards, every row of each
        samples = read_shard(manifest.shard_path(info), info.start, info.stop)
        views = group["views"][info.start:info.stop]
        x = to_unit(torch.stack([replay(decode_image(s.data, manifest.channels), views[i, a], spec.image_px)
                                 for i, s in enumerate(samples) for a in range(views.shape[1])]))
        for name, net in nets.items():
            with torch.no_grad():
                expected = F.normalize(net.features(x), dim=1).numpy().reshape(len(samples), views.shape[1], -1)
            cached = group[f"descriptors/{name}"][info.start:info.stop].astype(np.float32)
            np.testing.assert_allclose(cached, expected, atol=2e-3)      # float16 storage
            # and a shifted row does not match: the alignment is what is being tested
            assert not np.allclose(cached[1:], expected[:-1], atol=2e-3)
        checked += len(samples)
    assert checked >= 50


def test_descriptors_are_float16_and_unit_norm(smoke_workdir):
    group = zarr.open_group(str(smoke_workdir.cache), mode="r")
    d = group["descriptors/std0"][:]
    assert d.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(d.astype(np.float32), axis=-1), 1.0, atol=2e-3)


def test_chunks_fall_on_shard_boundaries(smoke_workdir):
    info = cache_info(smoke_workdir.cache)
    manifest = Manifest.load(smoke_workdir.manifest)
    rows = info["arrays"]["descriptors/std0"]["chunks"][0]
    assert all(s.start % rows == 0 for s in manifest.train.shards)
    assert info["complete"] and info["shards_done"] == len(manifest.train.shards)
    assert info["manifest_fingerprint"] == manifest.fingerprint
    assert set(info["teachers"]) == {"std0", "aug0"} and info["bytes_on_disk"] > 0


def test_refuses_a_cache_for_other_data(smoke_copy):
    manifest = Manifest.load(smoke_copy.manifest)
    manifest.fingerprint = "0" * 64
    with pytest.raises(CacheError, match="fingerprint"):
        CacheReader(smoke_copy.cache, manifest, ["std0"])


def test_refuses_a_missing_teacher_an_incomplete_cache_and_a_retrained_teacher(smoke_copy):
    manifest = Manifest.load(smoke_copy.manifest)
    with pytest.raises(CacheError, match="no descriptors for teacher"):
        CacheReader(smoke_copy.cache, manifest, ["std0", "ghost"])
    with pytest.raises(CacheError, match="retrained"):
        CacheReader(smoke_copy.cache, manifest, ["std0"], checkpoint_hashes={"std0": "f" * 64})
    zarr.open_group(str(smoke_copy.cache), mode="r+")["shard_done"][2] = 0
    with pytest.raises(CacheError, match="incomplete: 7/8"):
        CacheReader(smoke_copy.cache, manifest, ["std0"])


def test_export_resumes_only_the_unfinished_shards(smoke_copy):
    cfg = smoke_config()
    group = zarr.open_group(str(smoke_copy.cache), mode="r+")
    before = group["descriptors/aug0"][:]
    group["shard_done"][3:] = 0
    group["descriptors/aug0"][96:] = 0                        # shards 3.. (32 rows each) lost
    untouched = (smoke_copy.cache / "descriptors" / "aug0" / "c" / "0" / "0" / "0").stat().st_mtime_ns
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    after = zarr.open_group(str(smoke_copy.cache), mode="r")
    assert after["shard_done"][:].all()
    np.testing.assert_allclose(after["descriptors/aug0"][:].astype(np.float32), before.astype(np.float32), atol=1e-3)
    # shard 0 was finished, so its chunk was not rewritten
    assert (smoke_copy.cache / "descriptors" / "aug0" / "c" / "0" / "0" / "0").stat().st_mtime_ns == untouched


def test_export_refuses_to_resume_a_cache_made_with_other_settings(smoke_copy):
    cfg = smoke_config("export.views=3")
    with pytest.raises(CacheError, match="views_per_image"):
        export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))


def test_int8_round_trip_is_exact_on_the_grid_and_close_on_unit_vectors():
    from cbd_cache.cache import dequantize_int8, quantize_int8

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x[0, 0] = 0.0                                             # a zero vector survives as zero
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (50, 3)
    assert np.abs(q).max() == 127                             # the largest component uses the full range
    assert not dequantize_int8(q[0, 0], scale[0, 0]).any()
    y = dequantize_int8(q, scale)
    cos = (x * y).sum(-1)[1:] / np.linalg.norm(y, axis=-1)[1:]
    assert cos.min() > 0.999
    q2, scale2 = quantize_int8(y)                             # what was stored is a fixed point
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(scale2, scale)


def test_int8_export_stores_half_the_bytes_and_reads_back_the_same_targets(smoke_copy):
    import shutil

    cfg = smoke_config("export.dtype=int8")
    manifest = Manifest.load(smoke_copy.manifest)
    f16 = CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"]).read(0, manifest.train.num_samples)[1]

    def chunk_bytes(*arrays):   # the data itself; each array's zarr.json adds ~0.5 kB, which dwarfs a tiny cache
        return sum(f.stat().st_size for a in arrays for f in (smoke_copy.cache / a / "c").rglob("*") if f.is_file())

    f16_bytes = chunk_bytes("descriptors/std0")
    shutil.rmtree(smoke_copy.cache)
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    info = cache_info(smoke_copy.cache)
    assert info["dtype"] == "int8" and info["arrays"]["descriptors/std0"]["dtype"] == "int8"
    assert chunk_bytes("descriptors/std0", "scales/std0") <= 0.52 * f16_bytes     # (d + 2) / 2d at d = 64
    reader = CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"])
    views, targets, _ = reader.read(0, manifest.train.num_samples)
    assert targets.dtype == np.float16 and targets.shape == f16.shape
    for part in (slice(0, 64), slice(64, 128)):               # each teacher's slice: same direction as float16
        a, b = targets[..., part].astype(np.float32), f16[..., part].astype(np.float32)
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.998
