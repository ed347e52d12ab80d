"""LensBatch: a per-sample batch of lenses dispatches each row to its own lens, exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.amortized import LensBatch, MultiLensProblem, lens_features
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


def _mixed(pool, seed=1):
    """Six observations of three lenses, mixed: (index, x, y (6, ny, nx))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 12, 12, generator=g)
    idx = [2, 0, 1, 1, 0, 2]
    ys = torch.stack([pool.problems[i].simulate(x[j:j + 1], generator=g)[0] for j, i in enumerate(idx)])
    return idx, x, ys


def test_lens_batch_rows_equal_each_lens_alone(pool):
    """forward, log-likelihood, chi2, gradient, data precision and features of a mixed batch: row j is
    bit-identical to lens idx[j] evaluated on its own."""
    idx, x, ys = _mixed(pool)
    lenses = pool.take(idx)
    assert isinstance(lenses, LensBatch) and tuple(lenses.y_shape) == (12, 12) and len(lenses) == 6
    out = {"forward": lenses.forward(x), "ll": lenses.log_likelihood(x, ys), "chi2": lenses.residual_chi2(x, ys),
           "grad": lenses.grad_log_likelihood(x, ys), "diag": lenses.diag_precision(ys),
           "row": lenses.row_precision(ys), "feats": lens_features(lenses, ys),
           "wres": lenses.whitened_residual(x, ys), "wA": lenses.whitened_A(x), "wAT": lenses.whitened_AT(ys)}
    for j, i in enumerate(idx):
        p, xj, yj = pool.problems[i], x[j:j + 1], ys[j:j + 1]
        want = {"forward": p.forward(xj), "ll": p.log_likelihood(xj, yj), "chi2": p.residual_chi2(xj, yj),
                "grad": p.grad_log_likelihood(xj, yj), "diag": p.diag_precision(yj),
                "row": p.row_precision(yj), "feats": lens_features(p, yj),
                "wres": p.whitened_residual(xj, yj), "wA": p.whitened_A(xj), "wAT": p.whitened_AT(yj)}
        for name, v in want.items():
            torch.testing.assert_close(out[name][j:j + 1], v, rtol=0, atol=0, msg=name)
    # the whitened pair is adjoint: <W A u, w> = <u, A^T W w> on every row
    lhs = (out["wA"].double() * ys.double()).flatten(1).sum(1)
    rhs = (x.double() * out["wAT"].double().reshape(x.shape)).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-3)
    # different noise levels per lens: the normalising constants differ, so a mix-up would show
    assert len({round(p.log_norm_const(), 6) for p in pool.problems}) == 3
    assert (out["ll"][0] - pool.problems[0].log_likelihood(x[:1], ys[:1])[0]).abs() > 1.0


def test_lens_batch_stacks_like_y(pool):
    """repeat / repeat_interleave / index_select / cat follow y's rows (what the chunked gradient pass
    and replay need)."""
    idx, x, ys = _mixed(pool)
    lenses = pool.take(idx)
    ll = lenses.log_likelihood(x, ys)
    torch.testing.assert_close(lenses.repeat(3).log_likelihood(x.repeat(3, 1, 1, 1), ys.repeat(3, 1, 1)),
                               ll.repeat(3), rtol=0, atol=0)
    torch.testing.assert_close(lenses.repeat_interleave(2).index.reshape(6, 2)[:, 1], torch.tensor(idx))
    rows = torch.tensor([5, 0, 3])
    torch.testing.assert_close(lenses.index_select(rows).log_likelihood(x[rows], ys[rows]), ll[rows], rtol=0, atol=0)
    both = LensBatch.cat([lenses.index_select(rows), lenses])
    assert both.index.tolist() == [idx[5], idx[0], idx[3], *idx]


def test_features_are_source_plane_maps_of_the_right_lens(pool):
    y = pool.problems[1].simulate(torch.rand(1, 1, 12, 12))
    f = lens_features(pool.take([1]), y)
    assert f.shape == (1, 2, 12, 12)
    diag = pool.problems[1].diag_AtA_over_sigma2().reshape(12, 12)
    torch.testing.assert_close(f[0, 1], torch.log1p(diag))
    bp = pool.problems[1].backproject(y[0]).reshape(12, 12)
    torch.testing.assert_close(f[0, 0], bp / (diag + 1.0))


def test_bad_lens_index_and_row_count_are_refused(pool):
    with pytest.raises(ValueError, match="lens index"):
        pool.take([0, 7])
    with pytest.raises(ValueError, match="rows"):
        pool.take([0, 1]).log_likelihood(torch.zeros(3, 1, 12, 12), torch.zeros(3, 12, 12))


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
    x, eps = torch.randn(4, 1, 12, 12, generator=g), torch.randn(4, 1, 12, 12, generator=g)
    got = frozen_guidance_shift(method, chain, pool.take(idx), torch.stack(ys), x, eps, 5, 0.7)
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
