"""Per-step log-probs of rollouts, and the chain's exact Gaussian law vs Monte-Carlo."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from pipeline.diffusion.gaussian_chain import (affine_gaussian_step, gaussian_linear_posterior, gaussian_w2,
                                               propagate_gaussian_chain)
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import rollout
from pipeline.diffusion.schedule import NoiseSchedule, gaussian_log_prob


def _gauss_prior(d=4, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, generator=g, dtype=torch.float64)
    B = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
    S = std**2 * (B @ B.T + torch.eye(d, dtype=torch.float64))
    return m, S


def test_step_log_prob_equals_torch_normal():
    m, S = _gauss_prior(3)
    gmm = GaussianMixturePrior([0.4, 0.6], torch.stack([m, -m]), S)
    chain = NoiseSchedule().chain(12)
    shift = lambda x, k, eps: chain.reverse_mean(x, eps, k) + 0.3  # noqa: E731  a different policy
    traj = rollout(gmm, chain, 64, mean_fn=shift, generator=torch.Generator().manual_seed(0), std_scale=1.7)
    assert sorted(traj.log_q_steps) == list(range(2, 13))
    for k in range(2, 13):
        mean_p = chain.reverse_mean(traj.xs[k], traj.eps_prior[k], k)  # float32, as in the rollout
        std = chain.reverse_std(k)
        ref_p = Normal(mean_p.double(), std).log_prob(traj.xs[k - 1].double()).sum(-1)
        ref_q = Normal((mean_p + 0.3).double(), std).log_prob(traj.xs[k - 1].double()).sum(-1)
        assert traj.log_p_steps[k].dtype == torch.float64
        torch.testing.assert_close(traj.log_p_steps[k], ref_p, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(traj.log_q_steps[k], ref_q, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(traj.log_start, Normal(0.0, 1.0).log_prob(traj.xs[12].double()).sum(-1))
    torch.testing.assert_close(traj.x0, chain.final_denoise(traj.xs[1], traj.eps_prior[1]))
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(gaussian_log_prob(x, x * 0.5, 0.7),
                               Normal(x.double() * 0.5, 0.7).log_prob(x.double()).sum((1, 2)))


def test_affine_step_and_linear_posterior_against_independent_formulas():
    m, S = _gauss_prior(3, seed=3)
    M = torch.randn(3, 3, dtype=torch.float64)
    mean, cov = affine_gaussian_step(m, S, M, torch.ones(3), 0.2)
    torch.testing.assert_close(mean, M @ m + 1)
    torch.testing.assert_close(cov, M @ S @ M.T + 0.2 * torch.eye(3, dtype=torch.float64))
    A = torch.randn(2, 3, dtype=torch.float64)
    N = torch.tensor([0.1, 0.3], dtype=torch.float64)
    y = torch.tensor([0.5, -1.0], dtype=torch.float64)
    pm, pc, logz = gaussian_linear_posterior(m, S, A, N, y)
    prec = torch.linalg.inv(S) + A.T @ torch.diag(1 / N) @ A  # precision form
    torch.testing.assert_close(pc, torch.linalg.inv(prec), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pm, torch.linalg.solve(prec, torch.linalg.solve(S, m) + A.T @ (y / N)))
    ref = MultivariateNormal(A @ m, A @ S @ A.T + torch.diag(N)).log_prob(y)
    assert logz == pytest.approx(float(ref), abs=1e-10)


@pytest.mark.parametrize("K,variance,std,far", [(20, "small", 0.5, True), (20, "large", 0.5, False),
                                                (50, "small", 0.1, True)])
def test_chain_marginals_match_monte_carlo(K, variance, std, far):
    """Exact propagation through the K linear-Gaussian steps (and f) vs samples of the actual chain."""
    d = 4
    m, S = _gauss_prior(d, std=std)
    prior = GaussianMixturePrior([1.0], m[None], S[None])
    chain = NoiseSchedule().chain(K, variance)
    ref = propagate_gaussian_chain(chain, m, S)
    n = 20000
    traj = rollout(prior, chain, n, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    for k in (0, 1, K // 2, K - 1):
        x = traj.xs[k]
        mean, cov = ref["mean"][k], ref["cov"][k]
        sd = cov.diagonal().sqrt()
        z_mean = (x.mean(0) - mean) / (sd / math.sqrt(n))
        emp = torch.cov(x.T)
        se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / n).sqrt()
        z_cov = (emp - cov) / se_cov
        assert float(z_mean.abs().max()) < 5.0, (k, z_mean)
        assert float(z_cov.abs().max()) < 5.0, (k, z_cov)
    # the chain is not the analytic prior it was built from: report (and check) how far it is
    w2_chain_mc = gaussian_w2(traj.x0.mean(0), torch.cov(traj.x0.T), ref["x0_mean"], ref["x0_cov"])
    w2_prior = gaussian_w2(ref["x0_mean"], ref["x0_cov"], m, S)
    ratio = (ref["x0_cov"].diagonal() / S.diagonal()).sqrt()
    print(f"K={K} {variance} std={std}: W2(MC chain, propagated) = {w2_chain_mc:.4f}, "
          f"W2(propagated chain, analytic prior) = {w2_prior:.4f}, chain/prior std ratios {ratio.tolist()}")
    assert w2_chain_mc < 0.05 * math.sqrt(float(S.trace()))
    if far:  # with beta-tilde variances the chain is measurably narrower than the analytic prior
        assert w2_prior > 5 * w2_chain_mc
        assert float(ratio.max()) < 0.9


def test_chain_std_for_isotropic_prior():
    """A fixed number: per-pixel std 0.1, K=20, beta-tilde -> the chain's x0 std is 0.466x the prior's."""
    ref = propagate_gaussian_chain(NoiseSchedule().chain(20), torch.zeros(2), 0.01)
    ratio = ref["x0_cov"].diagonal().sqrt() / 0.1
    torch.testing.assert_close(ratio, torch.full((2,), 0.4656, dtype=torch.float64), atol=5e-4, rtol=0)
    big = propagate_gaussian_chain(NoiseSchedule().chain(1000), torch.zeros(2), 1.0)
    # with every training step the chain is close to the prior (discretisation error only)
    assert abs(float(big["x0_cov"][0, 0]) - 1.0) < 0.02
