"""Calibration: 15-bin ECE, the reliability bins and their pooling over seeds."""
import numpy as np
import pytest

from cbd_cache.train.calibration import BINS, calibration_report, ece_of, pool, reliability


def direct_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s definition, written out: bins (lo, hi] of width 1/15, sum_b n_b/n |acc_b - conf_b|, in percent."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return 100.0 * total


def fixture(seed: int, n: int = 5000):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.1, 1.0, n) ** 0.5            # over-confident on purpose: accuracy below confidence
    correct = rng.random(n) < conf ** 2
    return conf, correct


def test_ece_equals_the_direct_computation():
    for seed in range(3):
        conf, correct = fixture(seed)
        report = calibration_report(conf, correct)
        assert report["ece"] == pytest.approx(direct_ece(conf, correct), abs=1e-6)
        assert report["ece"] > 5.0 and BINS == report["calibration"]["bins"] == 15
        assert sum(report["calibration"]["count"]) == len(conf)
    perfect = np.repeat([0.25, 0.75], 4)                # each bin's accuracy is its confidence: ECE 0
    assert calibration_report(perfect, np.array([1, 0, 0, 0, 1, 1, 1, 0], bool))["ece"] == pytest.approx(0.0, abs=1e-9)


def test_bins_of_several_runs_pool_into_the_bins_of_all_their_predictions():
    (c1, k1), (c2, k2) = fixture(4, 700), fixture(5, 1300)
    pooled = pool([reliability(c1, k1), reliability(c2, k2)])
    whole = reliability(np.concatenate([c1, c2]), np.concatenate([k1, k2]))
    assert pooled["count"] == whole["count"]
    np.testing.assert_allclose(pooled["accuracy"], whole["accuracy"], atol=1e-12)
    assert ece_of(pooled) == pytest.approx(ece_of(whole), abs=1e-9)
