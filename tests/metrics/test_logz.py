"""log Z estimators: exact on the h-transform of a linear-Gaussian chain; per-observation grouping."""

import math

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import prior_eps
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.metrics.logz import (ess, estimate_logz, estimate_logz_grouped, estimate_logz_samples, log_weights,
                                   logmeanexp)
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.htransform import LinearGaussianHTransform
from pipeline.samplers.base import Samples


def _setup(K=12):
    mu0 = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
    S0 = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]], dtype=torch.float64)
    prior = GaussianMixturePrior([1.0], mu0[None], S0[None])
    chain = prior.schedule.chain(K)
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.5]], dtype=torch.float64)
    sig = 0.5
    problem = DenseLinearProblem(A, sig)
    y = torch.tensor([1.3, -0.4], dtype=torch.float64)
    h = LinearGaussianHTransform(chain, mu0, S0, A, torch.eye(2, dtype=torch.float64) * sig ** 2, y)
    return prior, chain, problem, y, h


def _package_log_weights(prior, chain, problem, y, s):
    """log r + log p_theta(tau) - log q(tau), with log p and log r computed by the package's own code."""
    xs = s["xs"]
    K = chain.K
    lp = gaussian_log_prob(xs[K], torch.zeros_like(xs[K]), 1.0)
    for k in range(K, 1, -1):
        eps = prior_eps(prior, chain, xs[k], k)
        lp = lp + gaussian_log_prob(xs[k - 1], chain.reverse_mean(xs[k], eps, k), chain.reverse_std(k))
    x0 = chain.final_denoise(xs[1], prior_eps(prior, chain, xs[1], 1))
    assert torch.allclose(x0, s["x0"], atol=1e-10)
    return log_weights(problem.log_likelihood(x0, y), lp, s["log_q"])


def test_both_estimators_exact_for_h_transform():
    prior, chain, problem, y, h = _setup()
    s = h.sample(4000, torch.Generator().manual_seed(0), tilted_start=True)
    lw = _package_log_weights(prior, chain, problem, y, s)
    est = estimate_logz(lw)
    logz = h.log_z()
    assert abs(est.elbo - logz) < 1e-6
    assert abs(est.iw - logz) < 1e-6
    assert est.ess == pytest.approx(4000, rel=1e-9)


def test_plain_start_weights_vary_by_log_h():
    prior, chain, problem, y, h = _setup()
    s = h.sample(4000, torch.Generator().manual_seed(1), tilted_start=False)
    lw = _package_log_weights(prior, chain, problem, y, s)
    # the weights are log h_K(x_K) + const: not constant; the ELBO is a lower bound in expectation
    assert float(lw.std()) > 1e-3
    est = estimate_logz(lw)
    assert est.elbo < h.log_z() + 3 * est.elbo_se
    # the spread matches the quadratic log h_K(x_K) (up to its additive constant)
    xK = s["xs"][chain.K]
    log_h = -0.5 * ((xK @ h.P[chain.K]) * xK).sum(1) + xK @ h.eta[chain.K]
    resid = lw - log_h
    assert float(resid.std()) < 1e-8


def test_log_z_matches_brute_force_prior_importance_sampling():
    prior, chain, problem, y, h = _setup(K=8)
    from pipeline.diffusion.sampling import rollout
    g = torch.Generator().manual_seed(2)
    tr = rollout(prior, chain, 200000, generator=g, dtype=torch.float64, keep_states=False)
    lr = problem.log_likelihood(tr.x0, y)
    # prior proposals: log w = log r; the estimate's MC error at this N is a few hundredths
    assert abs(logmeanexp(lr) - h.log_z()) < 0.05


def test_grouped_estimates_never_pool():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=g, dtype=torch.float64) * 0.1 - 3.0
    b = torch.randn(300, generator=g, dtype=torch.float64) * 0.1 + 5.0
    lw = torch.cat([a, b])
    groups = torch.cat([torch.zeros(500), torch.ones(300)]).long()
    per = estimate_logz_grouped(lw, groups)
    assert per[0].iw == pytest.approx(logmeanexp(a), abs=1e-12)
    assert per[1].iw == pytest.approx(logmeanexp(b), abs=1e-12)
    assert per[0].n == 500 and per[1].n == 300
    # pooling would be dominated by group 1
    assert abs(logmeanexp(lw) - per[0].iw) > 5


def test_elbo_standard_error_and_ess():
    lw = torch.tensor([0.0, 0.0, math.log(4.0)], dtype=torch.float64)
    est = estimate_logz(lw)
    assert est.elbo == pytest.approx(math.log(4.0) / 3)
    assert est.elbo_se == pytest.approx(float(lw.std()) / math.sqrt(3))
    assert est.iw == pytest.approx(math.log(2.0))
    assert ess(lw) == pytest.approx(36 / 18)
    assert ess(torch.tensor([0.0, -math.inf])) == pytest.approx(1.0)


def test_samples_without_trajectory_density_refused():
    s = Samples(x0=torch.zeros(3, 2), log_w=torch.zeros(3))
    with pytest.raises(ValueError, match="not available"):
        estimate_logz_samples(s)
    s2 = Samples(x0=torch.zeros(2, 1), log_r=torch.tensor([-1.0, -2.0]), log_q_traj=torch.tensor([0.5, 0.5]),
                 log_p_traj=torch.tensor([0.5, 0.5]))
    assert estimate_logz_samples(s2).iw == pytest.approx(logmeanexp(torch.tensor([-1.0, -2.0])))
