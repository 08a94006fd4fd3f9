"""The shard reader parses tar bytes itself (webdataset's tarfile path costs ~100 us per member); it must
agree with webdataset on every sample, whatever tar dialect wrote the shard."""
import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from cbd_cache.data.shards import IMAGE_EXTS, Sample, ShardWriter, iter_shard, tar_members


def webdataset_samples(path):
    with open(path, "rb") as stream:
        for s in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
            ext = next(e for e in IMAGE_EXTS if e in s)
            yield Sample(s["__key__"], int(s["cls"]), int(s["row"]), s[ext], ext)


def test_reads_what_shardwriter_wrote_as_webdataset_does(tmp_path):
    path = tmp_path / "train-000000.tar"
    writer = ShardWriter(path)
    written = [Sample(f"train-{i:05d}", i % 3, i, bytes([i]) * (i * 37 + 1), "png" if i % 2 else "jpg")
               for i in range(20)]
    for s in written:
        writer.write(s)
    writer.close()
    assert list(iter_shard(path)) == written == list(webdataset_samples(path))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_pax_and_gnu_headers(tmp_path, fmt):
    path = tmp_path / "x.tar"
    long_dir = "d" * 60 + "/" + "e" * 60                       # > 100 characters: ustar prefix, pax or GNU 'L'
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, ext, data in [(0, "jpg", b"\xff" * 700), (0, "cls", b"4"), (0, "row", b"0"),
                             (1, "png", b"p" * 513), (1, "cls", b"2"), (1, "row", b"1")]:
            info = tarfile.TarInfo(f"{long_dir}/k{i}.{ext}")
            info.size, info.mtime = len(data), 1.5 if fmt == tarfile.PAX_FORMAT else 1
            tar.addfile(info, io.BytesIO(data))
    assert list(iter_shard(path)) == list(webdataset_samples(path))
    assert [s.key for s in iter_shard(path)] == [f"{long_dir}/k0", f"{long_dir}/k1"]


def test_a_corrupt_header_fails_loudly(tmp_path):
    path = tmp_path / "train-000000.tar"
    writer = ShardWriter(path)
    writer.write(Sample("train-00000", 1, 0, b"x" * 100, "png"))
    writer.close()
    data = bytearray(path.read_bytes())
    data[130] ^= 1                                              # a bit of the first member's size field
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(bytes(data)))


def test_decode_matches_pil_on_png_and_falls_back_to_pil(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from cbd_cache.data.shards import decode_image
    from cbd_cache.data.sources import encode_png

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 20), dtype=np.uint8)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert torch.equal(decode_image(encode_png(grey), 1), torch.from_numpy(grey)[None])
    assert torch.equal(decode_image(encode_png(rgb), 3), torch.from_numpy(rgb).permute(2, 0, 1))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="BMP")                # torchvision cannot decode BMP; PIL can
    assert torch.equal(decode_image(buf.getvalue(), 3), torch.from_numpy(rgb).permute(2, 0, 1))
