"""The lens prior: one law for the simulator's draws and the density a lens-inferring sampler scores."""

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.config import LensConfig
from pipeline.lensing.lens_prior import LensPrior, draw_lens, shear_disc_log_mass


def test_shear_is_truncated_by_rejection_not_piled_on_the_edge():
    # the radial rescaling put every |g| > gmax draw (1.1 % at sigma 0.05, gmax 0.15) on the circle;
    # rejection leaves the edge with the density's own (small) mass
    cfg = LensConfig(shear_sigma=0.05, shear_max=0.15)
    rng = np.random.default_rng(0)
    g = np.array([[lens.g1, lens.g2] for lens in (draw_lens(cfg, rng) for _ in range(20000))])
    mag = np.hypot(g[:, 0], g[:, 1])
    assert mag.max() <= 0.15
    near_edge = np.mean(mag > 0.15 * (1 - 1e-6))
    assert near_edge == 0.0
    # the radial law of the truncated normal: P(|g| > 0.1 | |g| <= 0.15), exact, against the draws
    s, gm = 0.05, 0.15
    expected = (math.exp(-0.1 ** 2 / (2 * s * s)) - math.exp(-gm ** 2 / (2 * s * s))) / -math.expm1(-gm ** 2 / (2 * s * s))
    se = math.sqrt(expected * (1 - expected) / len(mag))
    assert abs(np.mean(mag > 0.1) - expected) < 4 * se


def test_without_a_rejection_the_draws_are_the_old_ones():
    # a seed whose shear lies inside the disc gives the same lens as before the change (same RNG order)
    cfg = LensConfig()
    rng = np.random.default_rng(0)
    g = rng.normal(0.0, cfg.shear_sigma, size=2)
    assert np.hypot(*g) <= cfg.shear_max
    x0 = rng.uniform(-cfg.center, cfg.center)
    lens = draw_lens(cfg, np.random.default_rng(0))
    assert (lens.g1, lens.g2, lens.x0) == (g[0], g[1], x0)


def test_log_prob_is_normalised_and_matches_the_draws():
    cfg = LensConfig(model="EPL")
    prior = LensPrior(cfg)
    assert prior.names == ["x0", "y0", "rein", "q", "phi", "t", "g1", "g2"]
    # normalisation: E_u[p(theta) / u(theta)] = 1 for theta uniform on the box x square around the disc
    rng = np.random.default_rng(1)
    n = 200_000
    lo = np.array([v[0] for v in prior.box.values()] + [-cfg.shear_max] * 2)
    hi = np.array([v[1] for v in prior.box.values()] + [cfg.shear_max] * 2)
    theta = torch.as_tensor(lo + (hi - lo) * rng.random((n, len(lo))))
    ratio = prior.log_prob(theta).exp() * float(np.prod(hi - lo))
    assert abs(float(ratio.mean()) - 1.0) < 4 * float(ratio.std()) / math.sqrt(n)
    # the draws lie in the support (the radial law is checked against the exact formula above)
    draws = prior.sample(500, np.random.default_rng(2))
    assert torch.isfinite(prior.log_prob(draws)).all()
    assert prior.log_prob(draws[:1] * torch.tensor([1, 1, 1, 1, 1, 1, 100, 100.0])).item() == -math.inf


def test_shear_normaliser():
    # P(|g| <= gmax) of an isotropic normal: Rayleigh CDF
    assert math.exp(shear_disc_log_mass(0.05, 0.15)) == pytest.approx(1 - math.exp(-4.5), rel=1e-12)


def test_fixed_parameters_are_not_inferred_and_round_trip():
    cfg = LensConfig(center=0.0, q=(0.8, 0.8), shear_sigma=0.0)
    prior = LensPrior(cfg)
    assert prior.names == ["rein", "phi"]
    lens = draw_lens(cfg, np.random.default_rng(0))
    assert (lens.x0, lens.y0, lens.q, lens.g1, lens.g2) == (0.0, 0.0, 0.8, 0.0, 0.0)
    back = prior.to_lens(prior.to_vector(lens))
    assert back == lens


def test_impossible_truncation_is_a_clear_error():
    cfg = LensConfig(shear_sigma=1.0, shear_max=1e-9)
    with pytest.raises(ValueError, match="shear_max"):
        draw_lens(cfg, np.random.default_rng(0))
