"""Export: resumable, settings-checked, and refusing teachers whose outputs are not finite."""
import numpy as np
import pytest
import zarr

from cbd_cache.errors import CacheError
from cbd_cache.stages.export import export_cache
from cbd_cache.system.runtime import make_runtime

from .conftest import smoke_config


def test_export_resumes_only_the_unfinished_shards(smoke_copy):
    cfg = smoke_config()
    group = zarr.open_group(str(smoke_copy.cache), mode="r+")
    before = group["descriptors/aug0"][:]
    group["shard_done"][3:] = 0
    group["descriptors/aug0"][group["view_offset"][96]:] = 0  # shards 3.. (32 rows each) lost
    untouched = (smoke_copy.cache / "descriptors" / "aug0" / "c" / "0" / "0").stat().st_mtime_ns
    export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
    after = zarr.open_group(str(smoke_copy.cache), mode="r")
    assert after["shard_done"][:].all()
    np.testing.assert_allclose(after["descriptors/aug0"][:].astype(np.float32), before.astype(np.float32), atol=1e-3)
    # shard 0 was finished, so its chunk was not rewritten
    assert (smoke_copy.cache / "descriptors" / "aug0" / "c" / "0" / "0").stat().st_mtime_ns == untouched


def test_export_refuses_to_resume_a_cache_made_with_other_settings(smoke_copy):
    cfg = smoke_config("export.views=3")
    with pytest.raises(CacheError, match="views_per_image"):
        export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))


def test_export_refuses_a_teacher_with_non_finite_outputs(smoke_copy, monkeypatch):
    """NaN is the fill value that marks a missing chunk, so no NaN is ever written as a target."""
    import shutil

    import torch

    from cbd_cache.stages import export

    cfg = smoke_config()
    shutil.rmtree(smoke_copy.cache)
    monkeypatch.setattr(export, "teacher_target", lambda v: torch.full_like(v, float("nan")))
    with pytest.raises(CacheError, match=r"teacher std0 gives non-finite outputs on shard \d+ .*train or import it again"):
        export_cache(cfg, smoke_copy, make_runtime(cfg.pipeline))
