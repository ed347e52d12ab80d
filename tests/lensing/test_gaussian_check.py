"""The closed-form lensing check: GP prior eps, chain-prior reference, RTB against it."""

import json
import math

import pytest
import torch

from pipeline.diffusion.chain_config import timestep_grid
from pipeline.diffusion.gaussian_chain import propagate_gaussian_chain
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import sample_prior
from pipeline.lensing import gaussian_check as gc
from pipeline.lensing.gp_prior import GaussianProcessPrior, se_covariance

TINY = dict(source_npix=4, source_pixscale=0.3, image_npix=6, image_pixscale=0.3, supersample=1, psf_fwhm=0.3,
            psf_npix=5, length_scale=0.4)


def _tiny_prior(npix=4, pixscale=0.3, ell=0.4):
    return GaussianProcessPrior(se_covariance(npix, pixscale, ell, 1.0))


def test_se_covariance_is_stationary_and_scaled():
    S = se_covariance(5, 0.1, 0.2, 2.0, jitter=0.0)
    assert torch.allclose(torch.diagonal(S), torch.full((25,), 4.0, dtype=torch.float64))
    # neighbours one pixel apart along rows and columns: amp^2 exp(-0.1^2 / (2 * 0.2^2))
    want = 4.0 * math.exp(-0.5 * 0.25)
    assert abs(float(S[0, 1]) - want) < 1e-12 and abs(float(S[0, 5]) - want) < 1e-12
    assert abs(float(S[6, 7]) - want) < 1e-12


def test_gp_eps_matches_finite_differences_of_noised_log_density():
    prior = _tiny_prior()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    for t in (0, 10, 300, 999):
        ab = float(prior.schedule.alpha_bar[t])
        eps = prior.eps(x, t)
        h = 1e-5
        fd = torch.zeros_like(x)
        for i in range(16):
            e = torch.zeros(16, dtype=torch.float64)
            e[i] = h
            fd[:, i] = (prior.log_prob_noised(x + e, t) - prior.log_prob_noised(x - e, t)) / (2 * h)
        # eps = -sqrt(1 - abar) grad log p_t
        torch.testing.assert_close(eps, -math.sqrt(1 - ab) * fd, rtol=1e-6, atol=1e-6)


def test_gp_eps_and_density_match_the_one_component_mixture():
    prior = _tiny_prior()
    gmm = GaussianMixturePrior([1.0], prior.mean[None], prior.cov[None])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 50, 500, 999])
    torch.testing.assert_close(prior.eps(x, t), gmm.eps(x, t), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(prior.log_prob_noised(x, t), gmm.log_prob_noised(x, t), rtol=1e-10, atol=1e-8)
    # float32 in, float32 out (the chain runs in float32)
    assert prior.eps(x.float(), 5).dtype == torch.float32


def test_gp_prior_rejects_bad_covariance():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianProcessPrior(-torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(d, d\)"):
        GaussianProcessPrior(torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_chain_marginal_matches_monte_carlo(spacing):
    prior = _tiny_prior()
    chain = prior.schedule.chain(10, "small", timesteps=timestep_grid(prior.schedule.T, 10, spacing))
    law = propagate_gaussian_chain(chain, prior.mean, prior.cov)
    n = 20000
    x = sample_prior(prior, chain, n, generator=torch.Generator().manual_seed(2), batch_size=5000).double()
    sd = torch.diagonal(law["x0_cov"]).sqrt()
    # mean: 5 standard errors; covariance entries: 0.05 absolute (var ~ 0.5, se ~ 0.01)
    assert ((x.mean(0) - law["x0_mean"]).abs() / sd).max() < 5 / math.sqrt(n)
    assert (torch.cov(x.T) - law["x0_cov"]).abs().max() < 0.05
    # and the uniform chain is NOT the analytic prior: its std is clearly different at K = 10 (t_1 = 100)
    if spacing == "uniform":
        assert (sd / torch.diagonal(prior.cov).sqrt()).median() < 0.95


def test_setup_spacing_sets_the_chain_and_its_reference():
    """``CheckSetup.spacing`` builds the chain on that grid, and the exact reference is the one of that chain."""
    ref = {}
    for spacing in ("uniform", "quadratic"):
        p = gc._problem_and_reference(gc.CheckSetup(**TINY, snr=0.5, K=10, spacing=spacing), seed=0)
        assert p["chain"].t.tolist() == timestep_grid(p["prior"].schedule.T, 10, spacing)
        law = propagate_gaussian_chain(p["chain"], p["prior"].mean, p["prior"].cov)
        torch.testing.assert_close(p["ref"]["chain_prior_cov"], law["x0_cov"])
        ref[spacing] = law["x0_cov"]
    assert (ref["uniform"] - ref["quadratic"]).abs().max() > 0.02  # 0.032: the grid changes the law


def test_reference_posterior_matches_importance_weighted_chain_samples():
    setup = gc.CheckSetup(**TINY, snr=0.5, K=10)
    prior = GaussianProcessPrior(se_covariance(4, 0.3, 0.4, 1.0))
    chain = prior.schedule.chain(setup.K, setup.variance)
    problem, sigma = gc.build_problem(setup, prior, seed=0)
    assert sigma > 0 and problem.d == 16
    g = torch.Generator().manual_seed(3)
    x_true = sample_prior(prior, chain, 1, generator=g)
    y = problem.simulate(x_true, generator=g)[0]
    ref = gc.reference_posteriors(prior, chain, problem, y, setup.variance)
    n = 100000
    x = sample_prior(prior, chain, n, generator=torch.Generator().manual_seed(4), batch_size=10000)
    logw = problem.log_likelihood(x, y.expand(n, *y.shape))
    w = torch.softmax(logw, 0)
    ess = float(1.0 / (w ** 2).sum())
    assert ess > 2000, ess  # the check below is only meaningful with a usable ESS
    xd = x.double()
    m_is = (w[:, None] * xd).sum(0)
    v_is = (w[:, None] * (xd - m_is) ** 2).sum(0)
    sd = torch.diagonal(ref["cov"]).sqrt()
    # IS errors ~ 1/sqrt(ESS) posterior sds; 6 of them as the bound
    assert ((m_is - ref["mean"]).abs() / sd).max() < 6 / math.sqrt(ess)
    assert ((v_is.sqrt() / sd) - 1).abs().max() < 0.1
    # the posterior is informative and the chain posterior differs from the analytic-prior one
    assert (sd / torch.diagonal(ref["chain_prior_cov"]).sqrt()).median() < 0.9
    assert not torch.allclose(ref["mean"], ref["analytic_mean"], atol=1e-3)


def test_compare_and_criterion_on_exact_and_wrong_samples():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    cov = A @ A.T / 30 + 0.1 * torch.eye(30, dtype=torch.float64)
    mean = torch.randn(30, generator=g, dtype=torch.float64)
    exact = gc.compare(gc.exact_draws(mean, cov, 20000, g), mean, cov)
    assert gc.passes_accuracy_criterion(exact)
    assert 0.97 < exact["std_ratio_p10"] <= exact["std_ratio_p90"] < 1.03 and exact["w2"] < 0.3
    wide = gc.compare(gc.exact_draws(mean, 1.5 ** 2 * cov, 20000, g), mean, cov)
    assert not gc.passes_accuracy_criterion(wide) and wide["std_ratio_p50"] > 1.4
    sd = torch.diagonal(cov).sqrt()
    shifted = gc.compare(gc.exact_draws(mean + 0.3 * sd, cov, 20000, g), mean, cov)
    assert not gc.passes_accuracy_criterion(shifted) and shifted["frac_mean_err_le_0.1"] < 0.1


@pytest.mark.slow
def test_reduced_rtb_check_end_to_end(tmp_path):
    """A 6x6 source (d = 36), K = 10, 1500 RTB steps, N = 1000 (~45 s). Measured at seed 0 (guidance scale
    0.5 from the untrained-ELBO tuning, learned per-step gain): RTB's mean error <= 0.1 sd in 100 % of
    pixels, std ratio p10 / p90 1.03 / 1.16, W2 0.27 (MC floor 0.14; best baseline 0.85). Tolerances: the
    accuracy criterion on the mean, std ratio in [0.85, 1.2] (at N = 1000 on 36 pixels the floor's own p10 is
    0.96), W2 below every baseline's and below 3x the floor."""
    setup = gc.CheckSetup(source_npix=6, source_pixscale=0.2, image_npix=8, image_pixscale=0.25, supersample=1,
                          psf_fwhm=0.3, psf_npix=5, length_scale=0.3, K=10)
    res = gc.run_gaussian_check(tmp_path, steps=1500, n_samples=1000, seed=0, setup=setup, particles=(1, 5))
    on_disk = json.loads((tmp_path / "gaussian_check.json").read_text())
    assert on_disk["methods"].keys() == res["methods"].keys() == {"rtb", "fps_smc_M1", "fps_smc_M5", "dps", "dps_cla"}
    floor = res["mc_floor"]
    assert gc.passes_accuracy_criterion(floor)
    rtb = res["methods"]["rtb"]
    assert not rtb["diverged"] and rtb["guidance"] == "dps_cla"
    assert rtb["frac_mean_err_le_0.1"] >= 0.9
    assert 0.85 <= rtb["std_ratio_p10"] and rtb["std_ratio_p90"] <= 1.2
    assert rtb["w2"] < 3 * floor["w2"]
    assert all(rtb["w2"] < v["w2"] for k, v in res["methods"].items() if k != "rtb")
