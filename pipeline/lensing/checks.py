"""Lensing posteriors, checks: a seeded fit check of amortized posteriors on prior-predictive observations.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.diffusion.schedule import load_chain
from pipeline.diffusion.sampling import sample_prior
from pipeline.errors import InputFileError, PipelineError
from pipeline.io.checkpoint import load_checkpoint
from pipeline.lensing.amortized import amortized_sampler
from pipeline.lensing.config import load_lensing_config
from pipeline.lensing.sample import load_amortized
from pipeline.lensing.tuning import prior_predictive_observation
from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.metrics.ppc import TAIL, chi2_band


def evaluate_shipped_posterior(config_path, prior, checkpoint, *, seed: int = 0, n: int = 16,
                               noise_sigma: float) -> dict:
    """A fixed, seeded check of a posterior checkpoint: one prior-predictive observation (lens and truth
    from ``seed``), ``n`` amortized samples, their median chi2_nu and mean log r. Used to record and
    re-check the metrics of the checkpoints shipped under data/pretrained/."""
    rec = check_posterior(config_path, prior, checkpoint, n_obs=1, n=n, seed=seed, noise_sigma=noise_sigma)
    per = rec["per_observation"]
    return {"chi2_nu_median": per["chi2_nu"][0], "mean_log_r": per["mean_log_r"][0],
            "seed": seed, "n": n, "noise_sigma": noise_sigma}


def check_posterior(config_path, prior, checkpoint, *, n_obs: int = 16, n: int = 32, seed: int = 42,
                    noise_sigma: float | None = None, last_step: str = "policy", step_variance_tau2=None,
                    step_variance_mode: str | None = None, step_mean_shift: bool | None = None,
                    step_mean_cg_iters: int | None = None, use_head: bool | None = None,
                    step_model_chain_x0: bool | None = None) -> dict:
    """Seeded fit check of an amortized posterior on ``n_obs`` prior-predictive observations (lenses,
    truths and noise from ``seed``; the same set for every checkpoint): per observation the median over
    ``n`` samples of chi2_nu over the image and inside the arc, the mean log r, the ELBO, and the median
    per-pixel posterior std (physical units); and the medians of those over observations. Beside them,
    the truth's own chi2_nu over the image and inside its arc: exact posterior samples are exchangeable
    with the truth given y, so their chi2 should match these, not 1 exactly. The medians hide a few wild
    samples, so each observation also gets ``frac_above_band``: the fraction of its samples whose chi2_nu
    exceeds the upper edge of the central 99.9 % band of chi2_m / m (m = the unmasked pixels). Each exact
    sample has the truth's chi2 law, chi2_m, so an exact sampler's expected fraction is the band's upper
    tail, 0.0005 (``frac_above_band_exact``); its mean over observations is ``frac_above_band_mean``.
    Used to compare training stages (data/pretrained/README.md); not a calibration (that is
    ``calibrate``). ``last_step``:
    ``policy`` (the network's own) or ``gauss_newton`` (the twisted step of ``rtb_amortized_gn``).
    ``step_variance_tau2``: None keeps the posterior's own likelihood-informed step variance; a value
    (network units^2) or ``"off"`` replaces it for this check (:mod:`pipeline.rtb.step_variance`), and
    ``step_variance_mode`` (``"prior"``, ``"tweedie"`` or ``"galaxy"``) its mode; ``step_mean_shift``
    (None: the posterior's own) switches the step's likelihood-informed mean shift on or off,
    ``step_mean_cg_iters`` sets its conjugate-gradient iterations (0: the damped diagonal form) and
    ``use_head`` samples with or without the trained correction head; ``step_model_chain_x0`` takes the step
    model's x_0 as the chain's final denoise or as the forward process's (:mod:`pipeline.rtb.step_variance`)."""
    if step_variance_tau2 == "off" and step_mean_shift:
        raise PipelineError("check-posterior: the step mean shift needs a step variance (not --step-variance-tau2 off)")
    if n_obs < 1 or n < 2:
        raise ValueError(f"check_posterior needs n_obs >= 1 and n >= 2 samples (got {n_obs}, {n})")
    if last_step not in ("policy", "gauss_newton"):
        raise ValueError(f"last_step must be 'policy' or 'gauss_newton', got {last_step!r}")
    if noise_sigma is None:  # an exported posterior records the noise level it was trained with
        hp = load_checkpoint(checkpoint, names=[]).hparams
        if "lensing" not in hp:
            raise InputFileError(checkpoint, "records no noise level (a trainer checkpoint, not an export): "
                                             "pass --noise-sigma", field="lensing.noise_sigma")
        noise_sigma = float(hp["lensing"]["noise_sigma"])
    lcfg = load_lensing_config(config_path)
    chain = load_chain(config_path, prior)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    rows = {"chi2_nu": [], "chi2_arc_nu": [], "mean_log_r": [], "elbo": [], "std": [],
            "truth_chi2_nu": [], "truth_chi2_arc_nu": [], "frac_above_band": []}
    sampler = None
    for _ in range(n_obs):
        problem, truth, y = prior_predictive_observation(lcfg, prior, chain, rng, gen, noise_sigma)
        if sampler is None:  # loaded once; each observation brings its own lens
            post, _ = load_amortized(checkpoint, prior, chain)
            if step_variance_tau2 is not None:
                post.step_variance_tau2 = None if step_variance_tau2 == "off" else float(step_variance_tau2)
            if step_variance_mode is not None:
                post.step_variance_mode = step_variance_mode
            if step_mean_shift is not None:
                post.step_mean_shift = bool(step_mean_shift)
            if step_mean_cg_iters is not None:
                post.step_mean_cg_iters = int(step_mean_cg_iters)
            if use_head is not None:
                post.use_head = bool(use_head)
            if step_model_chain_x0 is not None:
                post.step_model_chain_x0 = bool(step_model_chain_x0)
            if getattr(post, "step_mean_cg_iters", 0) and not getattr(post, "step_mean_shift", False):
                if step_mean_cg_iters:
                    raise PipelineError(f"{checkpoint}: --step-mean-cg-iters needs the step mean shift "
                                        f"(--step-mean-shift on)")
                post.step_mean_cg_iters = 0  # the shift switched off takes its CG iterations with it
            if getattr(post, "step_variance_tau2", None) is None and getattr(post, "step_mean_shift", False):
                if step_mean_shift:
                    raise PipelineError(f"{checkpoint}: the step mean shift needs a step variance, and this "
                                        f"posterior has none (pass --step-variance-tau2)")
                post.step_mean_shift = False  # the step variance switched off takes its mean shift with it
            method = "rtb_amortized_gn" if last_step == "gauss_newton" else "rtb_amortized"
            sampler = amortized_sampler(method, post, batch_size=n)
        smp = sampler.sample(problem, y, n, generator=gen)
        chi = chi2_per_sample(problem, smp.x0, y)
        rows["chi2_nu"].append(float(np.median(chi["chi2_nu"])))
        rows["chi2_arc_nu"].append(float(np.nanmedian(chi["chi2_arc_nu"])))
        rows["frac_above_band"].append(float(np.mean(np.asarray(chi["chi2_nu"]) > chi2_band(chi["nu"])[1])))
        rows["mean_log_r"].append(float(smp.log_r.mean()))
        rows["elbo"].append(float((smp.log_r + smp.log_p_traj - smp.log_q_traj).double().mean()))
        rows["std"].append(float(prior.to_physical(smp.x0).reshape(n, -1).std(0).median()))
        chi_t = chi2_per_sample(problem, truth.reshape(1, *smp.x0.shape[1:]).to(smp.x0), y)
        rows["truth_chi2_nu"].append(float(chi_t["chi2_nu"][0]))
        rows["truth_chi2_arc_nu"].append(float(chi_t["chi2_arc_nu"][0]))
    return {"posterior": str(checkpoint), "last_step": last_step, "step_variance_tau2": getattr(post, "step_variance_tau2", None),
            "step_variance_mode": getattr(post, "step_variance_mode", None),
            "step_mean_shift": getattr(post, "step_mean_shift", None),
            "step_mean_cg_iters": getattr(post, "step_mean_cg_iters", None), "use_head": getattr(post, "use_head", None),
            "step_model_chain_x0": getattr(post, "step_model_chain_x0", None),
            "n_obs": n_obs, "n_samples": n, "seed": seed,
            "noise_sigma": noise_sigma,
            **{f"{k}_median": float(np.median(v)) for k, v in rows.items()},
            "frac_above_band_mean": float(np.mean(rows["frac_above_band"])), "frac_above_band_exact": TAIL,
            "per_observation": rows}
