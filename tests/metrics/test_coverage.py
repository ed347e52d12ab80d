"""Interval coverage, chi2_nu and sharpness on exact linear-Gaussian posteriors (closed form)."""

import numpy as np
import pytest
import torch

from pipeline.metrics.chi2 import chi2_per_sample, normalised_residual
from pipeline.metrics.coverage import (coverage_by_observation, exact_coverage_level, footprint, interval_coverage,
                                       rank_statistic)
from pipeline.metrics.sharpness import mean_error, prior_std_map, sharpness
from pipeline.problems import DenseLinearProblem


def linear_gaussian(seed=0, d_x=20, d_y=40, n_obs=150, n_s=60, width=1.0):
    """Prior N(0, C); y = M x + sigma n on unmasked rows; exact posterior samples (or width x too wide)."""
    rng = np.random.default_rng(seed)
    L = rng.normal(size=(d_x, d_x)) / np.sqrt(d_x)
    C = L @ L.T + 0.2 * np.eye(d_x)
    M = rng.normal(size=(d_y, d_x)) / np.sqrt(d_x)
    sigma = rng.uniform(0.2, 0.5, size=d_y)
    mask = np.ones(d_y, bool)
    mask[:4] = False
    prob = DenseLinearProblem(M, torch.tensor(sigma), torch.tensor(mask))
    Mm, Si = M[mask], 1.0 / sigma[mask] ** 2
    cov = np.linalg.inv(np.linalg.inv(C) + Mm.T @ (Si[:, None] * Mm))
    Lp = np.linalg.cholesky(cov)
    Lc = np.linalg.cholesky(C)
    truths = (Lc @ rng.normal(size=(d_x, n_obs))).T
    ys = truths @ M.T + sigma * rng.normal(size=(n_obs, d_y))
    ys[:, ~mask] = 0.0
    means = (cov @ (Mm.T @ (Si[:, None] * ys[:, mask].T))).T
    samples = means[:, None] + width * np.einsum("ij,onj->oni", Lp, rng.normal(size=(n_obs, n_s, d_x)))
    prior = (Lc @ rng.normal(size=(d_x, 4000))).T
    return prob, ys, truths, samples, means, cov, C, prior


def test_coverage_exact_gaussian():
    _, _, truths, samples, *_ = linear_gaussian()
    cov = interval_coverage(samples, truths)
    # 3000 pixel-observation pairs, correlated within an observation: se ~ 0.01; rank grid error 1/61
    assert cov[0.68] == pytest.approx(0.68, abs=0.035)
    assert cov[0.95] == pytest.approx(0.95, abs=0.02)
    _, _, truths2, narrow, *_ = linear_gaussian(width=0.5)
    cov_n = interval_coverage(narrow, truths2)
    assert cov_n[0.68] < 0.45 and cov_n[0.95] < 0.75
    u = rank_statistic(samples, truths)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_rank_statistic_ties_and_footprint():
    s = np.zeros((1, 9, 2))
    s[0, :, 1] = np.arange(9)
    t = np.array([[0.0, 100.0]])
    u = rank_statistic(s, t)
    assert u[0, 0] == pytest.approx(0.5) and u[0, 1] == pytest.approx(9.5 / 10)
    truths = np.array([[[0.0, 0.05], [0.5, 1.0]], [[-1.0, -2.0], [-3.0, -4.0]]])
    fp = footprint(truths, frac=0.1)
    np.testing.assert_array_equal(fp[0], [[False, False], [True, True]])
    assert not fp[1].any()  # no positive peak: empty footprint
    cov = interval_coverage(np.zeros((2, 5, 2, 2)), truths, mask=np.zeros((2, 2, 2), bool))
    assert np.isnan(cov[0.68])


def test_chi2_exact_posterior_is_one_and_prior_is_not():
    prob, ys, truths, samples, means, cov, C, prior = linear_gaussian(n_obs=120, n_s=40)
    chis, arcs = [], []
    for i in range(len(ys)):
        out = chi2_per_sample(prob, torch.tensor(samples[i], dtype=torch.float32), torch.tensor(ys[i]), batch=16)
        assert out["nu"] == 36 and out["chi2_nu"].shape == (40,) and out["chi2_nu"].dtype == np.float64
        chis.append(out["chi2_nu"])
        arcs.append(out["chi2_arc_nu"])
    chis, arcs = np.array(chis), np.array(arcs)
    # E[chi2_nu] = 1 exactly (exchangeability); Var(chi2_nu) = 2/36 per observation, 120 observations
    assert chis.mean() == pytest.approx(1.0, abs=0.07)
    assert np.nanmean(arcs) == pytest.approx(1.0, abs=0.1)
    # the truth itself: chi2_nu of the truth has the same law
    t_out = chi2_per_sample(prob, torch.tensor(truths, dtype=torch.float32), torch.tensor(ys))
    # (each truth against its own y: rows of ys broadcast per sample)
    assert t_out["chi2_nu"].mean() == pytest.approx(1.0, abs=0.08)
    # prior draws ignore y: their residuals are much larger than the noise
    p_out = chi2_per_sample(prob, torch.tensor(prior[:40], dtype=torch.float32), torch.tensor(ys[0]))
    assert np.median(p_out["chi2_nu"]) > 2.0
    r = normalised_residual(prob, truths[0], torch.tensor(ys[0]))
    assert np.isnan(r[:4]).all() and np.isfinite(r[4:]).all()
    np.testing.assert_allclose(np.nansum(r ** 2) / 36, t_out["chi2_nu"][0], rtol=1e-5)


def test_arc_defined_from_each_samples_model():
    M = np.eye(3)
    prob = DenseLinearProblem(M, torch.tensor([1.0, 1.0, 1.0]))
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([3.0, 5.0, 0.0])  # pixel 1 is bright in the data but not in either model
    out = chi2_per_sample(prob, x, y)
    assert out["n_arc"].tolist() == [1, 0]
    assert out["chi2_arc_nu"][0] == pytest.approx(1.0) and np.isnan(out["chi2_arc_nu"][1])
    assert out["chi2_nu"][0] == pytest.approx((1 + 25 + 0) / 3)


def test_sharpness_and_mean_error():
    prob, ys, truths, samples, means, cov, C, prior = linear_gaussian()
    ps = prior_std_map(prior)
    np.testing.assert_allclose(ps, np.sqrt(np.diag(C)), rtol=0.08)
    sh = sharpness(samples.std(1), ps)
    expected = np.sqrt(np.trace(cov) / np.trace(C))
    assert sh.shape == (150,) and np.median(sh) == pytest.approx(expected, rel=0.1)
    assert np.median(sharpness(prior[:60].std(0), ps)) == pytest.approx(1.0, abs=0.1)
    err = mean_error(samples.mean(1), truths)
    # E[err^2] = tr(cov)/d (+ MC error of the mean tr(cov)/(d n_s))
    assert np.sqrt(np.mean(err ** 2)) == pytest.approx(np.sqrt(np.trace(cov) / 20 * (1 + 1 / 60)), rel=0.1)
    with pytest.raises(ValueError):
        sharpness(samples.std(1), np.zeros(20))


def test_forward_view_uses_physical_forward():
    from pipeline.metrics.chi2 import forward_view

    class P(DenseLinearProblem):
        def physical_forward(self, x):  # x_phys = 2 x_net: the physical model is half the network one
            return 0.5 * self.A(x)

    prob = P(np.eye(3), torch.ones(3))
    x = torch.tensor([[2.0, 4.0, 6.0]])
    assert torch.allclose(forward_view(prob, "physical").forward(x), torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float32))
    assert forward_view(prob, "network") is prob
    out = chi2_per_sample(forward_view(prob, "physical"), x, torch.tensor([1.0, 2.0, 3.0]))
    assert out["chi2_nu"][0] == pytest.approx(0.0)


def test_exact_coverage_level_numbers_and_simulation():
    from pipeline.metrics.coverage import exact_coverage_level

    # the mid-rank rule's covered ranks out of the n + 1 equally likely ones
    assert exact_coverage_level(8, 0.68) == pytest.approx(7 / 9, abs=1e-12)
    assert exact_coverage_level(8, 0.95) == pytest.approx(9 / 9, abs=1e-12)
    assert exact_coverage_level(32, 0.68) == pytest.approx(23 / 33, abs=1e-12)
    assert exact_coverage_level(32, 0.95) == pytest.approx(31 / 33, abs=1e-12)
    # Monte Carlo: exact Gaussian posteriors N(m, s^2) per pixel (truth and samples from the same one),
    # 4000 observations x 10 independent pixels; the binomial sd of a coverage is <= 0.0025
    rng = np.random.default_rng(17)
    for n in (8, 32):
        m = rng.normal(size=(4000, 1, 10))
        s = rng.uniform(0.1, 2.0, size=(4000, 1, 10))
        draws = m + s * rng.normal(size=(4000, n + 1, 10))
        cov = interval_coverage(draws[:, 1:], draws[:, 0], levels=(0.5, 0.68, 0.9, 0.95))
        for c, v in cov.items():
            assert v == pytest.approx(exact_coverage_level(n, c), abs=0.01)  # 4 sd
    # at n = 8 the nominal 0.68 is far from what an exact sampler reaches
    assert abs(exact_coverage_level(8, 0.68) - 0.68) > 0.09
    with pytest.raises(ValueError):
        exact_coverage_level(0, 0.68)


def test_footprint_coverage_of_exact_samples_matches_the_exact_level():
    from pipeline.metrics.coverage import exact_coverage_level

    # 300 blob-shaped posterior means on 16 x 16 pixels, exact posterior N(m, 0.15^2) per pixel, 32 samples
    rng = np.random.default_rng(5)
    n_obs, n, N = 300, 32, 16
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    cx, cy = rng.normal(0, 2, (2, n_obs, 1, 1))
    w = rng.uniform(1.5, 3.0, (n_obs, 1, 1))
    m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w ** 2))
    truths = m + 0.15 * rng.normal(size=m.shape)
    samples = m[:, None] + 0.15 * rng.normal(size=(n_obs, n, N, N))
    fp = footprint(truths, 0.1, samples=samples)
    assert 15_000 < fp.sum() < 30_000  # ~23,000 (observation, pixel) pairs
    cov = interval_coverage(samples, truths, mask=fp)
    # binomial sd ~0.003 (0.68) and ~0.0016 (0.95); measured within 0.004 of the level on 3 seeds
    assert cov[0.68] == pytest.approx(exact_coverage_level(n, 0.68), abs=0.012)
    assert cov[0.95] == pytest.approx(exact_coverage_level(n, 0.95), abs=0.006)
    # selecting by the truth alone favours pixels where the truth is high, i.e. ranked high (0.61 here)
    biased = interval_coverage(samples, truths, mask=footprint(truths, 0.1))
    assert biased[0.68] < exact_coverage_level(n, 0.68) - 0.05


def test_coverage_z_of_exact_samples_is_standard_and_narrow_samples_fail():
    """z = (coverage - exact level) / se, se from the spread between observations: over many sets of
    64 observations x 32 exact samples of correlated posteriors, z has mean ~0 and spread ~1 (a binomial
    error over all pixels ignores their correlation and gives a spread well above 1), so the 2.6-se
    criterion rejects exact samplers rarely; samples 0.7x too narrow fail it."""
    from pipeline.metrics.coverage import coverage_by_observation, coverage_z
    z68, z95, narrow = [], [], []
    for rep in range(120):
        _, _, truths, samples, means, _, _, _ = linear_gaussian(seed=rep, n_obs=64, n_s=32)
        z68.append(coverage_z(samples, truths, 0.68)["z"])
        z95.append(coverage_z(samples, truths, 0.95)["z"])
        if rep < 10:
            tight = means[:, None] + 0.7 * (samples - means[:, None])
            narrow.append(coverage_z(tight, truths, 0.68)["z"])
    for z in (np.array(z68), np.array(z95)):
        assert abs(z.mean()) < 0.35 and 0.75 < z.std() < 1.3, (z.mean(), z.std())
        assert np.mean(np.abs(z) > 2.6) < 0.06
    assert max(narrow) < -2.6

    # strongly correlated pixels (equicorrelated, rho = 0.8): the between-observation se keeps z's spread
    # near 1, a binomial se over all pixels does not
    rng = np.random.default_rng(1)
    z, naive = [], []
    for _ in range(120):
        def draw(*shape):
            return np.sqrt(0.8) * rng.normal(size=shape + (1,)) + np.sqrt(0.2) * rng.normal(size=shape + (16,))
        mu = 3 * rng.normal(size=(64, 16))
        truths, samples = mu + draw(64), mu[:, None] + draw(64, 32)
        r = coverage_z(samples, truths, 0.68)
        z.append(r["z"])
        h, m = coverage_by_observation(samples, truths, 0.68)
        naive.append((r["coverage"] - r["ref"]) / np.sqrt(r["ref"] * (1 - r["ref"]) / m.sum()))
    assert 0.75 < np.std(z) < 1.3 and np.std(naive) > 1.6


def test_coverage_standard_error_equal_counts_is_std_over_root_n():
    from pipeline.metrics.coverage import coverage_standard_error
    c = np.array([0.6, 0.7, 0.8, 0.65])
    se = coverage_standard_error(c * 100, np.full(4, 100.0))
    assert se == pytest.approx(c.std(ddof=1) / 2, rel=1e-12)
    assert np.isnan(coverage_standard_error([5.0], [10.0]))
    assert coverage_standard_error([3.0, 0.0, 6.0], [10.0, 0.0, 10.0]) == pytest.approx(0.15, rel=1e-12)
    # unequal counts, the ratio estimator's: R = 8/30, residuals -2/3 and +2/3, sqrt(2 * 8/9) / 30
    assert coverage_standard_error([2.0, 6.0], [10.0, 20.0]) == pytest.approx(np.sqrt(16 / 9) / 30, rel=1e-12)


def test_share_of_observations_above_the_exact_level():
    # exact samples (64 correlated pixels, 64 observations x 32 samples): about half of the observations'
    # own 68 % coverages exceed the exact level (200 sets gave 0.52 on average, at most 0.70); samples
    # 1.3 x too wide put most of them above it
    ref = exact_coverage_level(32, 0.68)

    def share(width, seed):
        _, _, t, s, *_ = linear_gaussian(seed=seed, d_x=64, n_obs=64, n_s=32, width=width)
        hits, counts = coverage_by_observation(s, t, 0.68)
        return np.mean(hits / counts > ref)

    exact = [share(1.0, seed) for seed in range(30)]
    assert 0.45 <= np.mean(exact) <= 0.60 and max(exact) <= 0.75
    assert min(share(1.3, seed) for seed in range(5)) >= 0.8


def test_coverage_z_keeps_each_observations_coverage():
    from pipeline.metrics.coverage import coverage_z

    _, _, t, s, *_ = linear_gaussian(seed=3, n_obs=6, n_s=16)
    mask = np.ones(t.shape, bool)
    mask[2] = False  # an observation with no selected pixel has no coverage of its own
    r = coverage_z(s, t, 0.68, mask=mask)
    own = [interval_coverage(s[i:i + 1], t[i:i + 1], levels=(0.68,))[0.68] for i in range(6)]
    assert np.isnan(r["per_obs"][2])
    np.testing.assert_allclose(np.delete(r["per_obs"], 2), np.delete(own, 2), atol=1e-12)
