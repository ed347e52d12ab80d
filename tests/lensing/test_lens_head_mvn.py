"""The correlated q(theta | y): exact, normalised log-prob on the prior's support, and correlations it can fit."""

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.config import LensConfig
from pipeline.lensing.lens_head import LensThetaHead, importance_check, refine
from pipeline.lensing.lens_head_mvn import CorrelatedLensHead, make_head, raw_from_gaussian
from pipeline.lensing.lens_prior import LensPrior


def _randomised(prior, seed=0, embed=5, components=3, scale=0.2):
    torch.manual_seed(seed)
    head = CorrelatedLensHead(prior, embed, components=components, hidden=16)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn_like(p))
    return head


@pytest.mark.parametrize("cfg", [LensConfig(), LensConfig(model="EPL"), LensConfig(phi=(0.2, 1.0), shear_sigma=0.0)],
                         ids=["sie-shear", "epl-circular-phi", "short-phi-no-shear"])
def test_head_is_normalised_on_the_prior_support_and_sampled_from_its_density(cfg):
    # E_p[q / p] = 1: q's log-prob is normalised on p's support; E_p[f q / p] = E_q[f] for indicators f of
    # half-ranges of every coordinate: the sampler follows the log-prob (weights q / p stay bounded where
    # p / q, a logistic-normal's tails against a uniform, need not)
    prior = LensPrior(cfg)
    head = _randomised(prior)
    assert head.circular_phi == (cfg.phi == LensConfig().phi)
    h = torch.randn(1, 5, dtype=torch.float64)
    theta = head.sample(h.expand(20000, 5), torch.Generator().manual_seed(0))
    assert torch.isfinite(prior.log_prob(theta)).all()
    assert float(head.log_prob(theta, h.expand(20000, 5)).detach().std()) > 0.3     # the head is not the prior
    th_p = prior.sample(60000, np.random.default_rng(0))
    v = (head.log_prob(th_p, h.expand(60000, 5)).detach() - prior.log_prob(th_p)).exp()
    assert abs(float(v.mean()) - 1.0) < 4 * float(v.std()) / math.sqrt(len(v))
    for j in range(prior.dim):
        cut = float(th_p[:, j].median())
        f_p, f_q = (th_p[:, j] < cut).double() * v, (theta[:, j] < cut).double()
        err = math.sqrt(float(f_p.var()) / len(f_p) + float(f_q.var()) / len(f_q))
        assert abs(float(f_p.mean() - f_q.mean())) < 4 * err, (prior.names[j], float(f_p.mean()), float(f_q.mean()))


def test_log_prob_is_the_mapped_normal_and_phi_wraps():
    """One component, box coordinates only: log q = log N(logit u; mu, Sigma) - log|dT/du|, checked against
    torch's MultivariateNormal; with phi on its period, the density is continuous across phi_lo = phi_hi."""
    prior = LensPrior(LensConfig(phi=(0.2, 1.0), shear_sigma=0.0))            # rein, q, phi: all boxes
    head = _randomised(prior, components=1, scale=0.3)
    h = torch.randn(1, 5, dtype=torch.float64)
    q = head.params(h)
    theta = head.sample(h.expand(500, 5), torch.Generator().manual_seed(3))
    u, log_jac = head._to_u(theta)
    mvn = torch.distributions.MultivariateNormal(q["mean"][0, 0], scale_tril=q["scale_tril"][0, 0])
    torch.testing.assert_close(head.log_prob(theta, h.expand(500, 5)), mvn.log_prob(u) - log_jac)
    torch.testing.assert_close(head._from_u(u), theta)
    circ = LensPrior(LensConfig(shear_sigma=0.0))
    head = _randomised(circ, components=1, scale=0.3)
    h = torch.randn(1, 5, dtype=torch.float64).expand(2, 5)
    j = circ.names.index("phi")
    edge = circ.sample(1, np.random.default_rng(0)).expand(2, -1).clone()
    edge[0, j], edge[1, j] = 1e-12, math.pi - 1e-12
    lp = head.log_prob(edge, h).detach()
    assert float(lp[0]) == pytest.approx(float(lp[1]), abs=1e-6)


def test_raw_outputs_gradients_support_and_widening():
    prior = LensPrior(LensConfig())
    head = _randomised(prior)
    h = torch.randn(4, 5, dtype=torch.float64)
    theta = head.sample(h)
    head.log_prob(theta, h).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    out = theta.clone()
    out[:, prior.names.index("q")] = 2.0
    assert (head.log_prob(out, h) == -math.inf).all()
    hh = h[:1].expand(20000, 5)
    raw = head.raw(hh).detach()
    a = head.sample(raw=raw, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, head.sample(hh, torch.Generator().manual_seed(0)))
    wide = head.sample(raw=raw, generator=torch.Generator().manual_seed(0), widen=3.0)
    assert torch.isfinite(prior.log_prob(wide)).all()
    assert float(head.log_prob(wide, raw=raw).mean()) < float(head.log_prob(a, raw=raw).mean()) - 1.0
    with pytest.raises(ValueError, match="must be one of"):
        make_head("flow", prior, 5)
    assert isinstance(make_head("product", prior, 5), LensThetaHead)


def test_refined_correlated_head_follows_a_correlated_posterior_that_a_product_head_narrows():
    """Target: q and g1 jointly normal with correlation 0.9 (as axis ratio and external shear trade off), g2
    independent; every other parameter fixed. Refined by RTB's objective from the same start, the correlated
    head recovers both sds and the correlation; the product head keeps about the conditional sd,
    sqrt(1 - 0.9^2) = 0.44 of the marginal one."""
    prior = LensPrior(LensConfig(rein=(0.7, 0.7), phi=(0.3, 0.3), center=0.0))
    assert prior.names == ["q", "g1", "g2"]
    mean = torch.tensor([0.78, 0.03, -0.02], dtype=torch.float64)
    sd = torch.tensor([0.02, 0.01, 0.01], dtype=torch.float64)
    corr = torch.eye(3, dtype=torch.float64)
    corr[0, 1] = corr[1, 0] = 0.9
    prec = torch.linalg.inv(corr * sd[:, None] * sd[None, :])

    def log_likelihood(theta, rows):
        d = theta - mean
        return -0.5 * ((d @ prec) * d).sum(-1)

    h = torch.zeros(1, 5, dtype=torch.float64)
    got = {}
    for kind in ("correlated", "product"):
        torch.manual_seed(0)
        head = make_head(kind, prior, 5, components=2, hidden=16)
        raw, _ = refine(head, h, log_likelihood, steps=600, group_size=32, lr=0.1, widen=2.0, beta0=0.1, seed=0)
        s = head.sample(raw=raw.expand(8000, -1), generator=torch.Generator().manual_seed(1))
        got[kind] = (s.std(0) / sd, float(torch.corrcoef(s[:, :2].T)[0, 1]))
    ratio, rho = got["correlated"]
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all()), got
    assert abs(rho - 0.9) < 0.05, got
    ratio, rho = got["product"]
    assert float(ratio[0]) < 0.7 and float(ratio[1]) < 0.7 and abs(rho) < 0.5, got


@pytest.mark.parametrize("cfg", [LensConfig(), LensConfig(model="EPL"), LensConfig(phi=(0.2, 1.0), shear_sigma=0.0)],
                         ids=["sie-shear", "epl-circular-phi", "short-phi-no-shear"])
def test_round_trip_and_draws_have_the_component_covariance(cfg):
    # spread kept well inside the shear map's range (tanh(|u|) rounds to 1 above |u| ~ 18)
    prior = LensPrior(cfg)
    head = _randomised(prior, components=1, scale=0.1)
    with torch.no_grad():   # strong correlations, so that L L^T and L^T L differ
        head.net[-1].bias.view(head.C, -1)[:, 2 * head.p:-1] += torch.linspace(-1.5, 1.5, head.tril.shape[1])
    h = torch.randn(1, 5, dtype=torch.float64)
    theta = head.sample(h.expand(40000, 5), torch.Generator().manual_seed(4))
    u, _ = head._to_u(theta)
    back = head._from_u(u)
    diff = back - theta
    if head.circular_phi:   # phi is compared modulo its period
        j = prior.names.index("phi")
        diff[:, j] = torch.remainder(diff[:, j] + math.pi / 2, math.pi) - math.pi / 2
    assert float(diff.abs().max()) < 1e-8
    q = head.params(h)
    cov = (q["scale_tril"] @ q["scale_tril"].transpose(-1, -2))[0, 0].detach()
    if head.circular_phi:   # u's phi coordinate is wrapped: compare the others
        u, cov = u[:, 1:], cov[1:, 1:]
    torch.testing.assert_close(torch.cov(u.T), cov, rtol=0.05, atol=0.05 * float(cov.diagonal().max()))
    L = q["scale_tril"][0, 0].detach()
    other = (L.T @ L)[1:, 1:] if head.circular_phi else L.T @ L
    assert float((other - cov).abs().max()) > 0.5 * float(cov.diagonal().max())   # the check can tell them apart


def test_saturated_outputs_still_draw_inside_the_support():
    """A box mean at the logit bound with the largest spread, widened: sigmoid rounds to 1 and lo + (hi - lo)
    would exceed hi = 0.9 by one ulp for q in (0.3, 0.9); the draws stay on the support."""
    prior = LensPrior(LensConfig(q=(0.3, 0.9)))
    head = _randomised(prior, components=1, scale=0.0)
    with torch.no_grad():
        bias = head.net[-1].bias.view(head.C, -1)
        bias[:, :head.p] = 40.0              # means at their upper bounds
        bias[:, head.p:2 * head.p] = 40.0    # d at its largest
    theta = head.sample(torch.zeros(20000, 5, dtype=torch.float64), torch.Generator().manual_seed(0), widen=3.0)
    assert torch.isfinite(prior.log_prob(theta)).all()
    assert torch.isfinite(head.log_prob(theta, torch.zeros(20000, 5, dtype=torch.float64))).all()


def test_importance_check_flags_weights_that_are_not_numbers():
    prior = LensPrior(LensConfig(shear_sigma=0.0))
    head = _randomised(prior)
    raw = head.raw(torch.zeros(2, 5, dtype=torch.float64)).detach()
    out = importance_check(head, raw, lambda theta, rows: torch.where(rows == 1, math.nan, 0.0), n=64)
    assert out["flagged"][1] and np.isnan(out["ess_fraction"][1]) and np.isfinite(out["ess_fraction"][0])


@pytest.mark.parametrize("cfg", [LensConfig(), LensConfig(phi=(0.2, 1.0), shear_sigma=0.0)], ids=["sie-shear", "short-phi"])
def test_raw_from_gaussian_inverts_params(cfg):
    # a random normal inside the head's bounds comes back as every component's covariance, and as its mean
    # moved by spread L z_c; phi's mean modulo pi; outside the bounds, the sds clip to them, correlations kept
    prior = LensPrior(cfg)
    head = CorrelatedLensHead(prior, 5, components=3, hidden=16)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, head.p, head.p, generator=g, dtype=torch.float64)
    cov = 0.05 * (A @ A.transpose(1, 2) + 0.5 * torch.eye(head.p, dtype=torch.float64))
    mean = torch.rand(4, head.p, generator=g, dtype=torch.float64) * 2 - 1
    mean[:, 0] += 4.0 * head.circular_phi                      # phi's mean one period and more away
    for spread in (0.0, 0.5):
        q = head.params(raw=raw_from_gaussian(head, mean, cov, spread=spread))
        L = q["scale_tril"]
        assert torch.allclose(L @ L.transpose(-1, -2), cov[:, None].expand_as(L), atol=1e-6)
        shift = q["mean"] - mean[:, None]
        if head.circular_phi:
            shift[..., 0] = torch.remainder(shift[..., 0] + math.pi / 2, math.pi) - math.pi / 2
        z = torch.linalg.solve_triangular(L, shift.unsqueeze(-1), upper=False)[..., 0]    # whitened shifts
        z_c = torch.randn(3, head.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.allclose(z, spread * z_c.expand_as(z), atol=1e-6)
        assert torch.allclose(q["log_w"].exp(), torch.full((4, 3), 1 / 3, dtype=torch.float64))
    wide = head.params(raw=raw_from_gaussian(head, mean, 1e4 * cov, spread=0.0))["scale_tril"]
    sd = torch.linalg.vector_norm(wide, dim=-1)
    assert torch.allclose(sd, head.log_d_hi.exp().expand_as(sd), rtol=1e-4)
    corr = cov / (cov.diagonal(dim1=-2, dim2=-1).sqrt()[:, :, None] * cov.diagonal(dim1=-2, dim2=-1).sqrt()[:, None])
    got = wide @ wide.transpose(-1, -2) / (sd[..., :, None] * sd[..., None, :])
    assert torch.allclose(got, corr[:, None].expand_as(got), atol=1e-6)
