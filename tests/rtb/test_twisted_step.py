"""The Gauss-Newton twisted last step: exact for a linear final denoise (Gaussian prior, lens operator)."""

import math

import pytest
import torch

from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.lensing import gaussian_check as gc
from pipeline.rtb.objective import policy_rollout, prior_eps
from pipeline.rtb.twisted_step import GaussNewtonLastStep

TINY = dict(source_npix=4, source_pixscale=0.3, image_npix=6, image_pixscale=0.3, supersample=1, psf_fwhm=0.3,
            psf_npix=5, length_scale=0.4)


def _setup(K=10, snr=2.0):
    setup = gc.CheckSetup(**TINY, snr=snr, K=K)
    prior = gc.GaussianProcessPrior(gc.se_covariance(4, 0.3, 0.4, 1.0))
    chain = prior.schedule.chain(setup.K, setup.variance)
    problem, _ = gc.build_problem(setup, prior, seed=0)
    g = torch.Generator().manual_seed(3)
    y = problem.simulate(sample_prior(prior, chain, 1, generator=g), generator=g)[0]
    return prior, chain, problem, y


def _f(prior, chain, x):
    return chain.final_denoise(x, prior_eps(prior, chain, x, 1))


def _log_z_step(prior, chain, problem, y, x2):
    """log of the integral of p(x_1 | x_2) p(y | f(x_1)) dx_1 in closed form (f is affine here)."""
    eps2 = prior_eps(prior, chain, x2, 2)
    mu = chain.reverse_mean(x2, eps2, 2).double()
    s = chain.reverse_std(2)
    d = mu.shape[1]
    F = torch.autograd.functional.jacobian(lambda v: _f(prior, chain, v[None])[0], torch.zeros(d, dtype=torch.float64))
    AF = problem.dense_matrix() @ F
    keep = problem.mask.reshape(-1)
    cov = s ** 2 * AF @ AF.T + torch.diag(problem.sigma.double().reshape(-1) ** 2)
    cov = cov[keep][:, keep]
    out = []
    for b in range(mu.shape[0]):
        mean = problem.forward(_f(prior, chain, mu[b:b + 1].float())).double().reshape(-1)[keep]
        r = y.double().reshape(-1)[keep] - mean
        out.append(torch.distributions.MultivariateNormal(torch.zeros_like(r), cov).log_prob(r))
    return torch.stack(out)


def test_twisted_step_is_the_exact_product_when_the_final_denoise_is_affine():
    prior, chain, problem, y = _setup()
    g = torch.Generator().manual_seed(0)
    n = 64
    x2 = torch.randn(n, 16, generator=g)
    eps2 = prior_eps(prior, chain, x2, 2)
    # a deliberately poor linearisation point: Gauss-Newton on an affine f is exact after one iteration
    start = chain.reverse_mean(x2, eps2, 2) + 0.5 * torch.randn(n, 16, generator=g)
    z = torch.randn(n, 16, generator=g)
    step = GaussNewtonLastStep(prior, chain, problem, y, iterations=1)
    x1, log_q = step(x2, eps2, start, z)
    log_p = gaussian_log_prob(x1, chain.reverse_mean(x2, eps2, 2), chain.reverse_std(2))
    log_r = problem.log_likelihood(_f(prior, chain, x1), y)
    # q = p r / Z_step exactly: log p + log r - log q is the same for every x_1 and equals log Z_step(x_2)
    log_w = (log_p + log_r - log_q).double()
    want = _log_z_step(prior, chain, problem, y, x2)
    assert torch.allclose(log_w, want, atol=2e-3, rtol=0), (log_w - want).abs().max()
    x1b, log_qb = GaussNewtonLastStep(prior, chain, problem, y, iterations=2)(x2, eps2, start, z)
    assert torch.allclose(x1b, x1, atol=1e-4) and torch.allclose(log_qb, log_q, atol=1e-3)


def test_twisted_last_step_raises_the_elbo_of_a_rollout():
    """Given x_2, the twisted step maximises E[log p + log r - log q] over last steps: on the same x_2
    (same generator) the rollout's ELBO must rise over the prior's own last step."""
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import make_posterior

    prior, chain, problem, y = _setup()
    post = make_posterior(prior, chain, RTBConfig().with_fields(head_hidden=16, head_layers=1))
    post.eval()
    n = 256
    base = policy_rollout(post, n, y, problem=problem, generator=torch.Generator().manual_seed(5))
    step = GaussNewtonLastStep(prior, chain, problem, y, iterations=1)
    tw = policy_rollout(post, n, y, problem=problem, generator=torch.Generator().manual_seed(5), last_step=step)
    assert torch.equal(tw.xs[2], base.xs[2])  # the same trajectories up to x_2
    elbo = lambda b: float((b.log_r - b.log_ratio()).mean())  # noqa: E731
    gap = elbo(tw) - elbo(base)
    assert gap > 1.0, gap
    # and the twisted trajectory's last-step term is log Z_step(x_2), sample by sample
    last = (tw.log_p_steps[2] - tw.log_q_steps[2] + tw.log_r).double()
    assert torch.allclose(last, _log_z_step(prior, chain, problem, y, tw.xs[2]), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="tempering"):
        policy_rollout(post, 4, y, problem=problem, std_scale=1.5, last_step=step)


def test_twisted_step_refuses_a_nonlinear_problem_and_bad_iterations():
    prior, chain, problem, y = _setup()

    class Nonlinear:
        is_linear = False

    with pytest.raises(ValueError, match="linear forward model"):
        GaussNewtonLastStep(prior, chain, Nonlinear(), y)
    with pytest.raises(ValueError, match="iterations"):
        GaussNewtonLastStep(prior, chain, problem, y, iterations=0)
    assert math.isfinite(float(GaussNewtonLastStep(prior, chain, problem, y).d))
