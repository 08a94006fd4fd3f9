
import json
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from cbd_cache.cache.info import cache_info
from cbd_cache.cache.reader import CacheReader
from cbd_cache.cache.schema import make_layout, sealed
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import decode_image, read_shard
from cbd_cache.errors import CacheDamaged, CacheError, FileDamaged
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.stages.export import export_cache
from cbd_cache.system.runtime import make_runtime, to_unit
from cbd_cache.tools.verify import verify_cache
from cbd_cache.views import ViewSpec, replay
from cbd_cache.workdir import Workdir

from .conftest import smoke_config


def test_cache_row_i_holds_the_descriptors_of_manifest_sample_i(smoke_workdir):
    """Recompute teacher descriptors for samples read from the shards and compare with cache row = sample.row."""
    cfg = smoke_config()
    manifest = Manifest.load(smoke_workdir.manifest)
    group = zarr.open_group(str(smoke_workdir.cache), mode="r")
    offsets, counts = group["view_offset"][:], group["view_count"][:]
    spec = ViewSpec.from_cfg(cfg.views)
    nets = {t.name: load_checkpoint(smoke_workdir.teacher_checkpoint(t.name))[0].eval() for t in cfg.teachers}
    checked = 0
    for info in manifest.train.shards[::3]:                  # several shards, every row of each
        samples = read_shard(manifest.shard_path(info), info.start, info.stop)
        flat = np.concatenate([np.arange(offsets[s.row], offsets[s.row] + counts[s.row]) for s in samples])
        views = group["views"][:][flat]
        image_of = np.repeat(np.arange(len(samples)), counts[info.start:info.stop])
        images = [decode_image(s.data, manifest.channels) for s in samples]
        x = to_unit(torch.stack([replay(images[i], v, spec.image_px) for i, v in zip(image_of, views)]))
        for name, net in nets.items():
            with torch.no_grad():
                expected = F.normalize(net.features(x), dim=1).numpy()
            cached = group[f"teachers/{name}/descriptors"][:][flat].astype(np.float32)
            np.testing.assert_allclose(cached, expected, atol=2e-3)      # float16 storage
            # and a shifted row does not match: the alignment is what is being tested
            assert not np.allclose(cached[2:], expected[:-2], atol=2e-3)
        checked += len(samples)
    assert checked >= 50


def test_descriptors_are_float16_and_unit_norm_and_the_padding_is_zero(smoke_workdir):
    group = zarr.open_group(str(smoke_workdir.cache), mode="r")
    d = group["teachers/std0/descriptors"][:]
    offsets, counts = group["view_offset"][:], group["view_count"][:]
    used = np.zeros(len(d), bool)
    for o, c in zip(offsets, counts):
        used[o:o + c] = True
    assert d.dtype == np.float16 and (~used).sum() > 0
    np.testing.assert_allclose(np.linalg.norm(d[used].astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert not d[~used].any()


def test_shard_blocks_start_on_chunk_boundaries(smoke_workdir):
    info = cache_info(smoke_workdir.cache)
    manifest = Manifest.load(smoke_workdir.manifest)
    chunk = info["arrays"]["teachers/std0/descriptors"]["chunks"][0]
    offsets = zarr.open_group(str(smoke_workdir.cache), mode="r")["view_offset"][:]
    assert chunk == info["chunk_views"] and all(offsets[s.start] % chunk == 0 for s in manifest.train.shards)
    assert info["views_total"] - info["views_stored"] < chunk * len(manifest.train.shards)
    assert info["complete"] and info["shards_done"] == len(manifest.train.shards)
    assert info["manifest_fingerprint"] == manifest.fingerprint and info["allocation"] == "uniform"
    assert set(info["teachers"]) == {"std0", "aug0"} and info["bytes_on_disk"] > 0


def test_layout_pads_each_shard_block_to_whole_chunks():
    layout = make_layout([[0, 3], [3, 5], [5, 6]], np.array([2, 5, 1, 4, 4, 3]), chunk_views=4)
    assert layout.offsets.tolist() == [0, 2, 7, 8, 12, 16]
    assert layout.blocks.tolist() == [[0, 8], [8, 16], [16, 20]] and layout.total == 20


def test_a_draws_cache_puts_views_where_the_student_draws_and_serves_smaller_budgets_as_prefixes(smoke_copy):
    import shutil

    from cbd_cache.data.sampling import view_counts
    from cbd_cache.data.shards import read_labels
    from cbd_cache.tools.dryrun import projected_cache_bytes

    cfg = smoke_config("export.allocation=draws", "export.views=4")
    manifest = Manifest.load(smoke_copy.manifest)
    labels = read_labels(manifest, "train")
    shutil.rmtree(smoke_copy.cache)
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    group = zarr.open_group(str(smoke_copy.cache), mode="r")
    counts = group["view_count"][:]
    assert counts.tolist() == view_counts(labels, manifest.train.class_counts, 4, "draws").tolist()
    assert counts.max() > 4 * counts.min() and abs(counts.sum() - 4 * len(labels)) < len(labels) * 0.1
    projected = projected_cache_bytes(cfg, labels, manifest.train.class_counts)
    assert projected == {name: group[name].nbytes for name in projected}
    report = verify_cache(smoke_copy.cache, manifest, {t.name: smoke_copy.teacher_checkpoint(t.name)
                                                       for t in cfg.teachers}, make_runtime(cfg.pipeline), rows=24)
    assert report["problems"] == [] and report["rows_checked"] == 24
    # row i's views are the first v_i derived from its key, and its descriptors those of a budget-2 export's prefix
    sample = read_shard(manifest.shard_path(manifest.train.shards[-1]), manifest.train.shards[-1].start,
                        manifest.train.shards[-1].stop)[0]
    image = decode_image(sample.data, manifest.channels)
    o, c = group["view_offset"][sample.row], counts[sample.row]
    from cbd_cache.views import derive_views

    assert np.array_equal(group["views"][o:o + c], derive_views(cfg.pipeline.seed, sample.key, c, image.shape[1],
                                                                image.shape[2], ViewSpec.from_cfg(cfg.views)))
    whole = CacheReader(smoke_copy.cache, manifest, ["std0"]).read(0, len(labels))
    half = CacheReader(smoke_copy.cache, manifest, ["std0"], views=2).read(0, len(labels))
    assert half.count.tolist() == view_counts(labels, manifest.train.class_counts, 2, "draws").tolist()
    assert (half.count <= whole.count).all() and half.count.sum() < whole.count.sum()
    np.testing.assert_array_equal(half.targets[half.every_view()],
                                  whole.targets[np.concatenate([np.arange(o, o + c) for o, c in
                                                                zip(whole.offset, half.count)])])

    # the student walks each image's views without replacement: over 3 epochs an image repeats a view
    # only where an epoch's draws strayed from the expected count (with replacement, a tail image drawn
    # 17 times from 23 views would see about 12 distinct ones)
    from cbd_cache.loaders import CacheSpec, TrainStream

    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="class_balanced", seed=1,
                         samples_per_epoch=len(labels), shuffle_buffer=64,
                         cache=CacheSpec(smoke_copy.cache, ("std0",), 4))
    drawn: dict[int, list[int]] = {}
    for item in islice(iter(stream), 3 * len(labels)):
        drawn.setdefault(item[2], []).append(item[3])
    tail = [r for r, vs in drawn.items() if counts[r] >= 3 * len(vs) / 2 and len(vs) >= 6]
    assert len(tail) >= 5
    assert all(len(set(drawn[r])) >= len(drawn[r]) - 3 for r in tail)


def test_an_old_schema_cache_is_refused_with_how_to_re_export(smoke_copy, tmp_path):
    """A schema-3 cache (one provenance for all teachers, no fingerprint) is refused by every reader and by
    export, with the command that exports it again, its path quoted for the shell."""
    group = zarr.open_group(str(smoke_copy.cache), mode="r+")
    prov = {k: v for k, v in dict(group.attrs)["provenance"].items() if k != "fingerprint"}
    group.attrs["provenance"] = {**prov, "schema_version": 3, "teachers": {"std0": {"descriptor_dim": 64}}}
    spaced = tmp_path / "my cache.zarr"
    smoke_copy.cache.rename(spaced)
    cfg = smoke_config()
    for refused in (lambda: CacheReader(spaced, Manifest.load(smoke_copy.manifest), ["std0"]),
                    lambda: cache_info(spaced),
                    lambda: export_cache(cfg, Workdir(smoke_copy.root, cache_url=str(spaced)),
                                         make_runtime(cfg.pipeline))):
        with pytest.raises(CacheError) as e:
            refused()
        assert f"older cbd-cache (schema 3); re-export it: rm -r '{spaced}' && cbd-cache export" in str(e.value)


def edit_json(path, edit) -> None:
    """Edit a zarr.json by hand, as a user would."""
    meta = json.loads(path.read_text())
    edit(meta["attributes"])
    path.write_text(json.dumps(meta))


def test_provenance_edited_by_hand_is_refused_naming_the_file_and_the_fix(smoke_copy):
    manifest = Manifest.load(smoke_copy.manifest)
    root, aug0 = smoke_copy.cache / "zarr.json", smoke_copy.cache / "teachers" / "aug0" / "zarr.json"
    original = root.read_text()
    edit_json(root, lambda a: a["provenance"].update(views_per_image=4))
    for refused in (lambda: CacheReader(smoke_copy.cache, manifest, ["std0"]), lambda: cache_info(smoke_copy.cache)):
        with pytest.raises(FileDamaged, match=rf"{root}: the cache's provenance does not match its fingerprint "
                                              r"\(edited by hand\?\); put the file back .* rm -r"):
            refused()
    root.write_text(original)
    edit_json(aug0, lambda a: a["teacher"].update(descriptor_dim=32))
    CacheReader(smoke_copy.cache, manifest, ["std0"])                      # a group it does not read: not checked
    with pytest.raises(FileDamaged, match=rf"{aug0}: teacher aug0's provenance does not match its fingerprint .*"
                                          "cbd-cache export --replace aug0"):
        CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"])
    assert cache_info(smoke_copy.cache)["teachers"]["aug0"]["state"] == "edited"


def test_metadata_that_agrees_with_its_fingerprint_still_has_to_agree_with_the_data(smoke_copy):
    """Swapped shard ranges, or a view budget that is not what view_count holds, are refused even when whoever
    edited them also recomputed the fingerprint: never trained on."""
    manifest = Manifest.load(smoke_copy.manifest)
    root = smoke_copy.cache / "zarr.json"
    original = root.read_text()

    def forge(**change):
        root.write_text(original)
        edit_json(root, lambda a: a.update(provenance=sealed({**a["provenance"], **change})))
    shards = json.loads(original)["attributes"]["provenance"]["shards"]
    forge(shards=[shards[1], shards[0], *shards[2:]])
    with pytest.raises(CacheDamaged, match=r"shard row ranges in its provenance differ from the manifest's "
                                           r"\(first at shard 0\)"):
        CacheReader(smoke_copy.cache, manifest, ["std0"])
    forge(views_per_image=4)
    with pytest.raises(CacheDamaged, match=r"view_count does not hold the views per image its provenance claims "
                                           r"\(uniform allocation of A = 4"):
        CacheReader(smoke_copy.cache, manifest, ["std0"])
    forge(allocation="draws")
    with pytest.raises(CacheDamaged, match="view_count does not hold"):
        CacheReader(smoke_copy.cache, manifest, ["std0"])
    root.write_text(original)
    CacheReader(smoke_copy.cache, manifest, ["std0"])


def test_info_and_verify_tell_each_teacher_groups_state(smoke_copy, tmp_path):
    """cache info: complete, partial, stale (its checkpoint changed since), without provenance, or absent from
    the cache; cache verify checks each group against its own record."""
    from cbd_cache.cache.info import info_text
    from cbd_cache.models.checkpoints import load_checkpoint, save_checkpoint
    from cbd_cache.system.digests import file_sha256

    wd = smoke_copy
    group = zarr.open_group(str(wd.cache), mode="r+")
    group["teachers/std0/shard_done"][5] = 0
    ckpt = wd.teacher_checkpoint("aug0")
    net, meta = load_checkpoint(ckpt)
    with torch.no_grad():
        next(net.parameters()).mul_(1.5)
    save_checkpoint(ckpt, net, meta["network"], {k: v for k, v in meta.items() if k != "network"})
    (wd.cache / "teachers" / "ghost").mkdir()                     # what a cut-short export leaves
    info = cache_info(wd.cache, wd.teacher_checkpoint, ["std0", "aug0", "rn18"])
    states = {name: t["state"] for name, t in info["teachers"].items()}
    assert states == {"aug0": "stale", "ghost": "no provenance", "std0": "partial"} and info["missing"] == ["rn18"]
    assert not info["complete"] and info["teachers"]["std0"]["shards_done"] == 7
    assert info["teachers"]["aug0"]["bytes_on_disk"] > 0 and info["teachers"]["aug0"]["finished_utc"]
    assert {"checkpoint_sha256", "arch", "descriptor_dim", "input_mean", "input_std"} <= info["teachers"]["std0"].keys()
    text = info_text(info)
    assert "teacher std0: PARTIAL (7/8 shards; `cbd-cache export` finishes it)" in text
    assert "teacher aug0: STALE (its checkpoint changed since; `cbd-cache export --replace aug0` rewrites it)" in text
    assert "teacher rn18: ABSENT" in text and "teacher ghost: NO PROVENANCE" in text

    report = verify_cache(wd.cache, Manifest.load(wd.manifest), wd.teacher_checkpoint,
                          make_runtime(smoke_config().pipeline), rows=8)
    groups = report["groups"]
    assert groups["views"] == [] and groups["std0"] == ["teacher std0: incomplete: 7/8 shards exported"]
    assert groups["aug0"] == ["teacher aug0: its checkpoint changed since its group was written "
                              "(`cbd-cache export --replace aug0` rewrites it)"]
    assert "no provenance" in groups["ghost"][0] and report["teachers_recomputed"] == ["std0"]
    assert file_sha256(ckpt) != info["teachers"]["aug0"]["checkpoint_sha256"]


def test_a_flipped_byte_fails_the_read(smoke_copy):
    chunk = smoke_copy.cache / "teachers" / "std0" / "descriptors" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    reader = CacheReader(smoke_copy.cache, Manifest.load(smoke_copy.manifest), ["std0"])
    with pytest.raises(CacheDamaged, match=r"cache.zarr/teachers/std0/descriptors/c/1/0 \(shard 1\) fails its checksum; run `cbd-cache export --repair`"):
        reader.read(32, 64)


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
    zarr.open_group(str(smoke_copy.cache), mode="r+")["teachers/std0/shard_done"][2] = 0
    with pytest.raises(CacheError, match="teacher std0 is incomplete: 7/8"):
        CacheReader(smoke_copy.cache, manifest, ["std0"])
    CacheReader(smoke_copy.cache, manifest, ["aug0"])             # the other teacher's group is complete
    zarr.open_group(str(smoke_copy.cache), mode="r+")["views_done"][2] = 0
    with pytest.raises(CacheError, match="is incomplete: 7/8"):
        CacheReader(smoke_copy.cache, manifest, ["aug0"])






def test_int8_round_trip_is_exact_on_the_grid_and_close_on_unit_vectors():
    from cbd_cache.cache.codec import dequantize_int8, quantize_int8

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
    f16 = CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"]).read(0, manifest.train.num_samples).targets

    def chunk_bytes(*arrays):   # the data itself; each array's zarr.json adds ~0.5 kB, which dwarfs a tiny cache
        return sum(f.stat().st_size for a in arrays for f in (smoke_copy.cache / a / "c").rglob("*") if f.is_file())

    f16_bytes = chunk_bytes("teachers/std0/descriptors")
    shutil.rmtree(smoke_copy.cache)
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    info = cache_info(smoke_copy.cache)
    assert info["dtype"] == "int8" and info["arrays"]["teachers/std0/descriptors"]["dtype"] == "int8"
    assert chunk_bytes("teachers/std0/descriptors", "teachers/std0/scales") <= 0.52 * f16_bytes     # (d + 2) / 2d at d = 64
    reader = CacheReader(smoke_copy.cache, manifest, ["std0", "aug0"])
    targets = reader.read(0, manifest.train.num_samples).targets
    assert targets.dtype == np.float16 and targets.shape == f16.shape
    for part in (slice(0, 64), slice(64, 128)):               # each teacher's slice: same direction as float16
        a, b = targets[..., part].astype(np.float32), f16[..., part].astype(np.float32)
        used = np.linalg.norm(b, axis=-1) > 0                 # not the padding
        cos = (a * b).sum(-1)[used] / np.linalg.norm(a, axis=-1)[used] / np.linalg.norm(b, axis=-1)[used]
        assert cos.min() > 0.998


