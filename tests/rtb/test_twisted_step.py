"""The Gauss-Newton twisted last step: exact for a linear final denoise (Gaussian prior, lens operator)."""

import math

import pytest
import torch

from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.schedule import gaussian_log_prob
from pipeline.lensing import gaussian_check as gc
from pipeline.rtb.objective import policy_rollout, prior_eps
from pipeline.rtb.twisted_step import GaussNewtonLastStep, SharedGaussNewtonLastStep

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


def _states(prior, chain, n, seed, jitter):
    """(generator, x_2 (n, 16), its prior eps, a linearisation point jittered off the prior's step mean)."""
    g = torch.Generator().manual_seed(seed)
    x2 = torch.randn(n, 16, generator=g)
    eps2 = prior_eps(prior, chain, x2, 2)
    return g, x2, eps2, chain.reverse_mean(x2, eps2, 2) + jitter * torch.randn(n, 16, generator=g)


def _step_log_weight(prior, chain, problem, y, x2, eps2, x1, log_q):
    """log p(x_1 | x_2) + log r(f(x_1)) - log q(x_1 | x_2): log Z_step(x_2) for every x_1 when q is exact."""
    log_p = gaussian_log_prob(x1, chain.reverse_mean(x2, eps2, 2), chain.reverse_std(2))
    return (log_p + problem.log_likelihood(_f(prior, chain, x1), y) - log_q).double()


def test_twisted_step_is_the_exact_product_when_the_final_denoise_is_affine():
    prior, chain, problem, y = _setup()
    n = 64
    # a deliberately poor linearisation point: Gauss-Newton on an affine f is exact after one iteration
    g, x2, eps2, start = _states(prior, chain, n, seed=0, jitter=0.5)
    z = torch.randn(n, 16, generator=g)
    step = GaussNewtonLastStep(prior, chain, problem, y, iterations=1)
    x1, log_q = step(x2, eps2, start, z)
    # q = p r / Z_step exactly: log p + log r - log q is the same for every x_1 and equals log Z_step(x_2)
    log_w = _step_log_weight(prior, chain, problem, y, x2, eps2, x1, log_q)
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


def test_shared_step_is_exact_for_every_sample_when_the_final_denoise_is_affine():
    # one linearisation serves every sample: for an affine f it is the exact product wherever it is made
    prior, chain, problem, y = _setup()
    n = 64
    g, x2, eps2, start = _states(prior, chain, n, seed=1, jitter=0.5)
    x1, log_q = SharedGaussNewtonLastStep(prior, chain, problem, y, iterations=1)(x2, eps2, start,
                                                                                  torch.randn(n, 16, generator=g))
    log_w = _step_log_weight(prior, chain, problem, y, x2, eps2, x1, log_q)
    want = _log_z_step(prior, chain, problem, y, x2)
    assert torch.allclose(log_w, want, atol=2e-3, rtol=0), (log_w - want).abs().max()


def test_low_rank_step_samples_and_scores_one_exact_gaussian():
    # rank k < d: x_1 ~ N(m_i, P^-1) with P = I/s^2 + Q (L L^T - I/s^2) Q^T, and log q is that density
    prior, chain, problem, y = _setup()
    n = 32
    g, x2, eps2, start = _states(prior, chain, n, seed=2, jitter=0.0)
    step = SharedGaussNewtonLastStep(prior, chain, problem, y, iterations=1, rank=5)
    x1, log_q = step(x2, eps2, start, torch.randn(n, 16, generator=g))
    mu = chain.reverse_mean(x2, eps2, 2).double()
    s = chain.reverse_std(2)
    m, (Q, L) = step._means(mu, s, start.double().mean(0))
    assert Q.shape == (16, 5) and torch.allclose(Q.T @ Q, torch.eye(5, dtype=torch.float64), atol=1e-10)
    P = torch.eye(16, dtype=torch.float64) / s ** 2 + Q @ (L @ L.T - torch.eye(5, dtype=torch.float64) / s ** 2) @ Q.T
    want = torch.distributions.MultivariateNormal(m, precision_matrix=P).log_prob(x1.double())
    assert torch.allclose(log_q, want, atol=1e-6, rtol=0), (log_q - want).abs().max()
    # the draws have that Gaussian's law: whitened residuals are standard normal
    r = torch.linalg.cholesky(P).T @ (x1.double() - m).T
    assert abs(float(r.mean())) < 0.1 and abs(float(r.std()) - 1) < 0.1


def test_shared_steps_raise_the_elbo_and_full_rank_beats_low_rank():
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import make_posterior

    prior, chain, problem, y = _setup()
    post = make_posterior(prior, chain, RTBConfig().with_fields(head_hidden=16, head_layers=1))
    post.eval()
    n = 256

    def elbo(step):
        b = policy_rollout(post, n, y, problem=problem, generator=torch.Generator().manual_seed(5), last_step=step)
        return float((b.log_r - b.log_ratio()).mean())

    base = elbo(None)
    low = elbo(SharedGaussNewtonLastStep(prior, chain, problem, y, iterations=1, rank=3))
    full = elbo(SharedGaussNewtonLastStep(prior, chain, problem, y, iterations=1))
    assert base + 0.5 < low < full, (base, low, full)
    with pytest.raises(ValueError, match="rank"):
        SharedGaussNewtonLastStep(prior, chain, problem, y, rank=16)


def test_low_rank_step_keeping_the_policy_outside_is_one_exact_gaussian_per_sample():
    # outside Q the policy's own step N(pi_i, diag sd_i^2), projected there; log q is the density of
    # x_i ~ N(m_i, Q P_k^-1 Q^T + C C^T diag(sd_i^2) C C^T)
    prior, chain, problem, y = _setup()
    n = 8
    g, x2, eps2, pi = _states(prior, chain, n, seed=4, jitter=0.3)
    sd = chain.reverse_std(2) * torch.exp(0.3 * torch.randn(n, 16, generator=g))
    step = SharedGaussNewtonLastStep(prior, chain, problem, y, iterations=1, rank=5, outside="policy")
    x1, log_q = step(x2, eps2, pi, torch.randn(n, 16, generator=g), sd)
    mu = chain.reverse_mean(x2, eps2, 2).double()
    m, (Q, L) = step._means(mu, chain.reverse_std(2), pi.double().mean(0), pi.double())
    C = torch.linalg.qr(Q, mode="complete")[0][:, 5:]
    for i in range(n):
        cov = Q @ torch.cholesky_inverse(L) @ Q.T + C @ C.T @ torch.diag(sd[i].double() ** 2) @ C @ C.T
        want = torch.distributions.MultivariateNormal(m[i], cov).log_prob(x1[i].double())
        assert abs(float(log_q[i] - want)) < 1e-5  # x_1 is returned in float32
    # outside Q the means are the policy's
    torch.testing.assert_close(m @ C, pi.double() @ C)
    # a policy without a learned variance passes its std as a float: the complement is then s_pi^2 I
    x1f, log_qf = step(x2, eps2, pi, torch.randn(n, 16, generator=g), 0.07)
    for i in range(n):
        cov = Q @ torch.cholesky_inverse(L) @ Q.T + 0.07 ** 2 * C @ C.T
        want = torch.distributions.MultivariateNormal(m[i], cov).log_prob(x1f[i].double())
        assert abs(float(log_qf[i] - want)) < 1e-5  # x_1 is returned in float32
    with pytest.raises(ValueError, match="outside"):
        SharedGaussNewtonLastStep(prior, chain, problem, y, outside="policy")
