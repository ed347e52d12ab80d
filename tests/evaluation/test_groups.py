"""Grouping observations by signal-to-noise (:mod:`pipeline.evaluation.groups`,
:func:`pipeline.metrics.chi2.data_snr`): the groups must come from the data, not from the truth."""

import numpy as np
import pytest
import torch

from pipeline.evaluation.groups import snr_groups
from pipeline.metrics.chi2 import data_snr
from pipeline.metrics.coverage import coverage_by_observation, exact_coverage_level


class _Pixels:
    """y = x + noise on a masked pixel grid: all data_snr reads is sigma and the mask."""

    def __init__(self, sigma, mask):
        self.sigma, self.mask = torch.as_tensor(sigma), torch.as_tensor(mask)


def test_data_snr_reads_the_unmasked_data_only():
    sigma = np.full((4, 4), 2.0)
    mask = np.ones((4, 4), bool)
    mask[0] = False
    y = np.full((4, 4), 6.0)
    y[0] = 1e6  # masked: ignored
    # sum over the 12 unmasked pixels of (6/2)^2 = 108, minus 12
    assert data_snr(_Pixels(sigma, mask), torch.from_numpy(y)) == pytest.approx(np.sqrt(96.0), rel=1e-12)
    assert data_snr(_Pixels(sigma, mask), torch.zeros(4, 4)) == 0.0  # below the noise: 0, not NaN


def _flux_world(n_obs, d, n_s, sigma, seed):
    """x = F g + texture with F ~ N(5, 4) and a fixed profile g, y = x + N(0, sigma^2): the flux is weakly
    constrained at this sigma. Returns truths, exact posterior samples, data."""
    rng = np.random.default_rng(seed)
    g = np.exp(-np.linspace(-2, 2, d) ** 2)
    C = 4.0 * np.outer(g, g) + 0.05 * np.eye(d)
    x = 5.0 * g + rng.normal(size=(n_obs, d)) @ np.linalg.cholesky(C).T
    y = x + sigma * rng.normal(size=(n_obs, d))
    P = np.linalg.inv(np.linalg.inv(C) + np.eye(d) / sigma ** 2)
    mean = (P @ (np.linalg.solve(C, 5.0 * g)[:, None] + y.T / sigma ** 2)).T
    samples = mean[:, None] + rng.normal(size=(n_obs, n_s, d)) @ np.linalg.cholesky(P).T
    return x, samples, y, g


def test_exact_samples_stay_calibrated_in_data_snr_groups_and_not_in_truth_groups():
    """Exact samples cover the exact level in every data-SNR quartile (within 4 standard errors); grouped by
    the truth's noiseless peak instead, the outer quartiles cover far less and the middle ones more."""
    n_obs, d, n_s, sigma = 2000, 32, 32, 8.0
    x, samples, y, g = _flux_world(n_obs, d, n_s, sigma, seed=1)
    hits, counts = coverage_by_observation(samples, x, 0.68)
    per_obs = {"coverage68": (hits / counts).tolist(), "coverage95": (hits / counts).tolist(),
               "chi2_arc_median": [1.0] * n_obs}
    ref = exact_coverage_level(n_s, 0.68)
    problem = _Pixels(np.full(d, sigma), np.ones(d, bool))
    by_data = snr_groups(per_obs, [data_snr(problem, torch.from_numpy(v)) for v in y])
    by_truth = snr_groups(per_obs, list((x * (g > 0.5)).max(1) / sigma))
    se = np.std(hits / counts, ddof=1) / np.sqrt(n_obs / 4)
    for grp in by_data:
        assert abs(grp["coverage68"] - ref) < 4 * se
    truth_cov = [grp["coverage68"] for grp in by_truth]
    assert truth_cov[0] < ref - 0.04 and truth_cov[3] < ref - 0.04
    assert truth_cov[1] > ref + 0.02 and truth_cov[2] > ref + 0.02
