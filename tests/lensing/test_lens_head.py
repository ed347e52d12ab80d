"""q(theta | y) over a lens prior's support: exact, normalised log-prob and a sampler that follows it."""

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.config import LensConfig
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.lens_head import (LensThetaHead, disc_log_prob, disc_sample, von_mises_log_prob,
                                    von_mises_sample)


def _randomised_head(prior, seed=0, embed=5, components=3, scale=0.2):
    # perturbed away from the initialisation, yet broad enough that p/q has a finite, estimable variance
    torch.manual_seed(seed)
    head = LensThetaHead(prior, embed, components=components, hidden=16)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn_like(p))
    return head


@pytest.mark.parametrize("kappa", [1e-9, 0.3, 4.0, 300.0])
def test_von_mises_sampler_matches_its_density(kappa):
    gen = torch.Generator().manual_seed(0)
    n = 40000
    mu = torch.full((n,), 2.5, dtype=torch.float64)
    psi = von_mises_sample(mu, torch.full((n,), kappa, dtype=torch.float64), gen)
    grid = torch.linspace(-math.pi, math.pi, 20001, dtype=torch.float64)
    dens = von_mises_log_prob(grid, torch.tensor(2.5, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64)).exp()
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    # KS distance of the draws against the density's CDF
    cdf = torch.cumulative_trapezoid(dens, grid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])
    emp = torch.searchsorted(torch.sort(psi).values, grid).double() / n
    assert float((emp - cdf).abs().max()) < 1.63 / math.sqrt(n) * 1.5   # 1 % KS level, with slack for the grid


def test_disc_density_is_normalised_and_sampled():
    mean = torch.tensor([0.7, -0.4], dtype=torch.float64)
    log_s = torch.log(torch.tensor([0.5, 0.9], dtype=torch.float64))
    gmax = 0.15
    m = 801
    ax = torch.linspace(-gmax, gmax, m, dtype=torch.float64)
    gx, gy = torch.meshgrid(ax, ax, indexing="ij")
    g = torch.stack([gx, gy], -1).reshape(-1, 2)
    inside = g.norm(dim=-1) < gmax
    dens = torch.zeros(g.shape[0], dtype=torch.float64)
    dens[inside] = disc_log_prob(g[inside], mean, log_s, gmax).exp()
    cell = float(ax[1] - ax[0]) ** 2
    assert float(dens.sum()) * cell == pytest.approx(1.0, abs=5e-3)
    # sampler: the fraction in the quadrant g1 > 0, g2 < 0 against the density's
    draws = disc_sample(mean.expand(50000, 2), log_s.expand(50000, 2), gmax, torch.Generator().manual_seed(1))
    assert float(draws.norm(dim=-1).max()) < gmax
    quad = ((g[:, 0] > 0) & (g[:, 1] < 0)).double()
    expected = float((dens * quad).sum() * cell)
    got = float(((draws[:, 0] > 0) & (draws[:, 1] < 0)).double().mean())
    assert abs(got - expected) < 4 * math.sqrt(expected * (1 - expected) / 50000) + 5e-3


def test_disc_density_is_smooth_at_the_centre():
    mean, log_s = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    at0 = disc_log_prob(torch.zeros(1, 2, dtype=torch.float64), mean, log_s, 0.15)
    near = disc_log_prob(torch.tensor([[1e-9, 0.0]], dtype=torch.float64), mean, log_s, 0.15)
    assert float(at0) == pytest.approx(float(near), abs=1e-9)
    assert float(at0) == pytest.approx(-math.log(2 * math.pi) - 2 * math.log(0.15), abs=1e-12)


@pytest.mark.parametrize("cfg", [LensConfig(model="EPL"), LensConfig(phi=(0.2, 1.0), shear_sigma=0.0)],
                         ids=["epl-circular-phi", "short-phi-no-shear"])
def test_head_is_normalised_on_the_prior_support_and_sampled_from_its_density(cfg):
    # E_{theta ~ q}[p(theta) / q(theta)] = 1 exactly when q's sampler follows q's log-prob and both share
    # p's support: checks sampler, density and normalisation together, in every coordinate
    prior = LensPrior(cfg)
    head = _randomised_head(prior)
    assert head.circular_phi == (cfg.phi == LensConfig().phi)
    h = torch.randn(1, 5, dtype=torch.float64).expand(40000, 5)
    theta = head.sample(h, torch.Generator().manual_seed(0))
    assert torch.isfinite(prior.log_prob(theta)).all()
    lq = head.log_prob(theta, h).detach()
    assert float(lq.std()) > 0.3          # the head is not the prior
    w = (prior.log_prob(theta) - lq).exp()
    assert abs(float(w.mean()) - 1.0) < 4 * float(w.std()) / math.sqrt(len(w))
    # and the reverse: E_{theta ~ p}[q(theta) / p(theta)] = 1
    th_p = prior.sample(20000, np.random.default_rng(0))
    v = (head.log_prob(th_p, h[:20000]).detach() - prior.log_prob(th_p)).exp()
    assert abs(float(v.mean()) - 1.0) < 4 * float(v.std()) / math.sqrt(len(v))


def test_head_log_prob_is_differentiable_and_minus_inf_outside():
    prior = LensPrior(LensConfig())
    head = _randomised_head(prior)
    h = torch.randn(4, 5, dtype=torch.float64)
    theta = head.sample(h)
    lp = head.log_prob(theta, h)
    lp.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    out = theta.clone()
    out[:, prior.names.index("q")] = 2.0
    assert (head.log_prob(out, h) == -math.inf).all()


def test_raw_outputs_give_the_same_density_and_widened_draws_spread_more():
    prior = LensPrior(LensConfig())
    head = _randomised_head(prior, components=1, scale=0.05)
    with torch.no_grad():   # one narrow component: box normals' log-std pre-activations lowered
        nb = len(head.box_names)
        head.net[-1].bias.view(head.C, -1)[:, nb:2 * nb] -= 4.0
        head.net[-1].bias.view(head.C, -1)[:, -3:-1] -= 3.0    # and the shear's normal in u-space
        head.net[-1].bias.view(head.C, -1)[:, 2 * nb + 1] = math.log(10.0)   # von Mises kappa ~ 10
    h = torch.randn(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).expand(20000, 5)
    raw = head.raw(h)
    theta = head.sample(h, torch.Generator().manual_seed(0))
    torch.testing.assert_close(head.log_prob(theta, raw=raw), head.log_prob(theta, h))
    # the same stream gives the same draws from h or from its raw outputs
    torch.testing.assert_close(head.sample(raw=raw, generator=torch.Generator().manual_seed(0)), theta)
    wide = head.sample(h, torch.Generator().manual_seed(0), widen=3.0)
    assert torch.isfinite(prior.log_prob(wide)).all()
    # widened draws fall where q is lower: their mean log q is below that of q's own draws
    assert float(head.log_prob(wide, h).mean()) < float(head.log_prob(theta, h).mean()) - 1.0
    for name in ("rein", "q", "g1", "g2"):
        j = prior.names.index(name)
        assert float(wide[:, j].std()) > 1.5 * float(theta[:, j].std()), name
    # phi (period pi): the mean resultant length of 2 phi falls when widened
    j = prior.names.index("phi")
    assert float(torch.exp(2j * wide[:, j]).mean().abs()) < float(torch.exp(2j * theta[:, j]).mean().abs())
    with pytest.raises(ValueError, match="not both"):
        head.params(h, raw)


def test_widened_draws_of_a_broad_shear_stay_inside_the_disc():
    # a shear normal far out in u-space (mean 3, std 2), widened 3x: tanh(|u|) rounds to 1 for |u| > ~19
    prior = LensPrior(LensConfig())
    head = _randomised_head(prior, components=1, scale=0.0)
    with torch.no_grad():
        head.net[-1].bias.view(head.C, -1)[:, -5:-3] = 10.0   # g_mean -> 3 tanh(10) ~ 3
        head.net[-1].bias.view(head.C, -1)[:, -3:-1] = 10.0   # g_log_s -> log 2
    h = torch.zeros(100000, 5, dtype=torch.float64)
    wide = head.sample(h, torch.Generator().manual_seed(0), widen=3.0)
    g = torch.linalg.vector_norm(wide[:, -2:], dim=-1)
    assert float(g.max()) < prior.config.shear_max
    assert torch.isfinite(prior.log_prob(wide)).all() and torch.isfinite(head.log_prob(wide, h)).all()
