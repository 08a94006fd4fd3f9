import io
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from torch.utils.data import DataLoader

import cbd_cache.loaders as stream_module
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.sources.synthetic import Synthetic
from cbd_cache.loaders import CacheSpec, ExportStream, TrainStream
from cbd_cache.system.runtime import to_unit
from cbd_cache.views import ViewSpec, derive_views, eval_view, replay, replay_flat

from .conftest import smoke_config

SPEC = ViewSpec(image_px=16, scale=(0.35, 1.0), ratio=(0.75, 4 / 3), flip=True, eval_resize_px=0)


def test_view_is_a_pure_function_of_seed_key_and_index():
    a = derive_views(0, "train-00042", 4, 28, 28, SPEC)[3]
    assert np.array_equal(a, derive_views(0, "train-00042", 4, 28, 28, SPEC)[3])
    assert not np.array_equal(a, derive_views(1, "train-00042", 4, 28, 28, SPEC)[3])
    assert not np.array_equal(a, derive_views(0, "train-00043", 4, 28, 28, SPEC)[3])
    # view a does not depend on how many views are exported: the first 4 of 16 are the 4 of an A=4 export
    assert np.array_equal(derive_views(0, "k", 16, 28, 28, SPEC)[:4], derive_views(0, "k", 4, 28, 28, SPEC))


def test_views_are_the_same_in_every_version():
    """Pinned values: a change to the derivation (or to numpy's generator) would silently give new
    exports other views than earlier ones under the same seed."""
    spec = ViewSpec(image_px=28, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, eval_resize_px=0)
    assert derive_views(0, "train-000042", 4, 28, 28, spec).tolist() == [
        [2, 0, 23, 21, 1], [7, 8, 17, 19, 0], [3, 5, 22, 21, 0], [4, 0, 23, 28, 0]]
    photo = ViewSpec(image_px=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, eval_resize_px=256)
    assert derive_views(7, "n01440764_10026", 2, 375, 500, photo).tolist() == [[6, 56, 262, 301, 1], [0, 95, 290, 278, 0]]


def test_views_respect_the_spec():
    views = np.concatenate([derive_views(0, f"img{i}", 4, 28, 32, SPEC) for i in range(200)])
    top, left, h, w, flip = views.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 32).all()
    area = h * w / (28 * 32)
    assert area.min() >= 0.3 and area.max() <= 1.0
    assert 0.4 < flip.mean() < 0.6


def test_replay_crops_resizes_and_flips():
    image = torch.arange(2 * 8 * 8, dtype=torch.uint8).reshape(2, 8, 8)
    out = replay(image, np.array([2, 1, 4, 4, 0]), 4)          # same size: a pure crop, still uint8
    assert out.dtype == torch.uint8 and torch.equal(out, image[:, 2:6, 1:5])
    flipped = replay(image, np.array([2, 1, 4, 4, 1]), 4)
    assert torch.equal(flipped, out.flip(-1))
    assert replay(image, np.array([0, 0, 8, 8, 0]), 16).shape == (2, 16, 16)


@pytest.mark.parametrize("channels,height,width,px", [(1, 28, 28, 28), (3, 40, 37, 32), (3, 64, 64, 24), (4, 30, 30, 16)])
def test_batched_replay_is_replay_of_each_view(channels, height, width, px):
    """Export's batched replay gives the student's per-view pixels bit for bit (downscales, upscales, identity crops, flips)."""
    g = torch.Generator().manual_seed(channels * 1000 + height)
    images = torch.randint(0, 256, (12, channels, height, width), dtype=torch.uint8, generator=g)
    spec = ViewSpec(image_px=px, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip=True, eval_resize_px=0)
    views = np.stack([derive_views(3, f"img{i}", 8, height, width, spec) for i in range(12)])
    views[0, 0] = [0, 0, height, width, 1]                  # the whole image, flipped
    top, left = (height - px) // 2, (width - px) // 2
    views[1, :2] = [[top, left, px, px, 0], [top, left, px, px, 1]]   # crops of the output size: no resize
    batched = replay_flat(images, views.reshape(-1, 5), np.repeat(np.arange(12), 8), px)
    assert batched.dtype == torch.uint8 and batched.shape == (12 * 8, channels, px, px)
    assert torch.equal(batched, torch.stack([replay(images[i], views[i, a], px) for i in range(12) for a in range(8)]))


@pytest.mark.parametrize("sizes", [[(20, 24), (20, 24), (20, 24)], [(20, 24), (31, 18), (20, 24)]])
def test_export_replays_same_sized_and_mixed_photos_alike(sizes):
    """Export batches same-sized images (`replay_flat`) and replays photos of many sizes one view at a time."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from cbd_cache.data.shards import Sample, decode_image

    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate(sizes):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append(Sample(f"img{i}", 0, 10 + i, buf.getvalue(), "png"))
    spec = ViewSpec(image_px=16, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip=True, eval_resize_px=0)
    counts = np.zeros(13, dtype=np.int64)
    counts[10:13] = [4, 1, 3]                                      # ragged: a draws-allocated cache
    rows, row_counts, views, pixels = ExportStream(SimpleNamespace(channels=3), [], spec, 5, counts, 8).replay(samples)
    assert rows.tolist() == [10, 11, 12] and row_counts.tolist() == [4, 1, 3]
    assert views.shape == (8, 5) and pixels.shape == (8, 3, 16, 16)
    first = 0
    for i, sample in enumerate(samples):
        image, c = decode_image(sample.data, 3), int(counts[10 + i])
        mine = views[first:first + c]
        assert np.array_equal(mine, derive_views(5, sample.key, c, image.shape[1], image.shape[2], spec))
        for a in range(c):
            assert torch.equal(pixels[first + a], replay(image, mine[a], 16))
        first += c


def test_to_unit_maps_pixels_to_the_unit_interval_the_same_per_view_or_per_batch():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    x = to_unit(pixels)
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    torch.testing.assert_close(x, pixels.double().div(255).float(), rtol=0, atol=1e-7)
    batch = torch.stack([pixels, pixels.flip(-1)])
    assert torch.equal(to_unit(batch)[1], to_unit(pixels.flip(-1)))
    assert to_unit(x) is x                                    # augmented float views pass through


def test_eval_view_centre_crops_after_resizing_the_short_side():
    spec = ViewSpec(image_px=224, scale=(0.05, 1), ratio=(0.75, 4 / 3), flip=True, eval_resize_px=256)
    image = torch.zeros(3, 300, 400, dtype=torch.uint8)
    image[:, 150, 200] = 255                                     # the centre pixel survives a centre crop
    out = eval_view(image, spec)
    assert out.shape == (3, 224, 224) and out.max() > 0


def coordinates(height: int, width: int) -> torch.Tensor:
    """uint8 (3, H, W): channel 0 holds each pixel's row, channel 1 its column, channel 2 their sum."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows, cols, rows + cols]).to(torch.uint8)


def eval_spec(image_px: int, eval_resize_px: int) -> ViewSpec:
    return ViewSpec(image_px=image_px, scale=(0.35, 1), ratio=(0.75, 4 / 3), flip=True, eval_resize_px=eval_resize_px)


@pytest.mark.parametrize("height, width, top, left", [(12, 20, 2, 6), (20, 12, 6, 2), (13, 21, 2, 6)])
def test_eval_view_at_scale_one_is_the_exact_centre_crop(height, width, top, left):
    """eval_resize_px = the short side: no resizing, so the view is the image's centre pixels, unflipped."""
    image = coordinates(height, width)
    out = eval_view(image, eval_spec(8, min(height, width)))
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    assert torch.equal(out, image[:, top:top + 8, left:left + 8])


def test_eval_view_resizes_the_short_side_then_crops_the_centre():
    """30 x 40 at eval_resize_px 20: scale 2/3, so the 10 px view is a centre crop of 15 source pixels."""
    image = coordinates(30, 40)
    out = eval_view(image, eval_spec(10, 20))
    assert out.shape == (3, 10, 10)
    top, left = (30 - 15) // 2, (40 - 15) // 2                       # 7, 12
    assert torch.equal(out, replay(image[:, top:top + 15, left:left + 15].clone(), np.array([0, 0, 15, 15, 0]), 10))
    rows, cols = out[0].float(), out[1].float()
    assert (rows.diff(dim=0) > 0).all() and (rows.diff(dim=1) == 0).all()       # rows run down, not across
    assert (cols.diff(dim=1) > 0).all() and (cols.diff(dim=0) == 0).all()       # columns run left to right
    assert abs(rows.mean().item() - 14) < 0.6 and abs(cols.mean().item() - 19) < 0.6   # centred on (14, 19)


def test_eval_view_without_eval_resize_squashes_the_whole_image():
    """eval_resize_px = 0: the whole image, resized to image_px x image_px (no crop, aspect not kept)."""
    image = coordinates(12, 20)
    out = eval_view(image, eval_spec(8, 0))
    assert out.shape == (3, 8, 8)
    assert torch.equal(out, F.interpolate(image[None], size=(8, 8), mode="bilinear", antialias=True)[0])
    assert out[1, :, 0].max() <= 2 and out[1, :, -1].min() >= 17     # columns 0..19 all there
    assert out[0, 0].max() <= 1 and out[0, -1].min() >= 10           # rows 0..11 all there


def test_eval_view_crop_never_leaves_the_image():
    """A crop larger than the short side is clipped to it: 12 x 20 at scale 1/2 wants 16 px, gets 12 x 16."""
    image = coordinates(12, 20)
    out = eval_view(image, eval_spec(8, 6))
    assert torch.equal(out, replay(image[:, 0:12, 2:18].clone(), np.array([0, 0, 12, 16, 0]), 8))


def export_tensors(manifest, cfg):
    shards = list(range(len(manifest.train.shards)))
    stream = ExportStream(manifest, shards, ViewSpec.from_cfg(cfg.views), cfg.pipeline.seed, cfg.export.views, 64)
    seen = {}
    for _, rows, counts, views, images in stream:
        first = 0
        for row, c in zip(rows.tolist(), counts.tolist()):
            for a in range(c):
                seen[(row, a)] = images[first + a]
            first += c
    return seen


def test_export_batches_do_not_depend_on_how_many_views_replay_at_once(smoke_workdir, monkeypatch):
    cfg = smoke_config()
    manifest = Manifest.load(smoke_workdir.manifest)
    a = cfg.export.views
    stream = ExportStream(manifest, [0, 1], ViewSpec.from_cfg(cfg.views), cfg.pipeline.seed, a, 5 * a)   # 5 images a batch
    windowed = list(stream)                                    # whole shards replay at once at this size
    monkeypatch.setattr(stream_module, "REPLAY_WINDOW_BYTES", 0)  # one batch at a time
    single = list(stream)
    assert len(windowed) == len(single) > 2
    for (s, rows, counts, views, pixels), (s1, rows1, counts1, views1, pixels1) in zip(windowed, single):
        assert s == s1 and len(rows) <= 5 and pixels.shape[0] == len(rows) * a
        assert torch.equal(rows, rows1) and torch.equal(counts, counts1)
        assert torch.equal(views, views1) and torch.equal(pixels, pixels1)


@pytest.mark.parametrize("workers", [0, 1])
def test_student_replays_the_exact_tensor_the_teacher_saw(smoke_workdir, workers):
    cfg = smoke_config()
    manifest = Manifest.load(smoke_workdir.manifest)
    teacher_saw = export_tensors(manifest, cfg)
    assert len(teacher_saw) == manifest.train.num_samples * cfg.export.views
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="class_balanced", seed=5,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=64,
                         cache=CacheSpec(smoke_workdir.cache, ("std0", "aug0"), cfg.export.views))
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    checked = set()
    for x, label, row, a, target, _ in islice(loader, 400):
        assert torch.equal(x, teacher_saw[(row, a)]), f"row {row} view {a} differs"
        checked.add((row, a))
    assert len(checked) > 100


def test_cache_stores_the_derived_views(smoke_workdir):
    cfg = smoke_config()
    manifest = Manifest.load(smoke_workdir.manifest)
    group = zarr.open_group(str(smoke_workdir.cache), mode="r")
    stored, offsets = group["views"][:], group["view_offset"][:]
    from cbd_cache.data.shards import decode_image, read_shard

    info = manifest.train.shards[-1]
    for s in read_shard(manifest.shard_path(info), info.start, info.stop):
        image = decode_image(s.data, manifest.channels)
        expected = derive_views(cfg.pipeline.seed, s.key, cfg.export.views, image.shape[1], image.shape[2],
                                ViewSpec.from_cfg(cfg.views))
        assert np.array_equal(stored[offsets[s.row]:offsets[s.row] + cfg.export.views], expected)


# --- decode policies (views.decode): export, student and verify make a view's pixels through `render` ---

class JpegPhotos(Synthetic):
    """The synthetic reader's records as JPEG photos of several sizes (smoothed noise, quality 90)."""

    def read(self, record):
        split, c, j = record.ref
        rng = np.random.default_rng([c, j, split == "train"])
        h, w = int(rng.integers(64, 140)), int(rng.integers(64, 140))
        noise = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
        return buf.getvalue(), "jpg"


PHOTO_SETS = ("data.num_classes=4", "data.n_max=12", "data.profile=none", "data.test_per_class=2",
              "data.shard_size=16", "views.image_px=32", "views.scale=[0.3, 1.0]", "export.views=4", "student.epochs=1",
              "student.batch_size=8", "eval.batch_size=16")


def photo_config(decode: str, *extra: str):
    return smoke_config(*PHOTO_SETS, f"views.decode={decode}", f"pipeline.cache_url=cache_{decode}.zarr", *extra)


@pytest.fixture(scope="module")
def photo_workdir(tmp_path_factory):
    """JPEG photos prepared, two untrained teachers, and one cache per decode policy (cache_<policy>.zarr)."""
    from cbd_cache.data.prepare import prepare
    from cbd_cache.models.checkpoints import network_spec, save_checkpoint
    from cbd_cache.models.networks import Network
    from cbd_cache.stages.export import export_cache
    from cbd_cache.system.runtime import make_runtime
    from cbd_cache.workdir import Workdir

    cfg = photo_config("full")
    wd = Workdir(tmp_path_factory.mktemp("photos"))
    prepare(cfg, wd, JpegPhotos(cfg.data))
    manifest = Manifest.load(wd.manifest)
    for t in cfg.teachers:
        torch.manual_seed(t.seed)
        net = Network(t.arch, 3, manifest.num_classes, t.gamma)
        save_checkpoint(wd.teacher_checkpoint(t.name), net, network_spec(net, t.arch, 3, manifest.num_classes, t.gamma),
                        {"name": t.name, "seed": t.seed, "manifest_fingerprint": manifest.fingerprint})
    for decode in ("full", "reduced", "gpu"):
        cfg = photo_config(decode)
        export_cache(cfg, photo_wd(wd, cfg), make_runtime(cfg.pipeline))
    return wd


def photo_wd(wd, cfg):
    from cbd_cache.workdir import Workdir
    return Workdir(wd.root, cfg.pipeline.data_url, str(wd.root / cfg.pipeline.cache_url))


@pytest.mark.parametrize("decode", ["full", "reduced", "gpu"])
def test_student_replays_the_teachers_pixels_under_every_decode_policy(photo_workdir, decode):
    """The default (full), reduced-size and device decoding: the student's view is the tensor export fed the teachers."""
    from cbd_cache.views import EncodedBatch, decode_scale
    cfg = photo_config(decode)
    wd = photo_wd(photo_workdir, cfg)
    manifest = Manifest.load(wd.manifest)
    spec = ViewSpec.from_cfg(cfg.views)
    cpu = torch.device("cpu")
    teacher_saw, scales = {}, []
    stream = ExportStream(manifest, list(range(len(manifest.train.shards))), spec, cfg.pipeline.seed, 4, 32)
    for _, rows, counts, views, images in stream:
        assert isinstance(images, EncodedBatch) == (decode == "gpu")
        pixels = images.decode(cpu) if decode == "gpu" else images
        keys = [(r, a) for r, c in zip(rows.tolist(), counts.tolist()) for a in range(c)]
        teacher_saw.update(zip(keys, pixels))
        scales += [decode_scale(v, spec, "jpg") for v in views.numpy()]
    if decode == "reduced":   # the policy is exercised: some crops decode at 1/2 or 1/4
        assert 0 < sum(s > 1 for s in scales) < len(scales)
    student = TrainStream(manifest, spec, sampling="class_balanced", seed=5, samples_per_epoch=48, shuffle_buffer=16,
                          cache=CacheSpec(wd.cache, ("std0", "aug0"), 4))
    checked = set()
    workers = 1 if decode == "gpu" else 0    # encoded views through a worker's shared memory too
    for x, label, row, a, target, _ in DataLoader(student, batch_size=8, num_workers=workers):
        pixels = x.decode(cpu) if decode == "gpu" else x
        for i in range(len(row)):
            assert torch.equal(pixels[i], teacher_saw[(int(row[i]), int(a[i]))]), f"row {int(row[i])} view {int(a[i])}"
            checked.add((int(row[i]), int(a[i])))
        if len(checked) > 60:
            break
    assert len(checked) > 40


def test_reduced_decode_changes_only_the_large_crops_and_little(photo_workdir):
    from cbd_cache.data.shards import decode_image, decode_reduced, image_size, read_shard
    from cbd_cache.views import decode_scale, render
    manifest = Manifest.load(photo_workdir.manifest)
    full, reduced = (ViewSpec.from_cfg(photo_config(d).views) for d in ("full", "reduced"))
    info, diffs = manifest.train.shards[0], []
    for sample in read_shard(manifest.shard_path(info), info.start, info.stop):
        h, w = image_size(sample.data)
        assert decode_image(sample.data, 3).shape[1:] == (h, w)
        assert decode_reduced(sample.data, 3, 4).shape[1:] == (-(-h // 4), -(-w // 4))
        views = derive_views(0, sample.key, 8, h, w, full)
        a, b = render(sample, views, full, 3), render(sample, views, reduced, 3)
        for v, x, y in zip(views, a, b):
            if decode_scale(v, reduced, "jpg") == 1:
                assert torch.equal(x, y)
            else:   # another filter before the resize: close, not equal
                diffs.append(float((x.float() - y.float()).abs().mean()))
    assert 0 < np.mean(diffs) < 12, diffs   # (smoothed noise at 1/6 of its pixels: harsher than a photo)


def test_a_cache_made_under_another_decode_policy_is_refused(photo_workdir):
    from cbd_cache.cache.reader import CacheReader
    from cbd_cache.errors import ConfigError
    from cbd_cache.stages.student import check_cache_settings
    cfg = photo_config("full")
    wd = photo_wd(photo_workdir, photo_config("reduced"))
    reader = CacheReader(wd.cache, Manifest.load(wd.manifest), ["std0"])
    assert reader.prov["view_spec"]["decode"] == "reduced"
    with pytest.raises(ConfigError, match=r"views.decode=full: the cache .* was exported with views.decode=reduced"):
        check_cache_settings(cfg, reader.prov, wd.cache)
    check_cache_settings(photo_config("reduced"), reader.prov, wd.cache)


@pytest.mark.parametrize("channels,height,width,px", [(3, 40, 37, 32), (3, 96, 80, 24), (1, 30, 30, 16)])
def test_device_replay_is_the_cpu_replay_within_one_level(channels, height, width, px):
    """`replay_float` (the gpu policy's crop and resize, run here on the CPU) against `replay`: rounding apart, the same."""
    from cbd_cache.views import replay_float
    g = torch.Generator().manual_seed(height)
    image = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=g)
    spec = ViewSpec(image_px=px, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip=True, eval_resize_px=0)
    views = derive_views(1, "img", 32, height, width, spec)
    views[0] = [1, 2, px, px, 1]                              # the output size: a pure crop, exact
    for v in views:
        a, b = replay(image, v, px), replay_float(image, v, px)
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
        assert int((a.int() - b.int()).abs().max()) <= 1
    assert torch.equal(replay(image, views[0], px), replay_float(image, views[0], px))


def test_encoded_views_collate_slice_and_decode_like_the_cpu_path(photo_workdir):
    """decode = "gpu"'s plumbing on the CPU: a loader batches `EncodedBatch`es, export's windows slice them, and
    `Runtime.to_device` decodes and replays them (libjpeg-turbo here, nvJPEG on CUDA)."""
    from cbd_cache.data.shards import decode_image, read_shard
    from cbd_cache.system.runtime import make_runtime
    from cbd_cache.views import EncodedBatch, render, replay_float
    cfg = photo_config("gpu")
    manifest = Manifest.load(photo_workdir.manifest)
    spec = ViewSpec.from_cfg(cfg.views)
    info = manifest.train.shards[1]
    samples = read_shard(manifest.shard_path(info), info.start, info.stop)
    views = [derive_views(0, s.key, 3, *decode_image(s.data, 3).shape[1:], spec) for s in samples]
    batch = next(iter(DataLoader([render(s, v, spec, 3) for s, v in zip(samples, views)], batch_size=5)))
    assert isinstance(batch, EncodedBatch) and len(batch) == 15 and len(batch.jpeg) == 5
    assert [batch.image(i).numpy().tobytes() for i in range(5)] == [s.data for s in samples[:5]]
    part = batch[4:11]                                        # views 1..2 of image 1, all of 2, 0..1 of image 3
    assert part.image_of.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert [part.image(i).numpy().tobytes() for i in range(3)] == [s.data for s in samples[1:4]]
    x = make_runtime(cfg.pipeline).to_device(part)
    expected = [replay_float(decode_image(samples[1 + i].data, 3), v, 32)
                for i, v in zip(part.image_of.tolist(), part.views.numpy())]
    assert torch.equal(x, to_unit(torch.stack(expected)))


@pytest.mark.slow
def test_a_student_trains_and_a_cache_verifies_under_gpu_decoding_on_the_cpu(photo_workdir):
    """The whole gpu-decode path on the CPU: a cached student trains an epoch, is evaluated, and `cache verify`
    recomputes the teachers' targets from the encoded views."""
    from cbd_cache.pipeline import train_student
    from cbd_cache.system.runtime import make_runtime
    from cbd_cache.tools.verify import verify_cache
    cfg = photo_config("gpu")
    wd = photo_wd(photo_workdir, cfg)
    runtime = make_runtime(cfg.pipeline)
    ckpt = train_student(cfg, wd, runtime)
    assert ckpt.is_file()
    report = verify_cache(wd.cache, Manifest.load(wd.manifest),
                          {t.name: wd.teacher_checkpoint(t.name) for t in cfg.teachers}, runtime, rows=8)
    assert report["problems"] == [] and report["teachers_recomputed"] == ["aug0", "std0"]
