"""The sparse lens operator: caustics agreement, adjoint, helpers, normalised likelihood, PSF rules,
brightness map and the evidence's units."""

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.operator import (LensingProblem, LensParams, assemble_matrix, assemble_matrix_probe,
                                       build_simulator, caustics_forward, gaussian_psf, psf_fwhm, resample_psf)

N, PIX, SS, NS, SPIX = 16, 0.1, 2, 16, 0.1
LENS = LensParams(x0=0.02, y0=-0.01, q=0.7, phi=0.5, rein=0.5, g1=0.03, g2=-0.02)


def _problem(lens=LENS, sigma=None, mask=None, scale=1.0, offset=0.0, psf="default", device="cpu"):
    if isinstance(psf, str):
        psf = gaussian_psf(0.15, PIX / SS, 7)
    if sigma is None:
        sigma = torch.linspace(0.5, 1.5, N * N).reshape(N, N)
    return LensingProblem.from_lens(lens, image_shape=(N, N), image_pixscale=PIX, source_npix=NS,
                                    source_pixscale=SPIX, supersample=SS, psf=psf, sigma=sigma, mask=mask,
                                    scale=scale, offset=offset, device=device)


def _blob(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = (torch.arange(NS) - (NS - 1) / 2) * SPIX
    xx, yy = torch.meshgrid(c, c, indexing="xy")
    out = []
    for _ in range(b):
        x0, y0 = (torch.rand(2, generator=g) - 0.5) * 0.3
        r = 0.1 + 0.2 * torch.rand(1, generator=g)
        out.append(torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * r ** 2)) + 0.1 * torch.rand(NS, NS, generator=g))
    return torch.stack(out)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_gaussian_psf_fwhm_and_normalisation():
    for fwhm, samp in ((0.15, 0.05), (0.15, 0.025), (0.3, 0.05)):
        p = gaussian_psf(fwhm, samp, 31)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert psf_fwhm(p, samp) == pytest.approx(fwhm, rel=5e-3)
    with pytest.raises(ValueError):
        gaussian_psf(0.15, 0.05, 10)


def test_caustics_gaussian_helper_pitfall_is_avoided():
    """caustics.utils.gaussian takes the SUB-sample spacing: for a PSF at the supersampled scale pix/k built
    with upsample m, pixelscale must be pix/(k m). Our own Gaussian agrees with that usage."""
    import caustics

    k, m = SS, 4
    sigma = 0.15 / (2 * math.sqrt(2 * math.log(2)))
    g = caustics.utils.gaussian(pixelscale=PIX / (k * m), nx=11, ny=11, sigma=sigma, upsample=m)
    g = (g / g.sum()).double().numpy()
    assert psf_fwhm(g, PIX / k) == pytest.approx(0.15, rel=0.03)
    ours = gaussian_psf(0.15, PIX / k, 11)
    assert np.abs(g - ours).sum() < 0.05


def test_resample_psf_rule():
    fine = gaussian_psf(0.3, 0.05, 31)
    # identity when the scales agree
    assert np.allclose(resample_psf(fine, 0.05, 0.05), fine)
    # coarse (Nyquist-sampled) -> supersampled: FWHM kept, close to sampling the Gaussian directly
    coarse = gaussian_psf(0.3, 0.1, 15)
    up = resample_psf(coarse, 0.1, 0.05)
    assert up.shape[0] % 2 == 1 and up.sum() == pytest.approx(1.0)
    assert psf_fwhm(up, 0.05) == pytest.approx(0.3, rel=0.02)
    direct = gaussian_psf(0.3, 0.05, up.shape[0])
    assert np.abs(up - direct).sum() < 0.03
    # finer -> supersampled scale
    finer = gaussian_psf(0.3, 0.025, 61)
    down = resample_psf(finer, 0.025, 0.05)
    assert psf_fwhm(down, 0.05) == pytest.approx(0.3, rel=0.01)
    with pytest.raises(ValueError):
        resample_psf(np.ones((4, 4)), 0.1, 0.05)


@pytest.mark.parametrize("model", ["SIE", "EPL"])
def test_sparse_matches_caustics(model):
    lens = LensParams(**{**LENS.as_dict(), "model": model, "t": 1.15 if model == "EPL" else 1.0})
    prob = _problem(lens)
    psf = gaussian_psf(0.15, PIX / SS, 7)
    sim = build_simulator(lens, (N, N), PIX, NS, SPIX, SS, psf, psf_mode="fft")
    x = _blob(4)
    ref = caustics_forward(sim, x)
    assert _rel(prob.physical_forward(x), ref) <= 1e-5
    assert prob.nnz < 0.5 * N * N * NS * NS   # genuinely sparse


def _asymmetric_psf():
    """An elongated, off-centre PSF: catches a flipped convolution."""
    c = np.arange(9) - 4
    g = np.exp(-((c[None, :] - 1.2) ** 2 / 3.0 + (c[:, None] + 0.5) ** 2 / 1.2))
    g[0, 8] += 0.3 * g.max()
    return g / g.sum()


@pytest.mark.parametrize("shape,psf_kind", [((N, N), "gauss"), ((12, 18), None), ((N, N + 2), "asym")])
def test_direct_assembly_equals_probing_caustics(shape, psf_kind):
    """The directly built matrix (bilinear weights x PSF x pooling) equals the one probed column by column
    through caustics, for square and rectangular images, without PSF, with a Gaussian and with an
    asymmetric PSF."""
    psf = {"gauss": gaussian_psf(0.15, PIX / SS, 7), "asym": _asymmetric_psf(), None: None}[psf_kind]
    M = assemble_matrix(LENS, shape, PIX, NS, SPIX, SS, psf).to_dense()
    sim = build_simulator(LENS, shape, PIX, NS, SPIX, SS, psf, psf_mode="conv2d")
    P = assemble_matrix_probe(sim, NS).to_dense()
    assert M.shape == (shape[0] * shape[1], NS * NS)
    assert float((M - P).norm() / P.norm()) < 1e-5
    assert float((M - P).abs().max()) < 1e-5 * float(P.abs().max())


def test_adjoint_dense_and_helpers():
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[:3] = False
    prob = _problem(mask=mask, scale=1.7, offset=0.05)
    g = torch.Generator().manual_seed(1)
    u, r = torch.randn(3, 1, NS, NS, generator=g), torch.randn(3, N, N, generator=g)
    lhs = (prob.A(u).double() * r.double()).sum()
    rhs = (u.double() * prob.AT(r).double()).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-5)
    D = prob.dense_matrix()
    assert D.shape == (N * N, NS * NS)
    assert torch.allclose(prob.A(u).reshape(3, -1).double(), u.reshape(3, -1).double() @ D.T, rtol=1e-5, atol=1e-5)
    w = (mask / prob.sigma ** 2).reshape(-1).double()
    diag = (D ** 2 * w[:, None]).sum(0)
    assert torch.allclose(prob.diag_AtA_over_sigma2().reshape(-1).double(), diag, rtol=1e-4)
    # row sums of |A|^T W |A|: the Gershgorin bound on every eigenvalue of A^T W A, at least the diagonal
    row = D.abs().T @ (w * D.abs().sum(1))
    got = prob.row_AtA_over_sigma2().reshape(-1).double()
    assert torch.allclose(got, row, rtol=1e-4) and bool((got >= diag * (1 - 1e-5)).all())
    assert float(torch.linalg.eigvalsh(D.T @ (w[:, None] * D)).max()) <= float(got.max()) * (1 + 1e-5)
    y = torch.randn(N, N, generator=g)
    bp = D.T @ (((y - prob.offset_image) / prob.sigma ** 2 * mask).reshape(-1).double())
    assert torch.allclose(prob.backproject(y).reshape(-1).double(), bp, rtol=1e-4, atol=1e-5)
    assert prob.backproject(y[None].expand(2, N, N)).shape == (2, 1, NS, NS)
    assert prob.row_precision(y[None].expand(2, N, N)).shape == (2, 1, NS, NS)
    # kept between calls, and still follows the brightness scale
    prob.set_brightness(3.4, 0.05)
    torch.testing.assert_close(prob.row_AtA_over_sigma2().reshape(-1).double(), row * (3.4 / 1.7) ** 2, rtol=1e-4,
                               atol=0.0)


def test_brightness_map_and_gradient():
    prob = _problem(scale=2.5, offset=0.3)
    x = _blob(2)[:, None]
    phys = prob.physical_forward(2.5 * x + 0.3)
    assert torch.allclose(prob.forward(x), phys, rtol=1e-5, atol=1e-6)
    assert torch.allclose(prob.data_for_linear(phys), prob.A(x), rtol=1e-4, atol=1e-5)
    y = prob.simulate(x[:1], generator=torch.Generator().manual_seed(0))[0]
    g = prob.grad_log_likelihood(x, y)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(LensingProblem.log_likelihood(prob, xg, y).sum(), xg)
    assert torch.allclose(g, ga.float(), rtol=1e-4, atol=1e-4)


def test_log_likelihood_fully_normalised_with_mask():
    mask = torch.rand(N, N, generator=torch.Generator().manual_seed(3)) > 0.2
    prob = _problem(mask=mask)
    x = _blob(2)[:, None]
    y = prob.forward(x[:1])[0] + prob.sigma * torch.randn(N, N, generator=torch.Generator().manual_seed(4))
    mean = prob.forward(x).double()
    s = prob.sigma.double()
    ref = (-0.5 * ((y.double() - mean) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi))
    ref = (ref * mask).reshape(2, -1).sum(1)
    ll = prob.log_likelihood(x, y)
    assert ll.dtype == torch.float64
    assert torch.allclose(ll, ref, rtol=1e-9, atol=1e-6)
    y2 = y.clone()
    y2[~mask] += 100.0      # masked pixels do not enter
    assert torch.allclose(prob.log_likelihood(x, y2), ll)


def _gaussian_log_z(prob, y):
    """log N(y_m; offset_image_m, A_m A_m^T + diag(sigma_m^2)) for x ~ N(0, I) in network units."""
    m = prob.mask.reshape(-1)
    A = prob.dense_matrix()[m]
    C = A @ A.T + torch.diag(prob.sigma.double().reshape(-1)[m] ** 2)
    r = (y.double() - prob.offset_image.double()).reshape(-1)[m]
    return float(torch.distributions.MultivariateNormal(torch.zeros(len(r), dtype=torch.float64), C).log_prob(r))


def test_rescaling_data_shifts_log_z_by_minus_m_log_sy():
    """SCI multiplied by s_y (NOISE too, and the brightness map that turns network units into SCI's physical
    units): log Z changes by exactly -m log s_y, m = unmasked pixels; the log-likelihood identity holds
    for every x."""
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[-4:, :5] = False
    s, b, s_y = 1.3, 0.2, 7.5
    p1 = _problem(mask=mask, scale=s, offset=b)
    x = _blob(2)[:, None]
    y = p1.simulate(x[:1], generator=torch.Generator().manual_seed(5))[0]
    p2 = LensingProblem(p1.M, p1.sigma * s_y, mask, image_shape=(N, N), source_npix=NS, scale=s * s_y,
                        offset=b * s_y)
    m = int(mask.sum())
    lz1, lz2 = _gaussian_log_z(p1, y), _gaussian_log_z(p2, y * s_y)
    assert lz2 - lz1 == pytest.approx(-m * math.log(s_y), abs=1e-6 * m)
    d = p2.log_likelihood(x, y * s_y) - p1.log_likelihood(x, y)
    assert torch.allclose(d, torch.full_like(d, -m * math.log(s_y)), atol=1e-6 * m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_problem_on_cuda_matches_cpu():
    cpu = _problem()
    gpu = _problem(device="cuda")
    x = _blob(3)[:, None]
    y = cpu.forward(x[:1])[0]
    assert torch.allclose(gpu.forward(x.cuda()).cpu(), cpu.forward(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(gpu.log_likelihood(x.cuda(), y.cuda()).cpu(), cpu.log_likelihood(x, y), rtol=1e-6)
    assert torch.allclose(gpu.backproject(y.cuda()).cpu(), cpu.backproject(y), rtol=1e-4, atol=1e-5)
