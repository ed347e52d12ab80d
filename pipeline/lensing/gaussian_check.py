"""The closed-form lensing check: a Gaussian-process source prior, the exact posterior under the CHAIN
prior, and RTB / FPS-SMC / DPS / DPS+CLA measured against it.

Prior: a stationary zero-mean Gaussian process on the source grid (network units) with the exact
noised eps (:class:`pipeline.lensing.gp_prior.GaussianProcessPrior`).

Reference: the K-step chain built from that exact eps is linear-Gaussian, so its x0 = f(x_1) is
N(m0, S0) exactly (:func:`pipeline.diffusion.gaussian_chain.propagate_gaussian_chain`), and the RTB
target's x0 marginal is the posterior of that Gaussian under the linear lens likelihood,
N(mu, Sigma) (:func:`~pipeline.diffusion.gaussian_chain.gaussian_linear_posterior`). The posterior under
the analytic GP prior is reported beside it for context.

Metrics per method (N samples): ``mean_err`` = |mean_N - mu| / sqrt(diag Sigma) per pixel (fraction of
pixels <= 0.1 and its 90th percentile), ``std_ratio`` = sqrt(var_N / diag Sigma) (10th / 50th / 90th
percentiles), and the Gaussian W2 between the sample moments and N(mu, Sigma). The Monte-Carlo floor of
the same metrics is measured with N exact draws of N(mu, Sigma). The accuracy criterion for RTB:
fraction(mean_err <= 0.1) >= 0.9 and std_ratio p10, p90 in [0.9, 1.1].

Geometry (small so it is affordable on CPU): source 16x16 at 0.1"/px, image 16x16 at 0.2"/px,
supersampling 2, PSF FWHM 0.3"; one SIE+shear lens drawn from the default ranges. Noise sigma (SCI
units, flux per pixel) = RMS of the noiseless image over prior draws / ``snr`` (fixed before y is drawn,
independent of the truth). Run: ``python -m pipeline.lensing.gaussian_check --out DIR``.

RTB here: single observation, K = 20 small-variance chain, vector prior (d = 256) with the MLP correction
(features x0hat and grad, learned per-coordinate step variance), VarGrad log Z (a scalar log Z moves
~lr_logz per step and starts hundreds of nats off at this SNR), and DPS+CLA guidance from the frozen prior
inside the parameterisation. Its scale is the best untrained-posterior ELBO over a grid on 4 observations
from a separate seed (:func:`pipeline.rtb.tuning.tune_guidance_scale`), and a **per-step gain on that
guidance is learned** (``learn_guidance_gain``, one scalar per chain step, its own step size
``lr_per_step``). The measured results, and why the gain is learned, are on the experiments page
(docs/results/experiments.md, "Closed-form Gaussian check").
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.diffusion.chain_config import timestep_grid
from pipeline.diffusion.gaussian_chain import gaussian_linear_posterior, gaussian_w2, propagate_gaussian_chain
from pipeline.diffusion.sampling import sample_prior
from pipeline.io.atomic import write_json
from pipeline.lensing.config import GeometryConfig, LensConfig
from pipeline.lensing.gp_prior import GaussianProcessPrior, se_covariance
from pipeline.lensing.operator import LensingProblem
from pipeline.lensing.simulate import default_psf, draw_lens
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.posterior import make_posterior
from pipeline.rtb.sampler import RTBSampler
from pipeline.rtb.trainer import RTBTrainer
from pipeline.rtb.tuning import tune_guidance_scale
from pipeline.runtime import configure_threads
from pipeline.samplers import make_sampler
from pipeline.samplers.tuning import tune_on_separate_seed

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# the problem and the references
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckSetup:
    """Fixed settings of the check (all documented in the module docstring)."""

    source_npix: int = 16
    source_pixscale: float = 0.1     # arcsec / px
    image_npix: int = 16
    image_pixscale: float = 0.2      # arcsec / px
    supersample: int = 2
    psf_fwhm: float = 0.3            # arcsec
    psf_npix: int = 7
    length_scale: float = 0.2        # arcsec (2 source pixels)
    amplitude: float = 1.0           # prior marginal std, network units
    jitter: float = 1e-6
    snr: float = 2.0                 # noise sigma = RMS(noiseless image over prior draws) / snr
    K: int = 20
    variance: str = "small"
    spacing: str = "uniform"         # the chain's timestep grid: uniform or quadratic (pipeline.diffusion.chain_config)
    lens_seed: int = 0


def build_problem(setup: CheckSetup, prior: GaussianProcessPrior, seed: int):
    """(problem, sigma): a LensingProblem with vector sources (d,), lens drawn from the default ranges
    with ``setup.lens_seed``; sigma from prior draws (generator ``seed + 7``), never from the truth."""
    geo = GeometryConfig(image_npix=setup.image_npix, image_pixscale=setup.image_pixscale,
                         source_npix=setup.source_npix, source_pixscale=setup.source_pixscale,
                         supersample=setup.supersample, psf_fwhm=setup.psf_fwhm, psf_npix=setup.psf_npix)
    lens = draw_lens(LensConfig(), np.random.default_rng(setup.lens_seed))
    psf, _ = default_psf(geo)
    n = setup.image_npix
    common = dict(image_shape=(n, n), image_pixscale=geo.image_pixscale, source_npix=geo.source_npix,
                  source_pixscale=geo.source_pixscale, supersample=geo.supersample, psf=psf,
                  unit_factor=geo.image_pixscale ** 2, x_shape=(geo.source_npix ** 2,))
    probe = LensingProblem.from_lens(lens, sigma=torch.ones(n, n), **common)
    g = torch.Generator().manual_seed(seed + 7)
    img = probe.forward(prior.sample(256, generator=g).float())
    sigma = float(img.pow(2).mean().sqrt()) / setup.snr
    problem = LensingProblem(probe.M.to_sparse_coo(), torch.full((n, n), sigma), image_shape=(n, n),
                             source_npix=geo.source_npix, x_shape=(geo.source_npix ** 2,), meta=probe.meta)
    return problem, sigma


def reference_posteriors(prior: GaussianProcessPrior, chain, problem, y, variance=None) -> dict:
    """Exact posteriors of x0 given y (float64): under the chain prior (the RTB target) and under the
    analytic GP prior (context). Masked pixels carry no information and are dropped."""
    A = problem.dense_matrix()
    keep = problem.mask.reshape(-1) > 0
    A = A[keep]
    yv = torch.as_tensor(y, dtype=torch.float64).reshape(-1)[keep] - problem.offset_image.double().reshape(-1)[keep]
    noise = (problem.sigma.double().reshape(-1)[keep]) ** 2
    law = propagate_gaussian_chain(chain, prior.mean, prior.cov, variance=variance)
    mu, Sig, logz = gaussian_linear_posterior(law["x0_mean"], law["x0_cov"], A, noise, yv)
    mu_a, Sig_a, logz_a = gaussian_linear_posterior(prior.mean, prior.cov, A, noise, yv)
    return {"chain_prior_mean": law["x0_mean"], "chain_prior_cov": law["x0_cov"],
            "mean": mu, "cov": Sig, "log_z": logz, "analytic_mean": mu_a, "analytic_cov": Sig_a,
            "analytic_log_z": logz_a}


def compare(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> dict:
    """Per-pixel moment errors of samples x (N, d) against N(mean, cov) (see module docstring)."""
    x = x.double().reshape(x.shape[0], -1).cpu()
    sd = torch.diagonal(cov).clamp_min(1e-300).sqrt()
    m_n = x.mean(0)
    err = ((m_n - mean).abs() / sd)
    ratio = (x.var(0, unbiased=True).sqrt() / sd)
    emp_cov = torch.cov(x.T) if x.shape[0] > 1 else torch.zeros_like(cov)
    q = lambda v, p: float(torch.quantile(v, p))  # noqa: E731
    return {"n": int(x.shape[0]), "frac_mean_err_le_0.1": float((err <= 0.1).double().mean()),
            "mean_err_p50": q(err, 0.5), "mean_err_p90": q(err, 0.9), "mean_err_max": float(err.max()),
            "std_ratio_p10": q(ratio, 0.1), "std_ratio_p50": q(ratio, 0.5), "std_ratio_p90": q(ratio, 0.9),
            "w2": gaussian_w2(m_n, emp_cov, mean, cov)}


def passes_accuracy_criterion(m: dict) -> bool:
    """The bar for RTB: mean error <= 0.1 sd in >= 90 % of pixels, std ratio p10 and p90 in [0.9, 1.1]."""
    return (m["frac_mean_err_le_0.1"] >= 0.9 and 0.9 <= m["std_ratio_p10"] and m["std_ratio_p90"] <= 1.1)


def exact_draws(mean, cov, n, generator=None) -> torch.Tensor:
    """n exact draws (n, d) float64 of N(mean, cov) (eigendecomposition: cov may be singular)."""
    w, V = torch.linalg.eigh(0.5 * (cov + cov.T))
    z = torch.randn(n, mean.shape[0], generator=generator, dtype=torch.float64)
    return mean + (z * w.clamp_min(0).sqrt()) @ V.T


# ----------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------
def rtb_config(steps: int, seed: int, **over) -> RTBConfig:
    """RTB settings of the check (``over`` replaces any of them, by field name)."""
    # learn_guidance_gain: the per-step gain on the guidance is what lets training set the spread
    # (experiments page, "Closed-form Gaussian check")
    kw = dict(features=["x0hat", "grad"], learn_variance=True, learn_guidance_gain=True, head_hidden=256,
              head_layers=2, steps=steps, batch_size=64, lr=1e-3, lr_logz=0.1, lr_final_frac=0.05,
              replay_rate=0.0, prior_rate=0.05, tempered_rate=0.05, seed=seed,
              log_every=50, checkpoint_every=10 ** 6, eval_samples=1000)
    kw.update(over)
    return RTBConfig().with_fields(**kw)


def train_rtb(prior, chain, problem, y, *, steps: int, seed: int, metrics_path=None, **over):
    """Single-observation RTB on ``chain`` against the GP prior; returns (posterior, trainer summary, seconds)."""
    torch.manual_seed(seed)
    cfg = rtb_config(steps, seed, **over)
    post = make_posterior(prior, chain, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y, metrics_path=metrics_path)
    t0 = time.time()
    summary = trainer.train()
    return post, summary, time.time() - t0


def rtb_samples(post, problem, y, n: int, seed: int) -> torch.Tensor:
    """n samples x0 (n, d) of the trained posterior at y, drawn with ``seed``."""
    out = RTBSampler(post, batch_size=1024).sample(problem, y, n, generator=torch.Generator().manual_seed(seed))
    return out.x0


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=2)


def _problem_and_reference(setup: CheckSetup, seed: int) -> dict:
    """The GP prior, its chain, the lensing problem, the observation y drawn with ``seed`` (truth from
    the chain prior) and the exact reference posteriors."""
    cov = se_covariance(setup.source_npix, setup.source_pixscale, setup.length_scale, setup.amplitude, setup.jitter)
    prior = GaussianProcessPrior(cov)
    chain = prior.schedule.chain(setup.K, setup.variance,
                                 timesteps=timestep_grid(prior.schedule.T, setup.K, setup.spacing))
    problem, sigma = build_problem(setup, prior, seed)
    g = torch.Generator().manual_seed(seed)
    x_true = sample_prior(prior, chain, 1, generator=g)
    y = problem.simulate(x_true, generator=g)[0]
    ref = reference_posteriors(prior, chain, problem, y, setup.variance)
    return {"prior": prior, "chain": chain, "problem": problem, "sigma": sigma, "y": y, "ref": ref}


def _reference_record(setup: CheckSetup, seed: int, n_samples: int, p: dict) -> dict:
    """The result dict before any method: setup, reference log Z (nats) and spreads, Monte-Carlo floor."""
    ref, prior, problem = p["ref"], p["prior"], p["problem"]
    mu, Sig = ref["mean"], ref["cov"]
    gd = torch.Generator().manual_seed(seed + 2)
    floor = compare(exact_draws(mu, Sig, n_samples, gd), mu, Sig)
    return {"setup": asdict(setup), "seed": seed, "n_samples": n_samples, "sigma": p["sigma"],
            "lens": problem.meta.get("lens"), "d": int(prior.event_shape[0]),
            "reference": {
                "log_z_chain": ref["log_z"], "log_z_analytic": ref["analytic_log_z"],
                "post_std_over_chain_prior_std_median": float(
                    (torch.diagonal(Sig) / torch.diagonal(ref["chain_prior_cov"])).sqrt().median()),
                "chain_prior_std_over_gp_std_median": float(
                    (torch.diagonal(ref["chain_prior_cov"]) / torch.diagonal(prior.cov)).sqrt().median()),
                "analytic_posterior_vs_chain_posterior": compare(
                    exact_draws(ref["analytic_mean"], ref["analytic_cov"], n_samples, gd), mu, Sig),
                "w2_analytic_vs_chain_posterior": gaussian_w2(ref["analytic_mean"], ref["analytic_cov"], mu, Sig),
            },
            "mc_floor": floor, "methods": {}}


def _tune_baselines(p: dict, seed: int) -> dict:
    """DPS / DPS+CLA scales, tuned on observations from a separate seed (nothing is tuned on the
    evaluation observation): method -> (scale, tuning record, seconds)."""
    tuned = {}
    for method in ("dps", "dps_cla"):
        t0 = time.time()
        scale, rec = tune_on_separate_seed(method, p["prior"], p["chain"], p["problem"], seed + 1000, n_obs=4, n=128,
                                           seed=seed + 1001)
        tuned[method] = (scale, rec, time.time() - t0)
        log.info("%s tuned scale %.4g (%s)", method, scale, rec["objective"])
    return tuned


def _rtb_settings(p: dict, seed: int, guidance: str, scale: float | None, overrides: dict | None):
    """(RTB config overrides, guidance tuning record or None). Unless ``scale`` is given, the guidance
    scale is the guided chain closest to the posterior (untrained ELBO) on the separate seed's observations."""
    over = {"logz": "vargrad"}
    tuning = None
    if guidance != "none":
        if scale is None:
            t0 = time.time()
            tuning = tune_guidance_scale(p["prior"], p["chain"], p["problem"], guidance, seed + 1000, n=256, n_obs=4)
            tuning["seconds"] = time.time() - t0
            scale = tuning["scale"]
            log.info("rtb_%s guidance scale %.4g (untrained ELBO, seed %d)", guidance, scale, seed + 1000)
        over.update(guidance=guidance, guidance_scale=float(scale))
    over.update(overrides or {})
    return over, tuning


def _run_rtb(setup: CheckSetup, p: dict, seed: int, n_samples: int, steps: int, over: dict, tuning, out_dir: Path):
    """Train RTB with ``seed``, sample with ``seed + 1`` and compare with the reference."""
    post, summary, secs = train_rtb(p["prior"], p["chain"], p["problem"], p["y"], steps=steps, seed=seed,
                                    metrics_path=out_dir / "rtb_metrics.jsonl", **over)
    t0 = time.time()
    with torch.no_grad():
        xs = rtb_samples(post, p["problem"], p["y"], n_samples, seed + 1)
    m = compare(xs, p["ref"]["mean"], p["ref"]["cov"])
    m.update(train_seconds=secs, sample_seconds=time.time() - t0, steps=summary["steps"],
             rollbacks=summary["rollbacks"], diverged=summary["diverged"], guidance=over.get("guidance", "none"),
             guidance_scale=over.get("guidance_scale"), guidance_tuning=tuning,
             learn_guidance_gain=bool(over.get("learn_guidance_gain", True)) and "guidance" in over,
             learned_guidance_gain=([round(math.exp(v), 4) for v in post.guidance_log_gain.detach().tolist()[2:]]
                                    if post.guidance_log_gain is not None else None),
             logz_mode=over["logz"], K=setup.K,
             passes=passes_accuracy_criterion(m))
    log.info("rtb: %s", m)
    return m


def _run_baselines(p: dict, seed: int, n_samples: int, particles, tuned: dict) -> dict:
    """FPS-SMC (independent runs of ``particles`` each) and DPS / DPS+CLA at their tuned scales."""
    prior, chain, problem, y = p["prior"], p["chain"], p["problem"], p["y"]
    mu, Sig = p["ref"]["mean"], p["ref"]["cov"]
    out = {}
    for M in particles:
        t0 = time.time()
        s = make_sampler("fps_smc", prior, chain, particles=int(M), mode="runs")
        x = s.sample(problem, y, n_samples, generator=torch.Generator().manual_seed(seed + 3)).x0
        r = compare(x, mu, Sig)
        r["seconds"] = time.time() - t0
        out[f"fps_smc_M{M}"] = r
        log.info("fps_smc M=%d: %s", M, r)
    for method in ("dps", "dps_cla"):
        scale, rec, t_tune = tuned[method]
        t0 = time.time()
        s = make_sampler(method, prior, chain, scale=scale, tuning_record=rec)
        x = s.sample(problem, y, n_samples, generator=torch.Generator().manual_seed(seed + 4)).x0
        r = compare(x, mu, Sig)
        r.update(scale=scale, tuning_objective=rec["objective"], tuning_seconds=t_tune, seconds=time.time() - t0)
        out[method] = r
        log.info("%s scale=%.4g: %s", method, scale, r)
    return out


def run_gaussian_check(out_dir, *, steps: int = 1500, n_samples: int = 2000, seed: int = 0,
                       setup: CheckSetup | None = None, baselines: bool = True, particles=(1, 5, 20),
                       rtb_guidance: str = "dps_cla", rtb_guidance_scale: float | None = None,
                       rtb_overrides: dict | None = None) -> dict:
    """Run the check and write ``out_dir/gaussian_check.json`` (atomically); returns the same dict.

    ``seed`` draws the truth (from the chain prior) and the noise; the DPS / DPS+CLA scales are tuned on
    observations from ``seed + 1000`` (a separate seed); RTB trains with ``seed`` and samples with
    ``seed + 1``. RTB: VarGrad log Z, ``rtb_guidance`` ('dps_cla', 'dps' or 'none') in its
    parameterisation at ``rtb_guidance_scale`` (default: that method's tuned scale). Times in seconds."""
    setup = setup or CheckSetup()
    out_dir = Path(out_dir)
    t_all = time.time()
    p = _problem_and_reference(setup, seed)
    res = _reference_record(setup, seed, n_samples, p)
    log.info("sigma %.4g, reference ready (log Z chain %.2f)", p["sigma"], p["ref"]["log_z"])
    # the DPS+CLA scale tuning also sets the guidance inside RTB's parameterisation (rtb_guidance="dps_cla"),
    # so RTB starts from the tuned baseline and learns the residual
    tuned = _tune_baselines(p, seed)
    over, rtb_tuning = _rtb_settings(p, seed, rtb_guidance, rtb_guidance_scale, rtb_overrides)
    res["methods"]["rtb"] = _run_rtb(setup, p, seed, n_samples, steps, over, rtb_tuning, out_dir)
    if baselines:
        res["methods"].update(_run_baselines(p, seed, n_samples, particles, tuned))
    res["seconds"] = time.time() - t_all
    _write_json(out_dir / "gaussian_check.json", res)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.lensing.gaussian_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (gaussian_check.json, rtb_metrics.jsonl)")
    p.add_argument("--steps", type=int, default=1500, help="RTB training iterations")
    p.add_argument("--n-samples", type=int, default=2000, help="samples per method (>= 1000 for the accuracy criterion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baselines", action="store_true", help="RTB only (skip FPS-SMC, DPS, DPS+CLA sampling)")
    p.add_argument("--rtb-guidance", default="dps_cla", choices=["none", "dps", "dps_cla"],
                   help="guidance inside RTB's parameterisation (its scale: the tuned one unless given)")
    p.add_argument("--rtb-guidance-scale", type=float, default=None,
                   help="guidance scale inside RTB (default: the best untrained ELBO on a separate seed)")
    p.add_argument("--fixed-guidance-gain", action="store_true",
                   help="ablation: do not learn the per-step guidance gain (the spread then stays near its start)")
    p.add_argument("--K", type=int, default=CheckSetup.K, help="chain length (reverse steps)")
    p.add_argument("--spacing", default=CheckSetup.spacing, choices=["uniform", "quadratic"],
                   help="the chain's timestep grid (quadratic ends near t = 0, as config/config.yaml's chain)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()
    res = run_gaussian_check(a.out, steps=a.steps, n_samples=a.n_samples, seed=a.seed, baselines=not a.no_baselines,
                             setup=CheckSetup(K=a.K, spacing=a.spacing),
                             rtb_guidance=a.rtb_guidance, rtb_guidance_scale=a.rtb_guidance_scale,
                             rtb_overrides={"learn_guidance_gain": False} if a.fixed_guidance_gain else None)
    rows = [f"{k:12s} frac(err<=0.1)={v['frac_mean_err_le_0.1']:.3f} std_ratio p10/p90="
            f"{v['std_ratio_p10']:.3f}/{v['std_ratio_p90']:.3f} W2={v['w2']:.3f}"
            for k, v in [("mc_floor", res["mc_floor"])] + list(res["methods"].items())]
    print("\n".join(rows))
    print(f"rtb passes the accuracy criterion: {res['methods']['rtb']['passes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
