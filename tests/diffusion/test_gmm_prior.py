"""The analytic Gaussian-mixture prior: exact noised eps, and sampling its chain recovers the weights."""

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.schedule import NoiseSchedule


def _mixture():
    w = [0.2, 0.3, 0.5]
    means = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
    covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]), 0.15 * torch.eye(2),
                        torch.tensor([[0.25, -0.05], [-0.05, 0.35]])])
    return GaussianMixturePrior(w, means, covs)


def _independent_log_density(gmm, x, t):
    """log p_t(x) of the VP-noised mixture built with torch.distributions (independent code path)."""
    ab = float(gmm.schedule.abar(t))
    cov = ab * gmm.covs + (1 - ab) * torch.eye(gmm.dim, dtype=torch.float64)
    mix = MixtureSameFamily(Categorical(probs=gmm.weights), MultivariateNormal(math.sqrt(ab) * gmm.means, cov))
    return mix.log_prob(x)


@pytest.mark.parametrize("t", [1, 20, 200, 600, 1000])
def test_noised_density_and_eps_match_finite_differences(t):
    gmm = _mixture()
    g = torch.Generator().manual_seed(t)
    x = 2.0 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gmm.log_prob_noised(x, t), _independent_log_density(gmm, x, t), rtol=1e-10, atol=1e-10)
    h = 1e-5
    grad = torch.zeros_like(x)
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = h
        grad[:, i] = (_independent_log_density(gmm, x + e, t) - _independent_log_density(gmm, x - e, t)) / (2 * h)
    ab = float(gmm.schedule.abar(t))
    eps_fd = -math.sqrt(1 - ab) * grad
    eps = gmm.eps(x, t)
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps, eps_fd, rtol=1e-6, atol=1e-7)
    # per-sample timesteps give the same answer as a scalar timestep
    torch.testing.assert_close(gmm.eps(x, torch.full((16,), t)), eps)


def test_exact_samples_have_the_mixture_moments():
    gmm = _mixture()
    x = gmm.sample(50000, generator=torch.Generator().manual_seed(0))
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=0.03, rtol=0)


def test_chain_with_K100_recovers_component_weights():
    gmm = _mixture()
    chain = NoiseSchedule().chain(100)
    x = sample_prior(gmm, chain, 10000, generator=torch.Generator().manual_seed(0), batch_size=5000)
    assert x.shape == (10000, 2) and bool(torch.isfinite(x).all())
    counts = torch.bincount(gmm.component_of(x), minlength=3).double() / len(x)
    tv = 0.5 * float((counts - gmm.weights).abs().sum())
    print(f"component frequencies {counts.tolist()} vs weights {gmm.weights.tolist()}: TV = {tv:.4f}")
    assert tv <= 0.05
