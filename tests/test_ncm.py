import numpy as np
import pytest

from cbd_cache.stages.ncm import ncm_fit, ncm_predict


def clusters(rng, n=60, d=8, offset=5.0):
    """Three classes around orthogonal directions, all shifted by one large common offset."""
    labels = np.repeat(np.arange(3), n)
    x = np.eye(d)[labels] + 0.1 * rng.standard_normal((3 * n, d)) + offset
    return x, labels


def test_ncm_centres_normalised_features_and_classifies_despite_a_common_offset():
    rng = np.random.default_rng(0)
    x, y = clusters(rng)
    center, means = ncm_fit(x, y, 3)
    np.testing.assert_allclose(center, (x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0))
    xt, yt = clusters(rng)
    assert (ncm_predict(xt, center, means) == yt).mean() > 0.95


def test_ncm_ignores_feature_scale_and_never_predicts_an_empty_class():
    rng = np.random.default_rng(1)
    x, y = clusters(rng, offset=0.0)
    center, means = ncm_fit(x, y, 4)                     # class 3 has no training feature
    xt, _ = clusters(rng, offset=0.0)
    preds = ncm_predict(xt, center, means)
    assert 3 not in preds
    np.testing.assert_array_equal(preds, ncm_predict(7.0 * xt, center, means))


@pytest.mark.slow
def test_ncm_on_cached_descriptors_decodes_no_training_image(smoke_copy, monkeypatch):
    from cbd_cache.stages import ncm
    from cbd_cache.system.runtime import make_runtime

    from .conftest import smoke_config

    cfg = smoke_config()
    runtime = make_runtime(cfg.pipeline)
    real = ncm._model_features

    def test_split_only(net, manifest, split, cfg, runtime):
        assert split == "test", "NCM from the cache ran the model over the training images"
        return real(net, manifest, split, cfg, runtime)

    monkeypatch.setattr(ncm, "_model_features", test_split_only)
    cached = ncm.ncm_report(cfg, smoke_copy, runtime, "teachers/std0", "cache")
    monkeypatch.setattr(ncm, "_model_features", real)
    images = ncm.ncm_report(cfg, smoke_copy, runtime, "teachers/std0", "images")
    for r in (cached, images):
        assert 0 <= r["top1"] <= 100 and len(r["per_class"]) == 10 and r["num_test"] == 200
    assert (smoke_copy.teacher_dir("std0") / "ncm_cache.json").is_file()
    with pytest.raises(FileNotFoundError, match="only teachers have cached descriptors"):
        ncm.ncm_report(cfg, smoke_copy, runtime, "students/none", "cache")
