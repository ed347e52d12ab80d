"""Closed-form samplers on the real (sparse, affine, masked) lensing operator at a small size."""

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.lensing.operator import LensingProblem, LensParams, gaussian_psf
from pipeline.samplers import make_sampler
from pipeline.samplers.exact_guidance import ExactGuidance, analytic_posterior
from pipeline.samplers.fps import conditional_moments_v
from pipeline.samplers.guidance import cla_score, linear_algebra_for

N, PIX, SS, NS = 12, 0.1, 2, 10
LENS = LensParams(x0=0.02, y0=-0.01, q=0.7, phi=0.5, rein=0.4, g1=0.03, g2=-0.02)


@pytest.fixture(scope="module")
def lensing():
    sigma = torch.linspace(0.05, 0.1, N * N).reshape(N, N)
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[0, :4] = False
    prob = LensingProblem.from_lens(LENS, image_shape=(N, N), image_pixscale=PIX, source_npix=NS,
                                    source_pixscale=0.08, supersample=SS, psf=gaussian_psf(0.12, PIX / SS, 5),
                                    sigma=sigma, mask=mask, scale=1.7, offset=0.3, x_shape=(NS * NS,))
    d = NS * NS
    prior = GaussianMixturePrior([0.4, 0.6], torch.stack([torch.full((d,), -0.5), torch.full((d,), 0.5)]), 0.3)
    x = prior.sample(1, torch.Generator().manual_seed(0)).float()
    y = prob.simulate(x, generator=torch.Generator().manual_seed(1))[0]
    return prob, prior, y


def test_exact_guidance_on_lensing_operator(lensing):
    prob, prior, y = lensing
    chain = prior.schedule.chain(20)
    post, log_z = analytic_posterior(prior, prob, y)
    eg = ExactGuidance(prior, chain, prob)
    x = torch.randn(3, NS * NS, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for k in (2, 10, 20):
        t = int(chain.t[k])
        ref = post.score(x, t) - prior.score(x, t)
        assert torch.allclose(eg.score(x, y, k), ref, atol=1e-7 * (1 + float(ref.abs().max())))


def test_cla_and_fps_use_the_affine_offset_and_mask(lensing):
    prob, prior, y = lensing
    chain = prior.schedule.chain(20)
    A = prob.dense_matrix()[prob.mask.reshape(-1)]
    Sig = torch.diag(prob.sigma.double().reshape(-1)[prob.mask.reshape(-1)] ** 2)
    ylin = (y.double() - prob.offset_image.double()).reshape(-1)[prob.mask.reshape(-1)]
    x = 0.3 * torch.randn(2, NS * NS, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k = 7
    ab = float(chain.abar[k])
    C = ab * Sig + (1 - ab) * A @ A.T
    ref = torch.linalg.solve(C, (ab ** 0.5 * ylin - x @ A.T).T).T @ A
    assert torch.allclose(cla_score(chain, prob, y, x, k), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    alg = linear_algebra_for(prob)
    yU, _ = alg.project_y(y)
    v, beta = 0.2, 0.5
    c_mean, c_var, perp = conditional_moments_v(alg, x, v, yU.expand(2, -1), beta)
    prec = torch.eye(NS * NS, dtype=torch.float64) / v + A.T @ torch.linalg.solve(Sig, A) / beta
    mu_ref = torch.linalg.solve(prec, (x / v + (A.T @ torch.linalg.solve(Sig, ylin)) / beta).T).T
    assert torch.allclose(c_mean @ alg.V.T + perp, mu_ref, atol=1e-8)


@pytest.mark.parametrize("name", ["cla", "dps", "dps_cla", "exact_guidance", "fps", "fps_smc", "prior_is"])
def test_samplers_run_on_lensing(lensing, name):
    prob, prior, y = lensing
    chain = prior.schedule.chain(8)
    opts = {"dps": {"scale": 0.05}, "fps_smc": {"particles": 3}, "prior_is": {"particles": 3}}.get(name, {})
    out = make_sampler(name, prior, chain, **opts).sample(prob, y, 6, generator=torch.Generator().manual_seed(0))
    assert out.x0.shape == (6, NS * NS) and torch.isfinite(out.x0).all() and torch.isfinite(out.log_r).all()


def test_default_config_samples_fps_smc_in_runs_mode_with_its_own_particle_key(tmp_path):
    # the shipped demo config and the dataclass default: independent runs, particles from
    # posterior.fps_smc_particles (not posterior.particles, which prior_is / rtb_amortized_is read)
    from pathlib import Path

    from pipeline.config import load_section
    from pipeline.errors import ConfigError
    from pipeline.lensing.config import PosteriorConfig
    from pipeline.lensing.sample import fps_smc_options

    root = Path(__file__).resolve().parents[2]
    pcfg = load_section(root / "config" / "config.yaml", "posterior", PosteriorConfig)
    assert pcfg.fps_smc_mode == PosteriorConfig().fps_smc_mode == "runs"
    assert fps_smc_options(pcfg, 32) == {"particles": pcfg.fps_smc_particles, "mode": "runs",
                                         "batch_size": pcfg.batch_size}
    assert pcfg.fps_smc_particles == 2 and pcfg.particles == 8
    cfg = tmp_path / "c.yaml"
    cfg.write_text("posterior: {particles: 5, fps_smc_particles: 3}\n")
    assert fps_smc_options(load_section(cfg, "posterior", PosteriorConfig), 32)["particles"] == 3
    # the shared-particle mode still works from its key: one run of n particles
    cfg.write_text("posterior: {particles: 5, fps_smc_mode: weighted}\n")
    assert fps_smc_options(load_section(cfg, "posterior", PosteriorConfig), 32) == {"particles": 32,
                                                                                    "mode": "weighted"}
    for bad, field in (("fps_smc_mode: shared", "posterior.fps_smc_mode"),
                       ("fps_smc_particles: 0", "posterior.fps_smc_particles")):
        cfg.write_text(f"posterior: {{{bad}}}\n")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            load_section(cfg, "posterior", PosteriorConfig)
        assert str(cfg) in str(err.value) and "\n" not in str(err.value)
