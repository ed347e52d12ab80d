"""MultiLensProblem: packed observations dispatch each sample to its own lens, exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.amortized import MultiLensProblem
from pipeline.lensing.config import GeometryConfig, LensConfig
from pipeline.lensing.simulate import draw_lens, make_problem

GEOM = GeometryConfig(image_npix=12, image_pixscale=0.2, source_npix=12, source_pixscale=0.1, supersample=1,
                      psf_fwhm=0.3, psf_npix=5)


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    probs = [make_problem(draw_lens(LensConfig(), rng), GEOM, sigma=0.05 * (i + 1)) for i in range(3)]
    for p in probs:
        p.set_brightness(2.0, 0.1)
    return MultiLensProblem(probs)


def test_packed_likelihood_and_gradient_equal_each_lens(pool):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 12, 12, generator=g)
    idx = [2, 0, 1, 1, 0, 2]
    ys = [pool.problems[i].simulate(x[j:j + 1], generator=g)[0] for j, i in enumerate(idx)]
    yp = torch.stack([pool.pack(i, y) for i, y in zip(idx, ys)])
    ll = pool.log_likelihood(x, yp)
    gr = pool.grad_log_likelihood(x, yp)
    for j, i in enumerate(idx):
        p = pool.problems[i]
        assert ll[j].item() == pytest.approx(p.log_likelihood(x[j:j + 1], ys[j])[0].item(), rel=1e-12)
        torch.testing.assert_close(gr[j], p.grad_log_likelihood(x[j:j + 1], ys[j])[0])
    # different noise levels per lens: the normalising constants differ, so a mix-up would show
    assert len({round(p.log_norm_const(), 6) for p in pool.problems}) == 3


def test_features_are_source_plane_maps_of_the_right_lens(pool):
    y = pool.problems[1].simulate(torch.rand(1, 1, 12, 12))[0]
    f = pool.features(pool.pack(1, y)[None])
    assert f.shape == (1, 2, 12, 12)
    diag = pool.problems[1].diag_AtA_over_sigma2().reshape(12, 12)
    torch.testing.assert_close(f[0, 1], torch.log1p(diag))
    bp = pool.problems[1].backproject(y).reshape(12, 12)
    torch.testing.assert_close(f[0, 0], bp / (diag + 1.0))


def test_bad_lens_index_is_refused(pool):
    bad = pool.pack(0, torch.zeros(12, 12))
    bad[0] = 7
    with pytest.raises(ValueError, match="lens index"):
        pool.log_likelihood(torch.zeros(1, 1, 12, 12), bad[None])


@pytest.mark.parametrize("method", ["dps", "dps_cla"])
def test_frozen_guidance_on_a_mixed_batch_uses_each_rows_own_lens(pool, method):
    """RTB's guided parameterisation on the amortized pool: each row's shift is its own lens's."""
    from pipeline.diffusion.schedule import NoiseSchedule
    from pipeline.samplers.guidance import frozen_guidance_shift

    chain = NoiseSchedule(T=100).chain(10, "small")
    g = torch.Generator().manual_seed(3)
    idx = [1, 2, 0, 1]
    x_true = torch.rand(4, 1, 12, 12, generator=g)
    ys = [pool.problems[i].simulate(x_true[j:j + 1], generator=g)[0] for j, i in enumerate(idx)]
    yp = torch.stack([pool.pack(i, y) for i, y in zip(idx, ys)])
    x, eps = torch.randn(4, 1, 12, 12, generator=g), torch.randn(4, 1, 12, 12, generator=g)
    got = frozen_guidance_shift(method, chain, pool, yp, x, eps, 5, 0.7)
    assert got.shape == x.shape and torch.isfinite(got).all()
    for j, i in enumerate(idx):
        want = frozen_guidance_shift(method, chain, pool.problems[i], ys[j], x[j:j + 1], eps[j:j + 1], 5, 0.7)
        torch.testing.assert_close(got[j:j + 1], want, rtol=1e-5, atol=1e-7)
    # the lenses differ, so evaluating a row under another lens gives another shift
    other = frozen_guidance_shift(method, chain, pool.problems[2], ys[0], x[:1], eps[:1], 5, 0.7)
    assert (other - got[:1]).abs().max() > 1e-3 * got[:1].abs().max()


def test_resample_within_groups_draws_one_member_per_group_by_its_own_weights():
    """SIR in independent groups (rtb_amortized_is): each index lies in its own group, a dominant
    weight is always picked, frequencies follow the within-group weights, and a group with no finite
    weight is refused."""
    from pipeline.rtb.sampler import resample_within_groups

    gen = torch.Generator().manual_seed(0)
    n, m = 4000, 2
    # group g: log-weights (0, log 4) -> P(second) = 0.8; the overall scale differs between groups
    lw = torch.stack([torch.zeros(n), torch.full((n,), math.log(4.0))], 1) + torch.arange(n)[:, None] * 3.0
    idx, w = resample_within_groups(lw.reshape(-1), n, gen)
    assert idx.shape == (n,) and bool(((idx // m) == torch.arange(n)).all())
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, rtol=1e-12)
    frac = float((idx % m == 1).double().mean())
    assert abs(frac - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)  # binomial, 4 sigma
    dominant = torch.tensor([[0.0, 0.0, 50.0], [80.0, 0.0, 0.0]])
    assert resample_within_groups(dominant.reshape(-1), 2, gen)[0].tolist() == [2, 3]
    with pytest.raises(ValueError, match="no finite"):
        resample_within_groups(torch.tensor([0.0, 0.0, -math.inf, -math.inf]), 2, gen)
