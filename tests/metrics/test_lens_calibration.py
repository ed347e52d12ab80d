"""Lens-parameter calibration judged against what exact samples score at the same sizes."""

import numpy as np
import pytest

from pipeline.metrics.lens_calibration import exact_bias_sd, exact_coverage_band, lens_calibration

NAMES = ["rein", "q", "g1"]


def _exact_set(rng, n_obs, n_s, scale=1.0, shift=0.0):
    # a Gaussian posterior per observation, the truth one more draw of it; ``scale`` mis-sizes the samples
    mean = rng.normal(size=(n_obs, 1, len(NAMES)))
    sd = np.exp(rng.normal(size=(n_obs, 1, len(NAMES)))) * np.array([0.01, 0.05, 0.02])
    truths = (mean + sd * rng.normal(size=mean.shape))[:, 0]
    samples = mean + shift * sd + scale * sd * rng.normal(size=(n_obs, n_s, len(NAMES)))
    return samples, truths


def test_bands_are_the_issue_levels_at_64_observations_of_32_samples():
    lo, ref, hi = exact_coverage_band(64, 32, 0.68)
    assert ref == pytest.approx(23 / 33)
    assert (lo, hi) == (0.5, 0.875)
    lo, ref, hi = exact_coverage_band(64, 32, 0.95)
    assert ref == pytest.approx(31 / 33)
    assert lo == pytest.approx(0.83, abs=0.002) and hi == 1.0


def test_exact_bias_sd_matches_simulation():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(200000, 32))
    z = (s.mean(1) - rng.normal(size=200000)) / s.std(1, ddof=1)
    assert z.std() == pytest.approx(exact_bias_sd(32), rel=0.01)
    assert exact_bias_sd(32) == pytest.approx(1.05, abs=0.005)


def test_exact_samples_pass_at_the_designed_rate():
    # exact samples: each set fails with probability about 6 % (TARP's 5 % plus nine 0.1 % bands), so
    # at least 85 % of 40 sets pass (binomial: fewer would happen with probability below 1 %)
    rng = np.random.default_rng(1)
    passed = [lens_calibration(*_exact_set(rng, 64, 32), NAMES, rng=rng)["ok"] for _ in range(40)]
    assert np.mean(passed) >= 0.85


@pytest.mark.parametrize("scale,shift,what", [(0.5, 0.0, "coverage"), (1.0, 0.8, "bias")],
                         ids=["overconfident", "biased"])
def test_wrong_posteriors_fail(scale, shift, what):
    rng = np.random.default_rng(2)
    res = lens_calibration(*_exact_set(rng, 64, 32, scale=scale, shift=shift), NAMES, rng=rng)
    assert not res["ok"]
    p = res["parameters"]["rein"]
    if what == "coverage":
        assert p["coverage"][0.68] < p["band"][0.68][0]
    else:
        assert abs(p["bias"]) > p["bias_band"]


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="samples"):
        lens_calibration(np.zeros((4, 8, 2)), np.zeros((4, 3)), NAMES, rng=np.random.default_rng(0))
