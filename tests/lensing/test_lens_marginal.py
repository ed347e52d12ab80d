"""The lens evidence with the source marginalised under a low-rank Gaussian: exact against a dense Gaussian
marginal of the pipeline's own operator, and the source Gaussian's moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.diffusion.gaussian_chain import gaussian_linear_posterior
from pipeline.lensing.config import LensConfig, LensingConfig
from pipeline.lensing.lens_batch import LensBatchOperator
from pipeline.lensing.lens_evidence import problem_at_lens
from pipeline.lensing.lens_marginal import GaussianSourceEvidence, SourceGaussian, gaussian_mixture_em, pixel_kernel
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.observation import load_observation

from tests.lensing.small_observation import GEOM, LENS, edit_fits, small_source, write_small_observation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # caustics on NumPy 2

PRIOR = LensPrior(LensConfig(center=0.05))          # every parameter free: x0, y0, rein, q, phi, g1, g2


def _source(d: int, rank: int, seed: int = 0) -> SourceGaussian:
    g = torch.Generator().manual_seed(seed)
    return SourceGaussian(torch.rand(d, generator=g, dtype=torch.float64) * 0.3,
                          torch.randn(d, rank, generator=g, dtype=torch.float64) * 0.2)


def _masked_observation(tmp_path):
    """The small observation with a 3x4 block of pixels masked out and a per-pixel noise map."""
    src = write_small_observation(tmp_path / "obs.fits")

    def edit(hl):
        bad = np.zeros(hl["SCI"].data.shape, np.int16)
        bad[2:5, 9:13] = 1
        mask = fits.ImageHDU(bad, name="MASK")
        mask.header["MASKTYPE"] = "BAD"
        hl.append(mask)
        ramp = 1 + 0.5 * np.linspace(0, 1, bad.size).reshape(bad.shape)
        hl["NOISE"].data = (hl["NOISE"].data * ramp).astype(np.float32)

    return load_observation(edit_fits(src, tmp_path / "masked.fits", edit), LensingConfig(geometry=GEOM))


def _dense_log_evidence(problem, y, meta, source, lens, mean: bool = False, amplitude: float = 1.0, shape: int = 0):
    """log N(y; A(scale a m_c + offset), A scale^2 a^2 S_c A^T + sigma^2) over the unmasked pixels for the
    source's shape c, from the dense matrix of the problem rebuilt at ``lens`` (the pipeline's single-lens
    operator); with ``mean`` the source's posterior mean in network units instead."""
    p = problem_at_lens(problem, meta, lens)
    keep = p.mask.reshape(-1).bool()
    A = p.dense_matrix()[keep] / p.scale
    r = (y.double().reshape(-1) - p.offset_image.double().reshape(-1))[keep]
    s2 = p.sigma.double().reshape(-1)[keep] ** 2
    a = amplitude
    post_mean, _, log_z = gaussian_linear_posterior(p.scale * a * source.shape_mean(shape),
                                                    (p.scale * a) ** 2 * source.covariance(shape), A, s2, r)
    return post_mean / p.scale if mean else float(log_z)


def test_the_evidence_is_the_dense_gaussian_marginal_at_any_lens(tmp_path):
    """At the file's lens and at three others (batched, two observations, rows interleaved) the Woodbury
    evidence equals the dense Gaussian marginal of the pipeline's sparse operator to 1e-6 relative (float32
    operator inside the reference), with a mask and a per-pixel sigma."""
    problem, y, meta = _masked_observation(tmp_path)
    assert problem.mask.sum() < problem.mask.numel()
    problem.set_brightness(2.5, 0.1)                              # a non-trivial network <-> physical map
    y2 = y + 0.3
    source = _source(problem.d, rank=12)
    ev = GaussianSourceEvidence([(problem, y, meta), (problem, y2, meta)], PRIOR, source, chunk=3,
                                dtype=torch.float64)
    truth = PRIOR.to_vector(LENS)
    thetas = torch.stack([truth, truth + torch.tensor([0.01, -0.02, 0.05, -0.1, 0.3, 0.02, 0.01]),
                          truth + torch.tensor([-0.03, 0.0, -0.1, 0.1, -0.5, -0.04, 0.05]),
                          truth + torch.tensor([0.0, 0.03, 0.2, 0.0, 1.0, 0.0, -0.02])]).double()
    theta = thetas.repeat_interleave(2, 0)
    rows = torch.tensor([0, 1] * 4)
    got = ev.log_likelihood(theta, rows)
    for i in range(8):
        want = _dense_log_evidence(problem, (y, y2)[i % 2], meta, source, PRIOR.to_lens(theta[i]))
        assert math.isclose(float(got[i]), want, rel_tol=1e-6, abs_tol=1e-3), (i, float(got[i]), want)
    want = _dense_log_evidence(problem, y, meta, source, PRIOR.to_lens(theta[2]), mean=True)
    torch.testing.assert_close(ev.posterior_mean(theta[2:3], 0)[0], want, rtol=1e-5, atol=1e-6)
    # with the true source (network units) as the Gaussian's one direction, the file's lens wins by far
    truth = (torch.as_tensor(small_source(), dtype=torch.float64).reshape(-1) - 0.1) / 2.5
    exact = GaussianSourceEvidence([(problem, y, meta)], PRIOR, SourceGaussian(0 * truth, truth[:, None]))
    ll = exact.log_likelihood(thetas, torch.zeros(4, dtype=torch.long))
    assert float(ll[0]) > float(ll[1:].max()) + 100, ll


def test_the_amplitude_mixture_is_the_weighted_sum_of_dense_marginals(tmp_path):
    """With three amplitudes (one of weight 0, dropped) the evidence is log sum_k pi_k N_k(y) of the dense
    marginals at each amplitude, at two lenses with a mask, per-pixel sigma and offset, and the posterior
    mean is the mixture of the dense posterior means weighted by p(a_k | y, theta)."""
    problem, y, meta = _masked_observation(tmp_path)
    problem.set_brightness(2.5, 0.1)
    plain = _source(problem.d, rank=6, seed=2)
    source = SourceGaussian(plain.mean, plain.basis, amplitudes=torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64),
                            weights=torch.tensor([0.2, 0.0, 0.6]))
    assert torch.allclose(source.amplitudes, torch.tensor([0.3, 4.0], dtype=torch.float64))
    ev = GaussianSourceEvidence([(problem, y, meta)], PRIOR, source, dtype=torch.float64)
    thetas = torch.stack([PRIOR.to_vector(LENS), PRIOR.to_vector(LENS) + 0.02]).double()
    got = ev.log_likelihood(thetas, torch.zeros(2, dtype=torch.long))
    for i in range(2):
        lens = PRIOR.to_lens(thetas[i])
        parts = torch.tensor([math.log(w) + _dense_log_evidence(problem, y, meta, plain, lens, amplitude=a)
                              for a, w in ((0.3, 0.25), (4.0, 0.75))])
        assert math.isclose(float(got[i]), float(torch.logsumexp(parts, 0)), rel_tol=1e-6, abs_tol=1e-3)
        post = torch.softmax(parts, 0)
        want = sum(post[k] * _dense_log_evidence(problem, y, meta, plain, lens, mean=True, amplitude=a)
                   for k, a in enumerate((0.3, 4.0)))
        torch.testing.assert_close(ev.posterior_mean(thetas[i:i + 1], 0)[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="amplitudes must be > 0"):
        SourceGaussian(plain.mean, plain.basis, amplitudes=torch.tensor([0.0, 1.0]))


def test_the_shape_mixture_is_the_weighted_sum_of_dense_marginals(tmp_path):
    """Three shapes (own mean and covariance in the basis's coefficients) times two amplitudes, one pair of
    weight 0: the evidence is
    log sum_ck pi_ck N_ck(y) of the dense marginals, and the posterior mean their mixture weighted by
    p(c, a_k | y, theta), at two lenses with a mask, per-pixel sigma and offset."""
    problem, y, meta = _masked_observation(tmp_path)
    problem.set_brightness(2.5, 0.1)
    plain = _source(problem.d, rank=5, seed=3)
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(3, 5, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.eye(5, dtype=torch.float64)
                                 + (lambda m: m @ m.mT)(torch.randn(3, 5, 5, generator=g, dtype=torch.float64)) / 5)
    amps, w = (0.5, 2.0), torch.tensor([[0.1, 0.25], [0.3, 0.0], [0.15, 0.2]])
    source = SourceGaussian(plain.mean, plain.basis, amplitudes=torch.tensor(amps), weights=w, shape_means=mu,
                            shape_chol=chol)
    ev = GaussianSourceEvidence([(problem, y, meta)], PRIOR, source, dtype=torch.float64)
    thetas = torch.stack([PRIOR.to_vector(LENS), PRIOR.to_vector(LENS) - 0.02]).double()
    got = ev.log_likelihood(thetas, torch.zeros(2, dtype=torch.long))
    for i in range(2):
        lens = PRIOR.to_lens(thetas[i])
        ck = [(c, k) for c in range(3) for k in range(2) if w[c, k] > 0]
        parts = torch.tensor([math.log(w[c, k]) + _dense_log_evidence(problem, y, meta, source, lens,
                                                                      amplitude=amps[k], shape=c) for c, k in ck],
                             dtype=torch.float64)
        assert math.isclose(float(got[i]), float(torch.logsumexp(parts, 0)), rel_tol=1e-6, abs_tol=1e-3)
        post = torch.softmax(parts, 0)
        want = sum(post[j] * _dense_log_evidence(problem, y, meta, source, lens, mean=True, amplitude=amps[k], shape=c)
                   for j, (c, k) in enumerate(ck))
        torch.testing.assert_close(ev.posterior_mean(thetas[i:i + 1], 0)[0], want, rtol=1e-5, atol=1e-6)
    draws = source.sample(20000, torch.Generator().manual_seed(0))
    want_mean = sum(w[c, k] * amps[k] * source.shape_mean(c) for c in range(3) for k in range(2))
    assert float((draws.mean(0) - want_mean).abs().max()) < 0.05 * float(want_mean.abs().max()) + 0.02
    with pytest.raises(ValueError, match=r"weights must be \(3, 2\) for 3 shapes and 2 amplitudes"):
        SourceGaussian(plain.mean, plain.basis, amplitudes=torch.tensor(amps), weights=w.reshape(-1), shape_means=mu,
                       shape_chol=chol)


def test_gaussian_mixture_em_recovers_a_known_mixture():
    """Two well-separated correlated Gaussians in 3-D, weights 0.3 and 0.7: EM finds the weights to 0.02, the
    means to 0.05 and the covariances to 0.1 from 6,000 draws."""
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([[4.0, 0.0, 0.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
    chols = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 0.3]], [[0.5, 0, 0], [0, 1.0, 0], [0.2, -0.4, 1.0]]],
                         dtype=torch.float64)
    c = (torch.rand(6000, generator=g) < 0.7).long()
    z = means[c] + (chols[c] @ torch.randn(6000, 3, 1, generator=g, dtype=torch.float64))[..., 0]
    w, mu, chol, resp = gaussian_mixture_em(z, 2, reg=1e-6, seed=0)
    order = mu[:, 0].argsort(descending=True)
    w, mu, chol = w[order], mu[order], chol[order]
    assert torch.allclose(w, torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.02), w
    assert torch.allclose(mu, means, atol=0.05), mu
    assert torch.allclose(chol @ chol.transpose(1, 2), chols @ chols.transpose(1, 2), atol=0.1)
    assert torch.allclose(resp.sum(1), torch.ones(6000, dtype=torch.float64))
    with pytest.raises(ValueError, match="components must be in"):
        gaussian_mixture_em(z[:3], 4)
    # identical points give the second seed no rows of its own: that component is dropped, not kept empty
    w, mu, chol, resp = gaussian_mixture_em(z[:1].expand(50, 3), 2, seed=0)
    assert len(w) == 1 and resp.shape == (50, 1) and math.isclose(float(w[0]), 1.0)


def test_from_images_shapes_have_joint_shape_and_flux_weights():
    """Round faint and elongated bright blobs: two shapes split them, and the joint (shape, amplitude) weights
    put each shape's mass on its own flux bins; every weight sums to one."""
    g = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.arange(16.0) - 7.5, torch.arange(16.0) - 7.5, indexing="ij")
    n = 300
    width = 1.5 + 0.3 * torch.rand(n, generator=g)
    elong = torch.arange(n) % 3 == 0                                   # a third elongated
    sx = torch.where(elong, 3.0 * width, width)
    flux = torch.where(elong, 20.0, 1.0) * (1 + 0.2 * torch.rand(n, generator=g))
    img = torch.exp(-0.5 * ((xx / sx[:, None, None]) ** 2 + (yy / width[:, None, None]) ** 2))
    img = img / img.sum((-2, -1), keepdim=True) * flux[:, None, None]
    src = SourceGaussian.from_images(img, rank=8, dihedral=False, amplitudes=4, shapes=2, seed=0)
    assert src.weights.shape == (2, len(src.amplitudes))
    assert math.isclose(float(src.weights.sum()), 1.0, rel_tol=1e-12)
    assert sorted(round(float(v), 2) for v in src.weights.sum(1)) == [0.33, 0.67]
    # each shape holds one flux class: its bright-half (or faint-half) mass is ~all of it
    bright = src.amplitudes > src.amplitudes.median()
    frac_bright = src.weights[:, bright].sum(1) / src.weights.sum(1)
    assert sorted(round(float(v), 2) for v in frac_bright) == [0.0, 1.0]


def test_from_images_amplitudes_are_the_flux_histogram_and_g_keeps_the_spread_within_a_bin():
    """One blob shape times fluxes from two well-separated groups, each spread by +-5 %: the amplitudes'
    weights are the groups' shares and their values the groups' fluxes over the median to within half a
    log-bin; the images divided by their bin's centre keep the spread within each bin, so the rank-1
    component is the blob with the sd of those normalised fluxes (dividing each image by its own
    amplitude would leave no variance and allow only the bins' fluxes)."""
    side = 8
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    blob = torch.exp(-((yy - 3.5) ** 2 + (xx - 3.5) ** 2) / 4.0).double()
    blob = blob / blob.sum()
    flux = torch.cat([torch.full((30,), 1.0), torch.full((10,), 20.0)]).double() * torch.linspace(0.95, 1.05, 40,
                                                                                                   dtype=torch.float64)
    fit = SourceGaussian.from_images(flux[:, None, None] * blob, rank=1, amplitudes=4)
    assert torch.allclose(fit.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))
    half_bin = (math.log(flux.max() / flux.min()) / 4) / 2
    for a, want in zip(fit.amplitudes, (1.0, 20.0)):
        assert abs(math.log(float(a)) - math.log(want)) < half_bin + 0.06
    # g's fluxes: each image's flux divided by its bin's centre (about the median flux, spread within a bin)
    g_flux = flux / fit.amplitudes[(flux / flux.median() > 5).long()]
    assert float(g_flux.std()) > 0.02
    torch.testing.assert_close(float(fit.basis.sum(0).abs()[0]), float(g_flux.repeat(8).std()), rtol=1e-6, atol=0)
    torch.testing.assert_close(fit.mean, g_flux.mean() * blob.reshape(-1), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="flux <= 0"):
        SourceGaussian.from_images(torch.cat([flux[:, None, None] * blob, -blob[None]]), rank=1, amplitudes=4)


def test_a_non_finite_lens_has_minus_infinite_evidence(tmp_path):
    """A NaN lens parameter in a batch (whose rays fall nowhere, an empty image of finite evidence, if not
    caught) gives -inf for that lens, tempered SMC's convention, and leaves the others' evidence as it is
    alone, with one amplitude and with a mixture."""
    problem, y, meta = load_observation(write_small_observation(tmp_path / "obs.fits"), LensingConfig(geometry=GEOM))
    plain = _source(problem.d, rank=4, seed=1)
    truth = PRIOR.to_vector(LENS).double()
    bad = truth.clone()
    bad[2] = math.nan
    for source in (plain, SourceGaussian(plain.mean, plain.basis, amplitudes=torch.tensor([0.5, 2.0]),
                                         weights=torch.tensor([0.5, 0.5]))):
        ev = GaussianSourceEvidence([(problem, y, meta)], PRIOR, source, dtype=torch.float64)
        both = ev.log_likelihood(torch.stack([truth, bad]), torch.zeros(2, dtype=torch.long))
        alone = ev.log_likelihood(truth[None], torch.zeros(1, dtype=torch.long))
        assert float(both[1]) == -math.inf and float(both[0]) == float(alone[0]) and math.isfinite(float(alone[0]))


def test_the_image_basis_is_the_batched_operator(tmp_path):
    """A(theta) applied to the basis by gather + strided convolution equals LensBatchOperator's dense matrix
    (the pipeline's operator, checked against caustics elsewhere) times the basis, for two lenses."""
    problem, y, meta = load_observation(write_small_observation(tmp_path / "obs.fits"), LensingConfig(geometry=GEOM))
    source = _source(problem.d, rank=5, seed=3)
    ev = GaussianSourceEvidence([(problem, y, meta)], PRIOR, source, dtype=torch.float64)
    theta = torch.stack([PRIOR.to_vector(LENS), PRIOR.to_vector(LENS) + 0.02]).double()
    op = LensBatchOperator(image_shape=problem.image_shape, image_pixscale=meta["pixscale"],
                           source_npix=problem.source_npix, source_pixscale=meta["source_pixscale"],
                           supersample=meta["supersample"], psf=meta["psf_used"], unit_factor=meta["unit_factor"])
    A = op.bind({**ev.lenses(theta), "model": "SIE"}).dense()
    V = torch.cat([problem.scale * source.basis, problem.scale * source.mean[:, None],
                   torch.full((problem.d, 1), float(problem.offset), dtype=torch.float64)], 1)
    torch.testing.assert_close(ev.image_basis(theta, 0), A @ V, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ss", [1, 2, 3])
@pytest.mark.parametrize("psf_shape", [(5, 5), (4, 4), (3, 6)])
def test_the_strided_correlation_with_the_pixel_kernel_is_the_pool_conv_matrix(ss, psf_shape):
    """On the padded supersampled grid, a stride-ss correlation with :func:`pixel_kernel`, cropped to the image,
    equals ``pool_conv_matrix`` (the operator's K) for asymmetric PSFs, odd and even, at supersampling 1-3:
    a flipped or transposed kernel would fail."""
    import torch.nn.functional as F
    from pipeline.lensing.lens_batch import pool_conv_matrix

    rng = np.random.default_rng(sum(psf_shape) + ss)
    psf = rng.random(psf_shape) + np.linspace(0, 2, psf_shape[1])[None]
    ny, nx = 6, 7
    hy, hx = psf_shape[0] // 2, psf_shape[1] // 2
    Ny, Nx = ny * ss + 2 * hy, nx * ss + 2 * hx
    mu = rng.standard_normal((Ny, Nx))
    want = (pool_conv_matrix((ny, nx), ss, psf) @ mu.reshape(-1)).reshape(ny, nx)
    k = torch.as_tensor(pixel_kernel(psf, ss).copy())[None, None]
    got = F.conv2d(torch.as_tensor(mu)[None, None], k, stride=ss)[0, 0, :ny, :nx]
    assert math.isclose(float(k.sum()), 1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_the_source_gaussian_has_the_images_moments():
    """From draws of a known rank-3 Gaussian the full-rank fit recovers its mean and covariance (to the
    sampling error of 4,000 x 8 dihedral copies of images that are themselves dihedrally symmetric in law),
    ``explained`` is 1 at full rank and the leading 3 components hold all but the small isotropic part."""
    n, side = 4000, 6
    g = torch.Generator().manual_seed(0)
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).double() - 2.5
    r2 = coords.pow(2).sum(-1)
    profiles = torch.stack([torch.exp(-r2 / 2), torch.exp(-r2 / 8), r2 * torch.exp(-r2 / 4)]).reshape(3, -1)
    x = 1.0 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ profiles
    x = x + 0.01 * torch.randn(n, side * side, generator=g, dtype=torch.float64)
    fit = SourceGaussian.from_images(x.reshape(n, side, side), rank=side * side)
    cov = profiles.T @ profiles + 1e-4 * torch.eye(side * side, dtype=torch.float64)
    assert math.isclose(fit.explained, 1.0, rel_tol=1e-12)
    assert float((fit.mean - 1.0).abs().max()) < 0.1
    assert float((fit.covariance() - cov).abs().max()) < 0.08 * float(cov.abs().max())
    low = SourceGaussian.from_images(x.reshape(n, side, side), rank=3)
    assert 0.99 < low.explained < 1.0 and low.basis.shape == (side * side, 3)
    with pytest.raises(ValueError, match="rank must be"):
        SourceGaussian.from_images(x.reshape(n, side, side), rank=0)


@pytest.mark.slow  # ~20 s: tempered SMC over seven lens parameters
def test_tempered_smc_on_the_gaussian_source_evidence_finds_the_hidden_lens(tmp_path):
    """On the small observation (its lens hidden: only its pixels, noise and PSF are used) tempered SMC over
    all seven parameters of the lens prior, with a source Gaussian whose basis holds the true source and a
    few blurred variants, reaches beta = 1 and puts the truth inside its particles' bulk: every parameter's
    |median - truth| below 3 particle sds and the bench's calibration record readable for one observation."""
    from pipeline.bench.lens_marginal_calibration import infer_group, summarise
    from pipeline.lensing.lens_head_mvn import CorrelatedLensHead

    problem, y, meta = load_observation(write_small_observation(tmp_path / "obs.fits"), LensingConfig(geometry=GEOM))
    truth_src = torch.as_tensor(small_source(), dtype=torch.float64)
    shifted = [torch.roll(truth_src, s, dims) for s, dims in ((1, 0), (-1, 0), (1, 1), (-1, 1))]
    basis = torch.stack([truth_src] + shifted).reshape(5, -1).T / problem.scale
    ev = GaussianSourceEvidence([(problem, y, meta)], PRIOR, SourceGaussian(0 * basis[:, 0], basis))
    recs = infer_group(ev, CorrelatedLensHead(PRIOR, embed_dim=1), [0], particles=128, moves=4, samples=32, seed=0)
    assert recs[0]["beta"] == 1.0 and not recs[0]["failed"]
    theta = torch.tensor(recs[0]["samples"])
    truth = PRIOR.to_vector(LENS)
    gap = (theta.median(0).values - truth).abs() / theta.std(0)
    assert float(gap.max()) < 3, dict(zip(PRIOR.names, gap.tolist()))
    cal = summarise(recs, truth[None], PRIOR.names, seed=0)
    assert set(cal["parameters"]) == set(PRIOR.names) and len(cal["largest_abs_z_per_observation"]) == 1


def test_the_bench_names_the_sources_file_and_hdu_when_the_images_cannot_fit(tmp_path, monkeypatch):
    """A sources file whose training images include one of flux <= 0 stops the bench with one line naming
    the file and HDU (no traceback), before any observation is read."""
    from pipeline.bench import lens_marginal_calibration as bench

    bad = tmp_path / "sources.fits"
    images = np.ones((4, 8, 8), np.float32)
    images[1] = -1.0
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(images, name="TRAIN")]).writeto(bad)
    obs = tmp_path / "obs"
    obs.mkdir()
    write_small_observation(obs / "obs-0000.fits")
    with pytest.raises(SystemExit, match=rf"{bad}: HDU TRAIN: .*flux <= 0"):
        bench.main([str(tmp_path / "out.json"), "--config", "config/config.yaml", "--sources", str(bad),
                    "--obs", str(obs), "--rank", "2", "--amplitudes", "4"])
    assert not (tmp_path / "out.json").exists()
