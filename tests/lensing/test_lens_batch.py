"""The batched lens operator: one model with the single-lens sparse matrix, each row through its own lens."""

import numpy as np
import pytest
import torch

from pipeline.lensing.config import LensConfig
from pipeline.lensing.lens_batch import LENS_KEYS, LensBatchOperator
from pipeline.lensing.lens_prior import draw_lens
from pipeline.lensing.operator import assemble_matrix, gaussian_psf

GEO = dict(image_shape=(12, 10), image_pixscale=0.2, source_npix=8, source_pixscale=0.15, supersample=2)


def _lenses(n, seed=0):
    rng = np.random.default_rng(seed)
    cfg = LensConfig(center=0.1, shear_sigma=0.08)
    return [draw_lens(cfg, rng) for _ in range(n)]


def _batch(lenses):
    return {k: torch.tensor([float(getattr(ln, k)) for ln in lenses], dtype=torch.float64) for k in LENS_KEYS}


@pytest.mark.parametrize("psf", [None, "gauss"])
def test_each_row_equals_the_assembled_matrix_of_its_lens(psf):
    kern = gaussian_psf(0.2, GEO["image_pixscale"] / GEO["supersample"], 5) if psf else None
    lenses = _lenses(5)
    op = LensBatchOperator(**GEO, psf=kern, unit_factor=0.04).bind(_batch(lenses))
    dense = op.dense()
    assert dense.shape == (5, 120, 64)
    for b, lens in enumerate(lenses):
        M = assemble_matrix(lens, psf=kern, **GEO).to_dense().double() * 0.04
        assert float(M.abs().max()) > 0
        torch.testing.assert_close(dense[b], M, rtol=0, atol=1e-6 * float(M.abs().max()))
    # distinct lenses give distinct operators
    assert float((dense[0] - dense[1]).abs().max()) > 1e-3 * float(dense[0].abs().max())


def test_A_and_AT_are_the_dense_maps_and_adjoint():
    kern = gaussian_psf(0.2, GEO["image_pixscale"] / GEO["supersample"], 5)
    op = LensBatchOperator(**GEO, psf=kern).bind(_batch(_lenses(4, seed=1)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64)
    r = torch.randn(4, 120, generator=g, dtype=torch.float64)
    dense = op.dense()
    torch.testing.assert_close(op.A(x), torch.einsum("bmd,bd->bm", dense, x))
    torch.testing.assert_close(op.AT(r), torch.einsum("bmd,bm->bd", dense, r))
    # <A x, r> = <x, A^T r> row by row
    torch.testing.assert_close((op.A(x) * r).sum(-1), (x * op.AT(r)).sum(-1))
    # diag(A^T A) per lens
    torch.testing.assert_close(op.diag_AtA(), dense.pow(2).sum(1))
    assert op.A(x.float()).dtype == torch.float32


def test_a_ray_through_the_lens_centre_gives_no_light_and_no_error():
    """An odd grid has a sub-pixel at the origin; a lens centred there deflects it by 0/0 (NaN in caustics'
    SIE). caustics' forward gives that sub-pixel no light: both operator paths agree and stay finite."""
    from pipeline.lensing.operator import LensParams

    geo = dict(image_shape=(11, 11), image_pixscale=0.2, source_npix=8, source_pixscale=0.15, supersample=1)
    lens = LensParams(model="SIE", x0=0.0, y0=0.0, q=0.8, phi=0.3, rein=0.7)
    M = assemble_matrix(lens, psf=None, **geo).to_dense().double()
    assert bool(torch.isfinite(M).all())
    op = LensBatchOperator(**geo, psf=None).bind(_batch([lens]))
    torch.testing.assert_close(op.dense()[0], M, rtol=0, atol=1e-6 * float(M.abs().max()))
    assert bool(torch.isfinite(op.A(torch.ones(1, 64, dtype=torch.float64))).all())


def test_guards_rows_model_and_weighted_diagonal():
    op = LensBatchOperator(**GEO, psf=None)
    with pytest.raises(RuntimeError, match="bind"):
        op.A(torch.ones(2, 64))
    op.bind(_batch(_lenses(2)))
    with pytest.raises(ValueError, match="5 sources for 2 bound lenses"):
        op.A(torch.ones(5, 64))
    with pytest.raises(ValueError, match="SIE"):
        op.bind({**_batch(_lenses(2)), "model": "EPL"})
    w = torch.rand(120, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = op.dense()
    torch.testing.assert_close(op.diag_AtA(pixel_weights=w), (dense.pow(2) * w[None, :, None]).sum(1))
