"""The posterior predictive check (pipeline.metrics.ppc) on exact linear-Gaussian posteriors: the chi2 law
it rests on, its false-alarm rate against the stated bound, and the flag on misfits."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.metrics.ppc import TAIL, chi2_band, chi2_pit, posterior_predictive_check
from pipeline.problems import DenseLinearProblem

D_X, D_Y, MASKED = 12, 48, 6  # source and data dimensions, masked data rows


def exact_posterior_draws(seed, n_obs, n_s, noise_factor=1.0, shift=0.0):
    """(problem, y per sample (n_obs * n_s, D_Y), samples (n_obs * n_s, D_X)): prior N(1, C), y = M x + sigma n
    (noise ``noise_factor`` x the problem's sigma) and ``n_s`` exact posterior draws per observation under the
    problem's sigma (plus ``shift`` on every coordinate)."""
    rng = np.random.default_rng(seed)
    L = rng.normal(size=(D_X, D_X)) / np.sqrt(D_X)
    C = L @ L.T + 0.3 * np.eye(D_X)
    M = rng.normal(size=(D_Y, D_X)) / np.sqrt(D_X)
    sigma = rng.uniform(0.2, 0.5, size=D_Y)
    mask = np.ones(D_Y, bool)
    mask[:MASKED] = False
    prob = DenseLinearProblem(M, torch.tensor(sigma), torch.tensor(mask))
    m0 = np.ones(D_X)
    Mm, w = M[mask], 1.0 / sigma[mask] ** 2
    Ci = np.linalg.inv(C)
    cov = np.linalg.inv(Ci + Mm.T @ (w[:, None] * Mm))
    truths = m0 + rng.normal(size=(n_obs, D_X)) @ np.linalg.cholesky(C).T
    ys = truths @ M.T + noise_factor * sigma * rng.normal(size=(n_obs, D_Y))
    ys[:, ~mask] = 0.0
    means = (cov @ (Ci @ m0[:, None] + Mm.T @ (w[:, None] * ys[:, mask].T))).T
    draws = means[:, None] + shift + rng.normal(size=(n_obs, n_s, D_X)) @ np.linalg.cholesky(cov).T
    return prob, np.repeat(ys, n_s, axis=0), draws.reshape(-1, D_X)


def checks(seed, n_obs, n_s, tail=TAIL, **kw):
    """The check of each observation's ``n_s`` exact draws; returns (results, chi2 dict of all draws)."""
    prob, ys, draws = exact_posterior_draws(seed, n_obs, n_s, **kw)
    chi = chi2_per_sample(prob, torch.tensor(draws, dtype=torch.float32), torch.tensor(ys), batch=4096)
    res = []
    for i in range(n_obs):
        part = slice(i * n_s, (i + 1) * n_s)
        one = {k: chi[k][part] for k in ("chi2_nu", "chi2_arc_nu", "n_arc")}
        res.append(posterior_predictive_check({**one, "nu": chi["nu"]}, tail=tail))
    return res, chi


def upper_count(n, p, q=0.999):
    """The count a Binomial(n, p) exceeds with probability < 1 - q: the tolerance on a measured rate."""
    return stats.binom.ppf(q, n, p)


# ------------------------------------------------------------------------------------ the law
def test_chi2_of_exact_samples_follows_chi2_m_over_the_image_and_the_arc():
    _, chi = checks(seed=1, n_obs=3000, n_s=1)
    m = D_Y - MASKED
    assert chi["nu"] == m
    assert stats.kstest(chi["chi2_nu"] * m, stats.chi2(m).cdf).pvalue > 1e-3
    has = chi["n_arc"] > 0
    assert 0.9 < has.mean() and 5 < np.median(chi["n_arc"][has]) < m  # the arc is a proper subset here
    u_arc = chi2_pit(chi["chi2_arc_nu"][has], chi["n_arc"][has])
    assert stats.kstest(u_arc, "uniform").pvalue > 1e-3


def test_the_law_rejects_a_misfit():
    """The KS test above can fail: with the noise 20 % above the assumed sigma the chi2 is not chi2_m."""
    _, chi = checks(seed=1, n_obs=3000, n_s=1, noise_factor=1.2)
    m = chi["nu"]
    assert stats.kstest(chi["chi2_nu"] * m, stats.chi2(m).cdf).pvalue < 1e-6


def test_one_exact_sample_is_flagged_at_exactly_the_tail_rate():
    """S = 1: the image PIT is uniform, so P(flag on the image) = 2 tail exactly (here 10 %)."""
    n, tail = 3000, 0.05
    res, _ = checks(seed=2, n_obs=n, n_s=1, tail=tail)
    img = sum(not (tail <= r.image_pit <= 1 - tail) for r in res)
    sd = math.sqrt(n * 2 * tail * (1 - 2 * tail))
    assert abs(img - n * 2 * tail) < 4 * sd
    assert img <= sum(r.flag for r in res) <= upper_count(n, 8 * tail)


@pytest.mark.parametrize("tail", [TAIL, 0.05])
def test_false_alarm_rate_of_exact_samples_is_within_the_stated_bound(tail):
    """S = 8 correlated exact draws: P(flag) <= 4 tail per statistic and <= 8 tail in all (Markov), checked
    against the Binomial 99.9 % upper count at the bound."""
    n = 2000
    res, _ = checks(seed=3, n_obs=n, n_s=8, tail=tail)
    img = sum(not (tail <= r.image_pit <= 1 - tail) for r in res)
    arc = sum(r.arc_pit is not None and not (tail <= r.arc_pit <= 1 - tail) for r in res)
    assert img <= upper_count(n, 4 * tail) and arc <= upper_count(n, 4 * tail)
    assert sum(r.flag for r in res) <= upper_count(n, 8 * tail)


def test_misfits_are_flagged():
    """Noise twice the assumed sigma, or every draw shifted by 0.5: flagged nearly always."""
    for kw in ({"noise_factor": 2.0}, {"shift": 0.5}):
        res, _ = checks(seed=4, n_obs=200, n_s=8, **kw)
        assert np.mean([r.flag for r in res]) > 0.9, kw


# ------------------------------------------------------------------------------------ the result
def test_band_edges_are_the_chi2_quantiles_and_match_the_image_pit():
    lo, hi = chi2_band(1024)
    assert lo == pytest.approx(stats.chi2.ppf(0.0005, 1024) / 1024, rel=1e-12)
    assert hi == pytest.approx(stats.chi2.isf(0.0005, 1024) / 1024, rel=1e-12)
    assert (lo, hi) == pytest.approx((0.8609, 1.1518), abs=1e-4)
    for v, flag in ((lo * 0.999, True), (lo * 1.001, False), (hi * 0.999, False), (hi * 1.001, True)):
        r = posterior_predictive_check({"chi2_nu": np.full(5, v), "chi2_arc_nu": np.full(5, np.nan),
                                        "n_arc": np.zeros(5, int), "nu": 1024})
        assert r.flag is flag and r.image == pytest.approx(v)


def test_samples_without_arc_count_as_neutral_and_no_arc_at_all_is_judged_on_the_image():
    bad_arc = {"chi2_nu": np.ones(5), "chi2_arc_nu": np.array([9.0, 9.0, np.nan, np.nan, np.nan]),
               "n_arc": np.array([50, 70, 0, 0, 0]), "nu": 1024}
    r = posterior_predictive_check(bad_arc)
    assert r.arc_pit == 0.5 and not r.flag and r.n_no_arc == 3
    assert r.arc == 9.0 and r.arc_m == 60 and r.arc_band == chi2_band(60)
    bad_arc["n_arc"] = np.array([50, 70, 60, 0, 0])
    bad_arc["chi2_arc_nu"][2] = 9.0
    assert posterior_predictive_check(bad_arc).flag
    none = posterior_predictive_check({"chi2_nu": np.ones(3), "chi2_arc_nu": np.full(3, np.nan),
                                       "n_arc": np.zeros(3, int), "nu": 100})
    assert none.arc is None and none.arc_pit is None and none.arc_band is None and not none.flag
    assert "no arc pixel" in none.message()


def test_a_failed_sample_counts_as_the_worst_fit():
    chi = {"chi2_nu": np.array([1.0, np.nan, np.nan]), "chi2_arc_nu": np.full(3, np.nan),
           "n_arc": np.zeros(3, int), "nu": 1024}
    r = posterior_predictive_check(chi)
    assert r.flag and r.image == math.inf and r.image_pit == 1.0


def test_message_and_dict():
    r = posterior_predictive_check({"chi2_nu": np.array([1.4, 1.5, 1.45]), "chi2_arc_nu": np.array([2.0, 2.2, 2.1]),
                                    "n_arc": np.array([100, 120, 110]), "nu": 1024})
    msg = r.message()
    assert msg.startswith("misfit") and "1.450" in msg and "[0.861, 1.152]" in msg and "2.100" in msg
    assert "110 pixels" in msg
    d = json.loads(json.dumps(r.as_dict()))
    assert d["flag"] is True and d["image_band"] == pytest.approx(list(chi2_band(1024)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="tail"):
        posterior_predictive_check({"chi2_nu": [1.0], "chi2_arc_nu": [1.0], "n_arc": [3], "nu": 10}, tail=0.6)
    with pytest.raises(ValueError, match="at least one sample"):
        posterior_predictive_check({"chi2_nu": [], "chi2_arc_nu": [], "n_arc": [], "nu": 10})
    with pytest.raises(ValueError, match="m >= 1"):
        chi2_band(0)
