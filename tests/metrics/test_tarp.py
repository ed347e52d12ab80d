"""TARP: calibrated vs too-narrow Gaussian toys, null distribution, bootstrap, cross-check vs PyPI tarp."""

import numpy as np
import pytest

from pipeline.metrics.tarp import (alpha_grid, bootstrap_ecp, ecp_at, max_deviation, null_distribution,
                                   tarp_credibility, tarp_null, tarp_null_ranks, tarp_summary)

N_OBS, N_S, D, BINS = 200, 500, 16, 20


def gaussian_toy(rng, width=1.0, n_obs=N_OBS, n_s=N_S, d=D):
    """Posterior N(m_i, 0.3^2 I); truths drawn from it; samples drawn with std width*0.3."""
    m = rng.normal(size=(n_obs, 1, d))
    truths = (m[:, 0] + 0.3 * rng.normal(size=(n_obs, d)))
    samples = m + width * 0.3 * rng.normal(size=(n_obs, n_s, d))
    return samples, truths


def test_calibrated_within_null_and_narrow_fails():
    rng = np.random.default_rng(11)
    samples, truths = gaussian_toy(rng)
    f = tarp_credibility(samples, truths, rng=rng)
    assert f.shape == (N_OBS,) and f.min() >= 0 and f.max() <= 1
    _, null = tarp_null_ranks(N_OBS, N_S, n_bins=BINS, rng=np.random.default_rng(5), n_sim=2000)
    p95 = np.percentile(null, 95)
    # null percentiles for this setup: 0.05 (median) / 0.085 (p95)
    assert 0.06 < p95 < 0.11 and 0.035 < np.median(null) < 0.065
    dev = max_deviation(f, BINS)
    assert dev <= p95
    narrow, truths2 = gaussian_toy(np.random.default_rng(12), width=0.3)
    dev_narrow = max_deviation(tarp_credibility(narrow, truths2, rng=rng), BINS)
    # 0.325 with this seed, calibrated 0.045
    assert dev_narrow > 3 * p95
    wide, truths3 = gaussian_toy(np.random.default_rng(13), width=2.0)
    assert max_deviation(tarp_credibility(wide, truths3, rng=rng), BINS) > 2 * p95  # 0.25 measured


def test_ignoring_y_is_calibrated():
    # a "sampler" that returns prior draws is calibrated when truths come from the prior: TARP passes
    rng = np.random.default_rng(3)
    truths = rng.normal(size=(N_OBS, D))
    samples = rng.normal(size=(N_OBS, N_S, D))
    f = tarp_credibility(samples, truths, rng=rng)
    assert max_deviation(f, BINS) < 0.11


@pytest.mark.slow
def test_null_gaussian_agrees_with_exact_rank_null():
    rng = np.random.default_rng(0)
    # pooled normalisation at a higher dimension: still the rank law
    _, gp = tarp_null(50, 64, 128, n_bins=10, rng=rng, n_sim=200, norm="pooled")
    ecp_r, rp = tarp_null_ranks(50, 64, n_bins=10, rng=rng, n_sim=3000)
    assert abs(np.percentile(gp, 95) - np.percentile(rp, 95)) < 0.03
    assert ecp_r.shape == (3000, 11) and np.all(ecp_r[:, 0] == 0) and np.all(ecp_r[:, -1] == 1)
    assert np.abs(ecp_r.mean(0) - np.linspace(0, 1, 11)).max() < 0.01  # unbiased ECP under the null
    _, g = tarp_null(50, 64, 32, n_bins=10, rng=rng, n_sim=300, norm="none")
    _, r = tarp_null_ranks(50, 64, n_bins=10, rng=rng, n_sim=3000)
    # without normalisation both are the same law; MC error of a p95 from 300 draws is ~0.01
    assert abs(np.percentile(g, 95) - np.percentile(r, 95)) < 0.025
    assert abs(np.median(g) - np.median(r)) < 0.015
    # fewer observations -> wider null (~0.25 at p95 for 20 observations, 20 bins)
    _, r20 = tarp_null_ranks(20, 500, n_bins=20, rng=rng, n_sim=3000)
    assert 0.2 < np.percentile(r20, 95) < 0.33


def test_pooled_normalisation_keeps_exact_null_truths_normalisation_does_not():
    # few observations, many dimensions: the regime of the CPU demo (tens of lenses, 1024 pixels)
    rng = np.random.default_rng(8)
    _, r = tarp_null_ranks(8, 32, n_bins=10, rng=rng, n_sim=3000)
    _, pooled = tarp_null(8, 32, 256, n_bins=10, rng=rng, n_sim=200, norm="pooled")
    _, truths = tarp_null(8, 32, 256, n_bins=10, rng=rng, n_sim=200, norm="truths")
    assert abs(np.percentile(pooled, 95) - np.percentile(r, 95)) <= 0.05  # 0.4 vs 0.4 measured
    assert np.percentile(truths, 95) > np.percentile(r, 95) + 0.2          # 0.8 measured
    assert np.median(truths) > np.median(r) + 0.2                          # 0.59 vs 0.25


def test_ecp_and_bootstrap():
    f = np.array([0.05, 0.15, 0.5, 0.95, 1.0])
    a = alpha_grid(4)
    np.testing.assert_allclose(ecp_at(f, a), [0.0, 0.4, 0.4, 0.6, 1.0])
    rng = np.random.default_rng(1)
    f = rng.uniform(size=100)
    boot, dev = bootstrap_ecp(f, 10, rng=np.random.default_rng(2), n_boot=200)
    boot2, _ = bootstrap_ecp(f, 10, rng=np.random.default_rng(2), n_boot=200)
    np.testing.assert_array_equal(boot, boot2)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    e = ecp_at(f, alpha_grid(10))
    assert np.all(lo <= e + 1e-12) and np.all(e <= hi + 1e-12)
    # bootstrap width of an ECP value at alpha=0.5 ~ 1.96*sqrt(0.25/100) each side
    assert 0.12 < (hi - lo)[5] < 0.28
    assert dev.shape == (200,)


def test_summary_keys_and_no_global_rng_use():
    rng = np.random.default_rng(4)
    samples, truths = gaussian_toy(rng, n_obs=30, n_s=40, d=8)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    s = tarp_summary(samples.reshape(30, 40, 2, 4), truths.reshape(30, 2, 4), n_bins=5,
                     rng=np.random.default_rng(9), n_boot=50, n_null=30)
    assert np.array_equal(np.random.get_state()[1], before)
    assert s["norm"] == "pooled" and s["n_obs"] == 30 and s["n_samples"] == 40 and s["n_alpha_bins"] == 5 and len(s["ecp"]) == 6
    # no bootstrap "interval" of the maximum (it does not cover the true value); the p-value instead
    assert "tarp_max_dev_ci" not in s
    assert 0 <= s["tarp_p_value"] <= 1
    assert 0 < s["tarp_null_p50"] <= s["tarp_null_p95"] < 1
    ecp_t, dev_t = null_distribution(30, 40, 8, n_bins=5, rng=np.random.default_rng(0), norm="truths", n_sim=20)
    assert ecp_t.shape == (20, 6) and dev_t.shape == (20,)


def test_cross_check_against_pypi_tarp():
    tarp = pytest.importorskip("tarp")
    rng = np.random.default_rng(21)
    samples, truths = gaussian_toy(rng, n_obs=100, n_s=200, d=6)
    refs = rng.uniform(size=truths.shape)
    mine = tarp_credibility(samples, truths, references=refs, norm="truths")
    s_copy, t_copy = samples.copy(), truths.copy()
    state = np.random.get_state()  # tarp reseeds the global numpy RNG: restore it
    try:
        # tarp wants (n_samples, n_sims, d) and mutates/reads its inputs: pass copies
        ecp_t, alpha_t = tarp.get_tarp_coverage(np.ascontiguousarray(samples.transpose(1, 0, 2)).copy(),
                                                truths.copy(), references=refs.copy(), norm=True,
                                                num_alpha_bins=10, seed=0)
    finally:
        np.random.set_state(state)
    assert np.array_equal(samples, s_copy) and np.array_equal(truths, t_copy)
    # tarp's histogram spans [min f, max f] (no range=(0,1)): evaluate our ECP on its alpha grid
    # (its last bin is closed at max f, where its ECP is 1 by construction)
    np.testing.assert_allclose(ecp_at(mine, alpha_t[:-1]), ecp_t[:-1], atol=1e-9)
    assert ecp_t[-1] == pytest.approx(1.0) and alpha_t[-1] == pytest.approx(mine.max())


def test_max_dev_p_value_is_valid_for_exact_samplers():
    from pipeline.metrics.tarp import null_p_value

    assert null_p_value(0.2, [0.1, 0.2, 0.3, 0.4]) == 0.75  # ties count as "at least as large"
    # exact posteriors (Gaussian, 8 dims, 32 samples), 1000 simulated sets of 16 and of 64 observations:
    # P(p <= a) must not exceed a by more than 3 Monte-Carlo sd (the statistic is discrete, so the test is
    # somewhat conservative: measured 0.04 and 0.03 at a = 0.05 on 400 sets)
    n_sets = 1000
    for n_obs in (16, 64):
        rng = np.random.default_rng(100 + n_obs)
        _, null = null_distribution(n_obs, 32, 8, n_bins=10, rng=rng, n_sim=2000)
        ps = np.empty(n_sets)
        for k in range(n_sets):
            m = rng.normal(size=(n_obs, 1, 8))
            s = rng.uniform(0.1, 0.5, size=(n_obs, 1, 1))
            d = m + s * rng.normal(size=(n_obs, 33, 8))
            ps[k] = null_p_value(max_deviation(tarp_credibility(d[:, 1:], d[:, 0], rng=rng), 10), null)
        for a in (0.05, 0.1, 0.5):
            assert np.mean(ps <= a) <= a + 3 * np.sqrt(a * (1 - a) / n_sets)
        # and not vacuous: the largest attainable p-value below 0.5 is reached about as often as it says
        # (3 sd of the sets' and of the 2000-draw null's Monte-Carlo error together)
        p_mid = ps[ps <= 0.5].max()
        tol = 3 * np.sqrt(p_mid * (1 - p_mid) * (1 / n_sets + 1 / 2000))
        assert np.mean(ps <= p_mid) == pytest.approx(p_mid, abs=tol)
    # a too-narrow sampler is rejected
    rng = np.random.default_rng(3)
    narrow, truths = gaussian_toy(rng, width=0.5, n_obs=64, n_s=32, d=8)
    _, null = null_distribution(64, 32, 8, n_bins=10, rng=rng, n_sim=2000)
    assert null_p_value(max_deviation(tarp_credibility(narrow, truths, rng=rng), 10), null) < 0.01
