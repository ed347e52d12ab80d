"""The conjugate-gradient step mean (``rtb.policy.step_mean_cg_iters``) and sampling without the head
(``rtb.policy.use_head: false``)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_section
from pipeline.errors import ConfigError
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.objective import policy_rollout
from pipeline.rtb.posterior import RTBPosterior, build_posterior
from pipeline.rtb.step_variance import cg_mean_shift, likelihood_step, tweedie_x0

from tests.rtb.test_data_step_variance import _assert_rollout_scores_again, _posterior

M = torch.tensor([[1.0, -0.5, 0.0, 0.2], [0.2, 1.0, 0.3, 0.0], [0.0, 0.4, -1.0, 0.6], [0.5, 0.0, 0.5, 1.0],
                  [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.8, -0.2]], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 2.0, 0.25, 0.5, 1.0])
MASK = torch.tensor([True, True, True, True, False, True])


def _exact_step(tau2, abar_prev, abar_k, xk, y):
    """Exact Gaussian-prior quantities at x_k for x_0 ~ N(0, tau2 I), the forward process and y = M x_0 + n
    (masked rows dropped): the prior's step mean and variance E/Var[x_{k-1} | x_k], E[x_0 | x_k], and the
    posterior step's mean E[x_{k-1} | x_k, y], from the joint covariance of (x_0, x_{k-1}, x_k, y)."""
    d = M.shape[1]
    A, s = M[MASK], SIGMA.double()[MASK]
    a1, ak = abar_prev ** 0.5, abar_k ** 0.5
    r = ak / a1  # x_k = r x_{k-1} + sqrt(1 - abar_k / abar_prev) e'
    I = torch.eye(d, dtype=torch.float64)
    c00 = tau2 * I
    c11 = (abar_prev * tau2 + 1 - abar_prev) * I
    ckk = (abar_k * tau2 + 1 - abar_k) * I
    blocks = {(0, 0): c00, (0, 1): a1 * c00, (0, 2): ak * c00, (1, 1): c11, (1, 2): r * c11, (2, 2): ckk,
              (0, 3): c00 @ A.T, (1, 3): a1 * c00 @ A.T, (2, 3): ak * c00 @ A.T,
              (3, 3): A @ c00 @ A.T + torch.diag(s ** 2)}
    sizes = [d, d, d, A.shape[0]]
    cov = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    off = [0, d, 2 * d, 3 * d]
    for (i, j), b in blocks.items():
        cov[off[i]:off[i] + sizes[i], off[j]:off[j] + sizes[j]] = b
        cov[off[j]:off[j] + sizes[j], off[i]:off[i] + sizes[i]] = b.T

    def cond(i, given, vals):
        idx = torch.cat([torch.arange(off[g], off[g] + sizes[g]) for g in given])
        rows = torch.arange(off[i], off[i] + sizes[i])
        w = torch.linalg.solve(cov[idx][:, idx], cov[idx][:, rows])
        return w.T @ torch.cat(vals), cov[rows][:, rows] - cov[rows][:, idx] @ w

    mu, var = cond(1, [2], [xk])
    x0hat, _ = cond(0, [2], [xk])
    post_mean, _ = cond(1, [2, 3], [xk, y[MASK]])
    return mu, float(var[0, 0]), x0hat, post_mean


@pytest.mark.parametrize("abar_prev,abar_k", [(0.999, 0.99), (0.9, 0.7), (0.3, 0.1)])
@pytest.mark.parametrize("tau2", [0.026, 1.0])
def test_cg_shift_is_the_exact_posterior_step_mean_with_a_coupled_operator(abar_prev, abar_k, tau2):
    """For a Gaussian prior and a linear operator that couples pixels (one image pixel masked, per-pixel
    sigma), the prior's step mean plus the converged CG shift is E[x_{k-1} | x_k, y] (rtol 1e-9)."""
    problem = DenseLinearProblem(M, SIGMA, MASK)
    g = torch.Generator().manual_seed(3)
    xk = torch.randn(4, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64) * 2
    mu, s2, x0hat, want = _exact_step(tau2, abar_prev, abar_k, xk, y)
    eps = (xk - abar_k ** 0.5 * x0hat) / (1 - abar_k) ** 0.5  # the prior eps whose Tweedie estimate is x0hat
    torch.testing.assert_close(tweedie_x0(xk[None], eps[None], abar_k)[0], x0hat)
    _, shift = likelihood_step(problem, xk[None], y[None], eps[None], abar_k, abar_prev, s2 ** 0.5, tau2,
                               shift=True, cg_iters=20)
    torch.testing.assert_close(mu + shift[0], want, rtol=1e-9, atol=1e-11)


def test_cg_shift_equals_the_undamped_diagonal_form_for_a_diagonal_operator():
    """A diagonal operator has row sums = diagonal (no damping): the CG shift (with the prior's std) and the
    diagonal form (with the narrowed std) are the same Gaussian product."""
    problem = DenseLinearProblem(torch.diag(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)),
                                 torch.tensor([0.5, 1.0, 0.25]))
    g = torch.Generator().manual_seed(4)
    x, eps, y = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    args = (problem, x, y, eps, 0.6, 0.8, 0.3, 0.05)
    narrow_d, diag = likelihood_step(*args, shift=True, cg_iters=0)
    narrow_c, cg = likelihood_step(*args, shift=True, cg_iters=6)
    torch.testing.assert_close(narrow_c, narrow_d)
    torch.testing.assert_close(cg, diag, rtol=1e-10, atol=1e-12)


def test_one_cg_iteration_moves_along_the_likelihood_gradient():
    """The first CG iterate is the residual scaled by one number per row: the shift is then a positive
    multiple of A^T (y - A x0hat) / sigma^2, the likelihood's gradient."""
    problem = DenseLinearProblem(M, SIGMA, MASK)
    g = torch.Generator().manual_seed(5)
    x0, y = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    pull = cg_mean_shift(problem, x0, y, torch.tensor(0.3, dtype=torch.float64), 1)
    grad = problem.grad_log_likelihood(x0, y)
    ratio = pull / grad
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert bool((ratio > 0).all())
    assert float(cg_mean_shift(problem, x0, y, torch.tensor(0.3, dtype=torch.float64), 0).abs().max()) == 0.0


def test_sampling_without_the_head_is_the_prior_step_plus_the_likelihood_step_and_scores_exactly():
    """use_head false: the step is the prior's (no network call) with the CG-shifted mean and narrowed std;
    the rollout's log q equals the second pass's."""
    problem = DenseLinearProblem(torch.tensor([[1.0, 0.4], [0.3, -1.0], [0.5, 0.5]], dtype=torch.float64),
                                 torch.tensor([0.1, 0.1, 0.2]))
    y = torch.tensor([1.0, -0.6, 0.3])
    post = _posterior(1.0)
    post.step_mean_shift, post.step_mean_cg_iters, post.use_head = True, 8, False

    def boom(*a, **k):
        raise AssertionError("the head was called")

    post._model_out = boom
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(7))
    eps = post.prior.eps(x, post.timesteps(3, 5, x.device))
    m, s = post.step_params(x, 3, eps, y.expand(5, 3), problem=problem)
    narrow, shift = post.likelihood_step(x, 3, eps, y.expand(5, 3), problem)
    torch.testing.assert_close(m, post.chain.reverse_mean(x, eps, 3) + shift)
    torch.testing.assert_close(s, post.chain.reverse_std(3, like=x) * narrow)
    b = policy_rollout(post, 64, y, problem=problem, generator=torch.Generator().manual_seed(8))
    _assert_rollout_scores_again(post, b, problem)


def test_config_and_spec_carry_the_options(tmp_path):
    from pipeline.rtb.posterior import posterior_spec
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rtb:\n  policy:\n    step_variance_tau2: 0.03\n    step_mean_cg_iters: 5\n")
    with pytest.raises(ConfigError, match="step_mean_cg_iters"):
        load_section(cfg, "rtb", RTBConfig)
    cfg.write_text("rtb:\n  policy:\n    step_variance_tau2: 0.03\n    step_mean_shift: true\n"
                   "    step_mean_cg_iters: 5\n    use_head: false\n")
    rc = load_section(cfg, "rtb", RTBConfig)
    assert rc.recipe()["policy"]["step_mean_cg_iters"] == 5 and rc.recipe()["policy"]["use_head"] is False
    plain = RTBConfig()
    assert "step_mean_cg_iters" not in plain.recipe()["policy"] and "use_head" not in plain.recipe()["policy"]
    cfg.write_text("rtb:\n  policy:\n    use_head: false\n")  # no step variance, no guidance: the prior alone
    with pytest.raises(ConfigError, match="use_head"):
        load_section(cfg, "rtb", RTBConfig)
    post = _posterior(1.0)
    with pytest.raises(ValueError, match="step_mean_cg_iters"):
        RTBPosterior(post.prior, post.chain, post.model, step_variance_tau2=1.0, step_mean_cg_iters=3)
    spec = posterior_spec(post.prior, post.chain, rc)
    again = build_posterior(post.prior, spec)
    assert again.step_mean_cg_iters == 5 and again.use_head is False and again.step_mean_shift
    old = {k: v for k, v in spec.items() if k not in ("step_mean_cg_iters", "use_head")}
    legacy = build_posterior(post.prior, old)
    assert legacy.step_mean_cg_iters == 0 and legacy.use_head is True


@pytest.mark.parametrize("tau2", [0.026, 1.0])
def test_with_the_chains_x0_the_last_step_mean_is_the_exact_posterior_step_mean(tau2):
    """The chain's sample is x_0 = f(x_1), not a draw around it. For a Gaussian prior N(0, tau2 I) (f linear,
    the prior's eps exact) and a coupling operator with a masked pixel, the last step x_2 -> x_1 with the
    model's x_0 taken as f(x_1) (``chain_x0``) has the exact mean of p(x_1 | x_2, y) under the chain
    (rtol 1e-8); with the forward process's x_0 it does not (off by more than 1 %)."""
    from pipeline.diffusion.gaussian_chain import final_denoise_affine, gaussian_linear_posterior
    from pipeline.diffusion.prior import GaussianMixturePrior
    from pipeline.diffusion.sampling import prior_eps

    prior = GaussianMixturePrior([1.0], torch.zeros(1, 4), tau2)
    chain = prior.schedule.chain(6)
    problem = DenseLinearProblem(M, SIGMA, MASK)
    g = torch.Generator().manual_seed(4)
    x2 = torch.randn(1, 4, generator=g, dtype=torch.float64)
    y = torch.randn(1, 6, generator=g, dtype=torch.float64)
    eps = prior_eps(prior, chain, x2, 2)
    mu, s = chain.reverse_mean(x2, eps, 2)[0], chain.reverse_std(2)
    F, f = final_denoise_affine(chain, torch.zeros(4), tau2 * torch.eye(4, dtype=torch.float64))
    A = M[MASK] @ F
    want, _, _ = gaussian_linear_posterior(mu, s * s * torch.eye(4, dtype=torch.float64), A,
                                           SIGMA.double()[MASK] ** 2, y[0, MASK] - M[MASK] @ f)
    ab1, ab2 = float(chain.abar[1]), float(chain.abar[2])
    got = {}
    for own in (True, False):
        _, shift = likelihood_step(problem, x2, y, eps, ab2, ab1, s, tau2, shift=True, cg_iters=20,
                                   chain_x0=(chain, 2) if own else None)
        got[own] = mu + shift[0]
    torch.testing.assert_close(got[True], want, rtol=1e-8, atol=1e-10)
    assert (got[False] - want).norm() > 0.01 * (want - mu).norm()


@pytest.mark.parametrize("tau2", [0.026, 1.0])
def test_chain_x0_variance_is_the_chains_own_variance_of_its_sample(tau2):
    """For a Gaussian prior N(0, tau2 I) with its exact eps, the chain's reverse steps and final denoise are
    affine, so Var(f(x_1) | x_j) follows by propagating x_j's point mass through steps j..2: it equals
    ``chain_x0_variance`` at every j (rtol 1e-9), 0 at j = 1; per-row tensor indices give the same values."""
    from pipeline.diffusion.gaussian_chain import final_denoise_affine, reverse_step_affine
    from pipeline.rtb.step_variance import chain_x0_variance

    from pipeline.diffusion.prior import GaussianMixturePrior
    prior = GaussianMixturePrior([1.0], torch.zeros(1, 2), tau2)
    chain = prior.schedule.chain(8)
    cov2 = tau2 * torch.eye(2, dtype=torch.float64)
    F, _ = final_denoise_affine(chain, torch.zeros(2), cov2)
    like = torch.zeros(1, dtype=torch.float64)
    for j in range(1, chain.K + 1):
        cov = torch.zeros(2, 2, dtype=torch.float64)
        for i in range(j, 1, -1):
            M, _ = reverse_step_affine(chain, torch.zeros(2), cov2, i)
            cov = M @ cov @ M.T + float(chain.reverse_var[i]) * torch.eye(2, dtype=torch.float64)
        want = float((F @ cov @ F.T)[0, 0])
        got = float(chain_x0_variance(chain, j, tau2, like))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (j, got, want)
    ks = torch.tensor([1, 3, 8, 2])
    rows = chain_x0_variance(chain, ks, tau2, torch.zeros(4, 2, dtype=torch.float64))
    for r, k in enumerate(ks.tolist()):
        torch.testing.assert_close(rows[r], torch.full((2,), float(chain_x0_variance(chain, k, tau2, like)),
                                                       dtype=torch.float64))
