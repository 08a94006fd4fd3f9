import numpy as np

from cbd_cache.data.longtail import (
    IMAGENET_LT_GROUPS,
    exponential_profile,
    imagenet_lt_shape_profile,
    longtail_subset,
    shot_group,
)
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.sampling import copies, repeat_factors
from cbd_cache.loaders import TrainStream
from cbd_cache.views import ViewSpec

from .conftest import smoke_config


def test_exponential_profile_spans_imagenet_lt():
    counts = exponential_profile(1280, 256, 10)
    assert counts[0] == 1280 and counts[-1] == 5
    assert counts == sorted(counts, reverse=True)
    assert 2700 < sum(counts) < 2900                       # "about 2.8k training images"
    assert [shot_group(n) for n in counts].count("few") == 3


def test_longtail_subset_is_seeded_and_follows_the_profile():
    labels = np.repeat(np.arange(10), 2000)
    counts = exponential_profile(1280, 256, 10)
    a = longtail_subset(labels, 10, counts, seed=0)
    b = longtail_subset(labels, 10, counts, seed=0)
    c = longtail_subset(labels, 10, counts, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(np.bincount(labels[a]), reverse=True) == counts


def test_imagenet_lt_shape_has_imagenet_lt_group_shares_and_the_data_s_own_ends():
    for n_max, imbalance, classes in ((1280, 256, 1000), (150, 100, 200), (300, 150, 400)):
        counts = imagenet_lt_shape_profile(n_max, imbalance, classes)
        assert counts[0] == n_max and counts[-1] == max(1, int(n_max / imbalance))
        assert counts == sorted(counts, reverse=True)
        groups = [sum(shot_group(n) == g for n in counts) for g in ("many", "medium", "few")]
        # each group's share is ImageNet-LT's to within one class
        assert all(abs(g / classes - s / 1000) <= 1 / classes for g, s in zip(groups, IMAGENET_LT_GROUPS)), groups
    # the exponential profile puts most classes in the few-shot group at these ends
    assert sum(shot_group(n) == "few" for n in exponential_profile(150, 100, 200)) > 100


def test_repeat_factors_balance_classes_in_expectation():
    counts = np.array([1000, 100, 10, 0])
    r = repeat_factors(counts, "class_balanced")
    assert r[3] == 0
    np.testing.assert_allclose(r[:3] * counts[:3], counts.sum() / 3)  # each present class: N / C per epoch
    np.testing.assert_array_equal(repeat_factors(counts, "instance"), [1, 1, 1, 0])


def test_copies_is_floor_plus_bernoulli():
    assert copies(2.25, 0.1) == 3 and copies(2.25, 0.3) == 2
    assert copies(0.5, 0.49) == 1 and copies(0.5, 0.51) == 0
    draws = [copies(0.3, u) for u in np.random.default_rng(0).random(20000)]
    assert abs(np.mean(draws) - 0.3) < 0.01


def _class_histogram(manifest, sampling, epochs, seed=0):
    cfg = smoke_config()
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=sampling, seed=seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=256)
    it = iter(stream)
    labels = [next(it)[1] for _ in range(epochs * manifest.train.num_samples)]
    return np.bincount(labels, minlength=manifest.num_classes) / len(labels)


def test_class_balanced_stream_is_uniform_over_classes(smoke_workdir):
    manifest = Manifest.load(smoke_workdir.manifest)
    counts = np.array(manifest.train.class_counts)
    assert counts.max() / counts.min() >= 10               # the manifest really is long-tailed
    # Tolerance: over 3 epochs (681 samples) each class's share is within 0.04 of 1/C = 0.1
    # (binomial std is ~0.012; the Bernoulli repeats and shard cycling add a little more).
    hist = _class_histogram(manifest, "class_balanced", epochs=3)
    np.testing.assert_allclose(hist, 1 / manifest.num_classes, atol=0.04)
    inst = _class_histogram(manifest, "instance", epochs=3)
    np.testing.assert_allclose(inst, counts / counts.sum(), atol=0.03)   # instance sampling keeps the tail


def test_stream_is_deterministic_and_emits_quota(smoke_workdir):
    manifest = Manifest.load(smoke_workdir.manifest)
    cfg = smoke_config()
    make = lambda: TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="class_balanced", seed=3,
                               samples_per_epoch=50, shuffle_buffer=64)
    a = [(r[2], r[1]) for _, r in zip(range(120), make())]
    b = [(r[2], r[1]) for _, r in zip(range(120), make())]
    assert a == b


def test_draws_allocation_follows_the_class_balanced_draws_with_the_same_budget():
    """The embedded default's span (1280 -> 5 images a class, N = 2,773): a 5-image class gets 444 views, a 1,280 one 2."""
    from cbd_cache.data.sampling import view_counts

    class_counts = exponential_profile(1280, 256, 10)
    assert sum(class_counts) == 2773
    labels = np.repeat(np.arange(10), class_counts)
    draws = view_counts(labels, class_counts, 8, "draws")
    assert draws[labels == 9][0] == 444 and draws[labels == 0][0] == 2
    assert draws.sum() == 22430 and draws.sum() / (8 * len(labels)) < 1.02   # the budget N * A, up to rounding
    assert view_counts(labels, class_counts, 8, "uniform").tolist() == [8] * len(labels)
    assert view_counts(labels, class_counts, 1, "draws", min_views=3).min() == 3
    small, large = view_counts(labels, class_counts, 4, "draws"), view_counts(labels, class_counts, 16, "draws")
    assert (small <= draws).all() and (draws <= large).all()         # a smaller budget is a prefix of each image's


def test_the_walk_visits_every_view_once_per_lap_in_a_seeded_order():
    from cbd_cache.data.sampling import ViewWalk, walk_start

    walk_view = ViewWalk(7).view
    laps = [[walk_view(42, lap * 5 + k, 5) for k in range(5)] for lap in range(3)]
    assert all(sorted(lap) == [0, 1, 2, 3, 4] for lap in laps) and laps[0] != laps[1]
    assert laps[0] == [ViewWalk(7).view(42, k, 5) for k in range(5)]   # pure: the same every time
    assert laps == [[0, 4, 2, 1, 3], [0, 1, 3, 4, 2], [3, 0, 1, 4, 2]]   # pinned
    assert walk_view(43, 0, 1) == 0
    kept = ViewWalk(7)   # keeping each image's latest lap changes nothing, back and forth over laps and counts
    positions = [(12, 5), (0, 5), (13, 5), (3, 5), (3, 9), (12, 5)]
    assert [kept.view(42, p, c) for p, c in positions] == [ViewWalk(7).view(42, p, c) for p, c in positions]
    assert [walk_start(e, 55.0, 3) for e in range(3)] == [0, 55, 110]
    # images drawn less than once an epoch step to their next view in different epochs
    assert len({walk_start(1, 0.25, row) for row in range(8)}) == 2
