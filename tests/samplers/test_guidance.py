"""Guidance terms: closed forms, per-sample independence, refusals (pipeline.samplers.guidance)."""

import math

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.errors import PipelineError
from pipeline.problems import DenseLinearProblem, InverseProblem
from pipeline.samplers.exact_guidance import ExactGuidance, analytic_posterior
from pipeline.samplers.guidance import (LinearGaussianAlgebra, cla_score, dps_cla_frozen_guidance, dps_cla_guidance,
                                        dps_frozen_guidance, dps_guidance, frozen_guidance_shift, score_to_eps_shift,
                                        score_to_mean_shift)

torch.set_default_dtype(torch.float32)


def _mixture(d=3, J=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(J, generator=g) + 0.2
    means = 3 * torch.randn(J, d, generator=g)
    L = 0.5 * torch.randn(J, d, d, generator=g)
    covs = L @ L.transpose(-1, -2) + 0.3 * torch.eye(d)
    return GaussianMixturePrior(w / w.sum(), means, covs)


def _problem(d=3, m=3, seed=1, masked=True):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g)
    sigma = 0.3 + torch.rand(m, generator=g)
    mask = torch.ones(m, dtype=torch.bool)
    if masked:
        mask[-1] = False
    return DenseLinearProblem(A, sigma, mask)


def _dense_C(prob, beta, gamma):
    """beta Sigma + gamma A A^T on unmasked rows (float64) and the masked A."""
    A = prob.M.double()[prob.mask]
    S = torch.diag(prob.sigma.double()[prob.mask] ** 2)
    return beta * S + gamma * A @ A.T, A


class SquareOp(InverseProblem):
    """A nonlinear operator for refusal tests: y = x^2 elementwise."""

    def __init__(self, d):
        super().__init__(torch.ones(d))
        self.x_shape = self.y_shape = (d,)

    def forward(self, x):
        return x * x


def test_exact_guidance_equals_posterior_minus_prior_score():
    # For a GMM prior and a linear-Gaussian likelihood the posterior is a GMM; exact guidance must be
    # grad log p_t(x|y) - grad log p_t(x) to rounding, at every noise level.
    prior, prob = _mixture(), _problem()
    chain = prior.schedule.chain(40)
    y = torch.tensor([1.0, -2.0, 0.0])
    post, _ = analytic_posterior(prior, prob, y)
    eg = ExactGuidance(prior, chain, prob)
    x = 2 * torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for k in (1, 2, 7, 20, 40):
        t = int(chain.t[k])
        ref = post.score(x, t) - prior.score(x, t)
        got = eg.score(x, y, k)
        assert torch.allclose(got, ref, atol=1e-9 * (1 + ref.abs().max()), rtol=0), k


def test_exact_guidance_score_is_gradient_of_its_log_likelihood():
    prior, prob = _mixture(seed=5), _problem(seed=6)
    chain = prior.schedule.chain(30)
    eg = ExactGuidance(prior, chain, prob)
    y = torch.tensor([0.5, 1.0, 3.0])
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in (3, 15):
        g = eg.score(x, y, k)
        h = 1e-5
        fd = torch.zeros_like(x)
        for i in range(3):
            e = torch.zeros_like(x)
            e[:, i] = h
            fd[:, i] = (eg.log_likelihood_t(x + e, y, k) - eg.log_likelihood_t(x - e, y, k)) / (2 * h)
        assert torch.allclose(g, fd, atol=1e-6, rtol=1e-5)


def test_analytic_log_z_matches_numerical_integration_1d():
    prior = GaussianMixturePrior([0.3, 0.7], torch.tensor([[-2.0], [1.5]]), torch.tensor([[[0.5]], [[0.2]]]))
    prob = DenseLinearProblem(torch.tensor([[2.0]]), torch.tensor([0.7]))
    y = torch.tensor([1.1])
    _, log_z = analytic_posterior(prior, prob, y)
    grid = torch.linspace(-10, 10, 200001, dtype=torch.float64)[:, None]
    integrand = torch.exp(prior.log_prob_noised(grid, 0) + prob.log_likelihood(grid, y))
    assert math.log(float(torch.trapezoid(integrand, grid[:, 0]))) == pytest.approx(log_z, abs=1e-6)


@pytest.mark.parametrize("m,d", [(2, 4), (5, 3)])
def test_linear_algebra_score_and_log_prob_match_dense(m, d):
    prob = _problem(d=d, m=m, seed=m + d)
    alg = LinearGaussianAlgebra(prob)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, d, dtype=torch.float64, generator=g)
    y = torch.randn(5, m, dtype=torch.float64, generator=g)
    yU, yn = alg.project_y(y)
    for alpha, beta, gamma in [(1.0, 1.0, 0.0), (0.7, 0.49, 0.51), (1.0, 2.0, 3.0)]:
        C, A = _dense_C(prob, beta, gamma)
        ym = y[:, prob.mask]
        r = alpha * ym - x @ A.T
        ref = torch.linalg.solve(C, r.T).T @ A
        assert torch.allclose(alg.score(x, yU, alpha, beta, gamma), ref, atol=1e-9)
        mvn = torch.distributions.MultivariateNormal(x @ A.T, covariance_matrix=C)
        ref_lp = mvn.log_prob(alpha * ym) + ym.shape[1] * math.log(alpha)
        assert torch.allclose(alg.log_prob(alg.to_v(x), yU, yn, alpha, beta, gamma), ref_lp, atol=1e-9)


def test_cla_score_matches_vp_formula():
    prob = _problem(d=3, m=3)
    prior = _mixture()
    chain = prior.schedule.chain(25)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0.3, -1.0, 2.0])
    for k in (2, 10, 25):
        ab = float(chain.abar[k])
        C, A = _dense_C(prob, ab, 1 - ab)
        ref = torch.linalg.solve(C, (math.sqrt(ab) * y[prob.mask] - x @ A.T).T).T @ A
        assert torch.allclose(cla_score(chain, prob, y, x, k), ref, atol=1e-9)


def test_cla_reduces_to_exact_guidance_for_flat_prior():
    d = 3
    flat = GaussianMixturePrior([1.0], torch.zeros(1, d), 1e8 * torch.eye(d)[None])
    prob = _problem(d=d, m=3)
    chain = flat.schedule.chain(50)
    eg = ExactGuidance(flat, chain, prob)
    x = 3 * torch.randn(8, d, dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, -1.0])
    for k in (1, 2, 10, 30, 50):
        c, e = cla_score(chain, prob, y, x, k), eg.score(x, y, k)
        assert float((c - e).abs().max() / c.abs().max()) < 1e-3, k


def test_dps_guidance_matches_direct_autograd_and_reduces_residual():
    prior, prob = _mixture(), _problem(masked=False)
    chain = prior.schedule.chain(20)
    y = torch.tensor([1.0, 0.0, -1.0])
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    k, scale = 12, 0.05
    out = dps_guidance(prior, chain, prob, y, x, k, scale)
    xg = x.clone().requires_grad_(True)
    t = torch.full((5,), int(chain.t[k]))
    x0 = chain.x0_from_eps(xg, prior.eps(xg, t), k)
    norms = (((y - x0 @ prob.M.T) / prob.sigma.double()) ** 2).sum(1).sqrt()
    (g,) = torch.autograd.grad(norms.sum(), xg)
    assert torch.allclose(out.shift, -scale * g, atol=1e-10)
    # a small step along the shift lowers every sample's residual norm
    x_new = x + 1e-3 * out.shift / scale
    x0_new = chain.x0_from_eps(x_new, prior.eps(x_new, t), k)
    new_norms = (((y - x0_new @ prob.M.T) / prob.sigma.double()) ** 2).sum(1).sqrt()
    assert (new_norms < norms.detach()).all()


def test_dps_cla_guidance_matches_dense_autograd():
    prior, prob = _mixture(), _problem()
    chain = prior.schedule.chain(20)
    y = torch.tensor([1.0, 0.5, 9.0])
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    k, scale = 9, 0.7
    ab = float(chain.abar[k])
    out = dps_cla_guidance(prior, chain, prob, y, x, k, scale)
    C, A = _dense_C(prob, 1.0, (1 - ab) / ab)
    xg = x.clone().requires_grad_(True)
    x0 = chain.x0_from_eps(xg, prior.eps(xg, torch.full((4,), int(chain.t[k]))), k)
    lp = torch.distributions.MultivariateNormal(x0 @ A.T, covariance_matrix=C).log_prob(y[prob.mask])
    (g,) = torch.autograd.grad(lp.sum(), xg)
    assert torch.allclose(out.shift, scale * score_to_mean_shift(chain, k, g), atol=1e-10)


def test_frozen_variants_match_network_versions_for_flat_prior():
    # The Jacobian-free approximation d x0_hat/d x_k = I/sqrt(abar) is exact when eps does not depend on x.
    d = 3
    flat = GaussianMixturePrior([1.0], torch.zeros(1, d), 1e8 * torch.eye(d)[None])
    prob = _problem(masked=False)
    chain = flat.schedule.chain(20)
    y = torch.tensor([1.0, 2.0, 3.0])
    x = torch.randn(4, d, dtype=torch.float64)
    for k in (2, 10):
        t = torch.full((4,), int(chain.t[k]))
        eps = flat.eps(x, t)
        x0 = chain.x0_from_eps(x, eps, k)
        a = dps_guidance(flat, chain, prob, y, x, k, 0.3).shift
        b = dps_frozen_guidance(chain, prob, y, x0, k, 0.3)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)
        assert torch.allclose(b, frozen_guidance_shift("dps", chain, prob, y, x, eps, k, 0.3))
        a2 = dps_cla_guidance(flat, chain, prob, y, x, k, 1.0).shift
        b2 = dps_cla_frozen_guidance(chain, prob, y, x0, k, 1.0)
        assert torch.allclose(a2, b2, rtol=1e-4, atol=1e-8)


def test_guidance_is_per_sample():
    # Changing the other batch members (states and observations) leaves member 0's guidance unchanged.
    prior, prob = _mixture(), _problem()
    chain = prior.schedule.chain(20)
    eg = ExactGuidance(prior, chain, prob)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randn(6, 3, dtype=torch.float64, generator=g)
    x2, y2 = x.clone(), y.clone()
    x2[1:] = 50 * torch.randn(5, 3, dtype=torch.float64, generator=g)
    y2[1:] = -30.0
    k = 8
    eps1 = prior.eps(x, int(chain.t[k]))
    eps2 = prior.eps(x2, int(chain.t[k]))
    fns = {
        "dps": lambda xx, yy, ee: dps_guidance(prior, chain, prob, yy, xx, k, 0.1).shift,
        "dps_cla": lambda xx, yy, ee: dps_cla_guidance(prior, chain, prob, yy, xx, k, 1.0).shift,
        "cla": lambda xx, yy, ee: cla_score(chain, prob, yy, xx, k),
        "exact": lambda xx, yy, ee: eg.score(xx, yy, k),
        "dps_frozen": lambda xx, yy, ee: frozen_guidance_shift("dps", chain, prob, yy, xx, ee, k, 0.1),
        "dps_cla_frozen": lambda xx, yy, ee: frozen_guidance_shift("dps_cla", chain, prob, yy, xx, ee, k, 1.0),
    }
    for name, fn in fns.items():
        a, b = fn(x, y, eps1), fn(x2, y2, eps2)
        assert torch.allclose(a[0], b[0], atol=1e-12, rtol=1e-10), name
        assert not torch.allclose(a[1], b[1]), name  # the others did change


def test_score_conversions_agree_with_reverse_mean():
    prior = _mixture()
    chain = prior.schedule.chain(30)
    x = torch.randn(3, 3, dtype=torch.float64)
    eps = prior.eps(x, int(chain.t[11]))
    gsc = torch.randn(3, 3, dtype=torch.float64)
    lhs = chain.reverse_mean(x, eps + score_to_eps_shift(chain, 11, gsc), 11)
    rhs = chain.reverse_mean(x, eps, 11) + score_to_mean_shift(chain, 11, gsc)
    assert torch.allclose(lhs, rhs, atol=1e-12)


def test_linear_only_guidance_refuses_nonlinear_problem():
    prior = _mixture()
    chain = prior.schedule.chain(10)
    op = SquareOp(3)
    x = torch.randn(2, 3)
    with pytest.raises(PipelineError, match="cla.*nonlinear"):
        cla_score(chain, op, torch.ones(3), x, 5)
    with pytest.raises(PipelineError, match="nonlinear"):
        dps_cla_guidance(prior, chain, op, torch.ones(3), x, 5, 1.0)
    with pytest.raises(PipelineError, match="exact_guidance"):
        ExactGuidance(prior, chain, op)
    # DPS works on a nonlinear operator
    out = dps_guidance(prior, chain, op, torch.ones(3), x.double(), 5, 0.1)
    assert torch.isfinite(out.shift).all()


def test_exact_guidance_diagonal_fast_path_matches_general_path():
    g = torch.Generator().manual_seed(9)
    d, J = 5, 6
    covs = torch.diag_embed(0.5 + torch.rand(J, d, generator=g))
    prior = GaussianMixturePrior(torch.full((J,), 1.0 / J), 4 * torch.randn(J, d, generator=g), covs)
    prob = _problem(d=d, m=2, masked=False)
    chain = prior.schedule.chain(20)
    fast = ExactGuidance(prior, chain, prob)
    slow = ExactGuidance(prior, chain, prob)
    assert fast.diagonal
    slow.diagonal = False
    slow.lam, slow.Q = torch.linalg.eigh(prior.covs)
    x = 3 * torch.randn(7, d, dtype=torch.float64, generator=g)
    y = torch.tensor([1.0, -1.0])
    for k in (1, 5, 20):
        assert torch.allclose(fast.score(x, y, k), slow.score(x, y, k), atol=1e-10)


class AffineProblem(DenseLinearProblem):
    """y = M x + b + n: an affine model like lensing's brightness offset."""

    def __init__(self, M, sigma, b):
        super().__init__(M, sigma)
        self.b = torch.as_tensor(b, dtype=torch.float32)

    def forward(self, x):
        return self.A(x) + self.b.to(x.device, x.dtype)


def test_affine_forward_models_use_y_minus_offset():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(3, 3, generator=g)
    b = torch.tensor([5.0, -2.0, 1.0])
    aff = AffineProblem(M, torch.tensor([0.5, 0.6, 0.7]), b)
    lin = DenseLinearProblem(M, torch.tensor([0.5, 0.6, 0.7]))
    prior = _mixture()
    chain = prior.schedule.chain(20)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g)
    y = torch.tensor([1.0, 2.0, 3.0])
    for k in (2, 11):
        assert torch.allclose(cla_score(chain, aff, y, x, k), cla_score(chain, lin, y - b, x, k), atol=1e-10)
        assert torch.allclose(ExactGuidance(prior, chain, aff).score(x, y, k),
                              ExactGuidance(prior, chain, lin).score(x, y - b, k), atol=1e-10)
        assert torch.allclose(dps_cla_guidance(prior, chain, aff, y, x, k, 1.0).shift,
                              dps_cla_guidance(prior, chain, lin, y - b, x, k, 1.0).shift, atol=1e-10)
    pa, za = analytic_posterior(prior, aff, y)
    pl, zl = analytic_posterior(prior, lin, y - b)
    assert za == pytest.approx(zl) and torch.allclose(pa.means, pl.means)


def test_algebra_cache_notices_in_place_changes():
    from pipeline.samplers.guidance import linear_algebra_for

    prob = _problem(masked=False)
    a1 = linear_algebra_for(prob)
    assert linear_algebra_for(prob) is a1
    prob.M = 2 * prob.M
    a2 = linear_algebra_for(prob)
    assert a2 is not a1 and torch.allclose(a2.s, 2 * a1.s)
