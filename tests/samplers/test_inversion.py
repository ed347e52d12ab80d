"""``inversion``: the regularised linear inversion's evidence, posterior, hyperparameter search and registry entry."""

import math

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.lensing.operator import LensingProblem, gaussian_psf
from pipeline.problems import DenseLinearProblem, InverseProblem
from pipeline.samplers import LINEAR_ONLY, METHODS, make_sampler
from pipeline.samplers.inversion import (InversionSampler, fit_hyperparameters, gaussian_data, log_evidence,
                                         log_evidence_lam0, posterior_factor, regularisation_matrix, tridiagonal)
from tests.lensing.small_observation import GEOM, LENS, small_source

D, M = 12, 20
OFFSET = torch.linspace(-0.4, 0.6, M, dtype=torch.float64)


class AffineDense(DenseLinearProblem):
    """y = M x + b + n: a dense linear model with a constant offset (like lensing's brightness offset)."""

    def forward(self, x):
        return self.A(x) + OFFSET.to(x.dtype)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(M, D, generator=g, dtype=torch.float64) / 2
    sigma = torch.linspace(0.2, 0.6, M)
    mask = torch.ones(M, dtype=torch.bool)
    mask[[2, 7, 15]] = False
    prob = AffineDense(A, sigma, mask)
    x = torch.cumsum(0.4 * torch.randn(1, D, generator=g), 1)          # a smooth-ish 1-D source
    y = prob.simulate(x, generator=torch.Generator().manual_seed(1))[0]
    return prob, y


def dense_reference(prob, y, lam_g, lam_0, kind="gradient"):
    """Closed forms in data space (independent of the sampler's algebra): log N(y; b, A P^-1 A^T + N) and
    the Kalman-form posterior mean and covariance."""
    R, _ = regularisation_matrix((D,), kind)
    mask = prob.mask
    A = prob.M[mask]
    r = y.double()[mask] - OFFSET[mask]
    Sp = torch.linalg.inv(lam_g * R + lam_0 * torch.eye(D, dtype=torch.float64))
    S = A @ Sp @ A.T + torch.diag(prob.sigma.double()[mask] ** 2)
    sign, logdet = np.linalg.slogdet(S.numpy())
    logz = -0.5 * float(r @ torch.linalg.solve(S, r)) - 0.5 * logdet - 0.5 * r.numel() * math.log(2 * math.pi)
    gain = Sp @ A.T @ torch.linalg.inv(S)
    return logz, gain @ r, Sp - gain @ A @ Sp


LAMBDAS = [(0.3, 0.05), (5.0, 1e-3), (0.01, 2.0), (100.0, 0.5)]


@pytest.mark.parametrize("kind", ["gradient", "curvature"])
def test_log_evidence_matches_the_dense_marginal_likelihood(small, kind):
    prob, y = small
    data = gaussian_data(prob, y)
    R, r_eig = regularisation_matrix((D,), kind)
    for lam_g, lam_0 in LAMBDAS:
        ref = dense_reference(prob, y, lam_g, lam_0, kind)[0]
        assert log_evidence(data, R, lam_g, lam_0) == pytest.approx(ref, rel=1e-6)
        scan = log_evidence_lam0(data, r_eig, lam_g, tridiagonal(data, R, lam_g),
                                 torch.tensor([lam_0, 2 * lam_0], dtype=torch.float64))
        assert float(scan[0]) == pytest.approx(ref, rel=1e-6)
        assert float(scan[1]) == pytest.approx(dense_reference(prob, y, lam_g, 2 * lam_0, kind)[0], rel=1e-6)


def test_regularisation_is_the_sum_of_squared_differences():
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad = ((x[:, 1:] - x[:, :-1]) ** 2).sum() + ((x[1:] - x[:-1]) ** 2).sum()
    curv = ((x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]) ** 2).sum() + ((x[2:] - 2 * x[1:-1] + x[:-2]) ** 2).sum()
    for kind, ref in (("gradient", grad), ("curvature", curv)):
        R, r_eig = regularisation_matrix((3, 4), kind)
        v = x.reshape(-1)
        assert float(v @ R @ v) == pytest.approx(float(ref), rel=1e-12)
        assert torch.allclose(r_eig, torch.linalg.eigvalsh(R).clamp_min(0), atol=1e-12)
    with pytest.raises(PipelineError, match="regularisation 'laplace'"):
        regularisation_matrix((3, 4), "laplace")


def test_posterior_mean_and_covariance_match_the_closed_form(small):
    prob, y = small
    data = gaussian_data(prob, y)
    R, _ = regularisation_matrix((D,), "gradient")
    _, mu_ref, cov_ref = dense_reference(prob, y, 0.7, 0.02)
    mu, L = posterior_factor(data, R, 0.7, 0.02)
    assert torch.allclose(mu, mu_ref, rtol=0, atol=1e-8 * float(mu_ref.abs().max()))
    cov = torch.cholesky_inverse(L)
    assert torch.allclose(cov, cov_ref, rtol=0, atol=1e-8 * float(cov_ref.abs().max()))


def test_samples_are_draws_from_the_posterior_at_the_fitted_hyperparameters(small):
    prob, y = small
    s = make_sampler("inversion", None, None)
    n = 20000
    out = s.sample(prob, y, n, generator=torch.Generator().manual_seed(2))
    fit = out.info["fits"][0]
    _, mu, cov = dense_reference(prob, y, fit["lam_g"], fit["lam_0"])
    x = out.x0.double()
    # Monte Carlo errors: mean se_i = sqrt(C_ii / n); covariance se_ij = sqrt((C_ii C_jj + C_ij^2) / n); 5 se
    se_mu = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mu).abs() < 5 * se_mu).all()
    var = torch.diagonal(cov)
    se_cov = ((var[:, None] * var[None] + cov ** 2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 5 * se_cov).all()
    assert out.x0.dtype == torch.float32 and out.nfe == 0
    assert out.log_q_traj is None and out.log_p_traj is None and out.log_w is None
    assert out.log_r.dtype == torch.float64 and torch.allclose(out.log_r, prob.log_likelihood(out.x0, y))
    again = s.sample(prob, y, n, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.x0, again.x0)


def test_hyperparameter_search_finds_the_evidence_maximum_and_marginalises(small):
    prob, y = small
    data = gaussian_data(prob, y)
    R, r_eig = regularisation_matrix((D,), "gradient")
    lam_g_range, lam_0_range = (-4.0, 4.0), (-5.0, 3.0)
    fit = fit_hyperparameters(data, R, r_eig, lam_g_range, lam_0_range)
    assert fit.bound is None
    assert fit.type2 == pytest.approx(log_evidence(data, R, fit.lam_g, fit.lam_0), abs=1e-8)
    # a grid 4x finer than the search's finest lam_g step (0.1875 dex) around the maximum finds nothing higher
    lg, l0 = math.log10(fit.lam_g), math.log10(fit.lam_0)
    finer = [log_evidence(data, R, 10 ** (lg + a), 10 ** (l0 + b))
             for a in np.linspace(-0.4, 0.4, 17) for b in np.linspace(-0.1, 0.1, 21)]
    assert max(finer) <= fit.type2 + 1e-3
    # the marginal against a brute-force trapezoid integral on a uniform 0.05 x 0.02 dex grid over the hyperprior
    lgs = torch.linspace(*lam_g_range, 161, dtype=torch.float64)
    l0s = torch.linspace(*lam_0_range, 401, dtype=torch.float64)
    grid = torch.stack([log_evidence_lam0(data, r_eig, float(10 ** v), tridiagonal(data, R, float(10 ** v)),
                                          10 ** l0s) for v in lgs])
    top = float(grid.max())
    volume = (lam_g_range[1] - lam_g_range[0]) * (lam_0_range[1] - lam_0_range[0])
    brute = math.log(float(torch.trapezoid(torch.trapezoid(torch.exp(grid - top), l0s, dim=1), lgs))) + top \
        - math.log(volume)
    assert fit.marginal == pytest.approx(brute, abs=0.05)
    assert fit.marginal <= fit.type2
    assert fit.type2 >= float(grid.max()) - 1e-9


def test_a_maximum_on_a_bound_is_reported(small, caplog):
    prob, y = small
    s = InversionSampler(lam_0_range=(1.0, 3.0))     # lam_0 >= 10 is far stronger than this posterior wants
    out = s.sample(prob, y, 4, generator=torch.Generator().manual_seed(0))
    assert out.info["fits"][0]["bound"] == "lam_0 at its lower bound 1e1"
    assert "lam_0 at its lower bound" in caplog.text


def test_registry_entry_and_options(small):
    prob, y = small
    assert "inversion" in METHODS and "inversion" in LINEAR_ONLY
    s = make_sampler("inversion", None, None, regularisation="curvature", device="cpu")
    out = s.sample(prob, y, 8, generator=torch.Generator().manual_seed(0))
    rec = out.info["logz"]
    assert rec["elbo"] == rec["iw"] == out.info["fits"][0]["marginal"] and rec["elbo_se"] == 0.0
    assert rec["type2"] >= rec["elbo"]
    hdr = out.info["header"]
    assert set(hdr) == {"REGFORM", "REGLAMG", "REGLAM0", "LOGZT2", "LOGZMARG"} and hdr["REGFORM"][0] == "curvature"
    assert all(len(k) <= 8 and isinstance(c, str) for k, (_, c) in hdr.items())
    with pytest.raises(PipelineError, match="unknown option.*particles"):
        make_sampler("inversion", None, None, particles=3)
    with pytest.raises(PipelineError, match="regularisation 'tv'"):
        make_sampler("inversion", None, None, regularisation="tv")
    with pytest.raises(PipelineError, match="lam_g_range"):
        make_sampler("inversion", None, None, lam_g_range=(2.0, 1.0))

    class Nonlinear(InverseProblem):
        x_shape, y_shape = (2,), (1,)

    with pytest.raises(PipelineError, match="needs a linear inverse problem"):
        s.sample(Nonlinear(torch.ones(1)), torch.zeros(1), 4)


def test_each_observation_of_a_batch_gets_its_own_fit(small):
    prob, y = small
    y2 = y + 1.5 * torch.linspace(-1, 1, M)
    s = make_sampler("inversion", None, None)
    gen = torch.Generator().manual_seed(4)
    both = s.sample(prob, torch.stack([y, y2, y, y2]), 4, generator=gen)
    one = s.sample(prob, y.expand(4, M), 4, generator=torch.Generator().manual_seed(4))
    two = s.sample(prob, y2.expand(4, M), 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(both.x0[[0, 2]], one.x0[[0, 2]]) and torch.equal(both.x0[[1, 3]], two.x0[[1, 3]])
    assert both.info["logz"] is None and len(both.info["fits"]) == 2 and both.info["logz_note"]


def test_lensing_problem_end_to_end():
    # the small lensing geometry (16x16 image and source, PSF, supersampling), an affine brightness map
    # (x_phys = 100 x + 5), non-uniform noise and a masked corner
    n_img = GEOM.image_npix
    sigma = torch.linspace(0.08, 0.12, n_img * n_img).reshape(n_img, n_img)
    mask = torch.ones(n_img, n_img, dtype=torch.bool)
    mask[:3, :3] = False
    prob = LensingProblem.from_lens(LENS, image_shape=(n_img, n_img), image_pixscale=GEOM.image_pixscale,
                                    source_npix=GEOM.source_npix, source_pixscale=GEOM.source_pixscale,
                                    supersample=GEOM.supersample,
                                    psf=gaussian_psf(0.1, GEOM.image_pixscale / GEOM.supersample, 7),
                                    sigma=sigma, mask=mask, scale=100.0, offset=5.0)
    truth = (torch.as_tensor(small_source()) - 5.0) / 100.0
    y = prob.simulate(truth[None, None], generator=torch.Generator().manual_seed(3))[0]
    out = make_sampler("inversion", None, None).sample(prob, y, 32, generator=torch.Generator().manual_seed(0))
    assert out.x0.shape == (32, 1, 16, 16) and torch.isfinite(out.x0).all()
    assert torch.allclose(out.log_r, prob.log_likelihood(out.x0, y))
    chi2_nu = prob.residual_chi2(out.x0, y) / prob.n_data
    assert 0.5 < float(chi2_nu.median()) < 2.0, chi2_nu.median()
    fit = out.info["fits"][0]
    data = gaussian_data(prob, y)
    R, _ = regularisation_matrix((16, 16), "gradient")
    assert fit["type2"] == pytest.approx(log_evidence(data, R, fit["lam_g"], fit["lam_0"]), abs=1e-6)
    assert fit["marginal"] < fit["type2"]
    # the posterior mean recovers the source where the lens images it: correlation with the truth
    seen = data.F.diagonal() > 1.0
    mean = out.x0.double().mean(0).reshape(-1)
    corr = np.corrcoef(mean[seen].numpy(), truth.reshape(-1)[seen].double().numpy())[0, 1]
    assert corr > 0.9, corr
