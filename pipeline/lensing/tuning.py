"""Lensing guidance scales, tuned on prior-predictive observations apart from every evaluated set.

Both searches are :func:`pipeline.samplers.tuning.tune_scale`: the heuristic DPS / DPS+CLA scale of the
training-free samplers (here; objective ``posterior.tune_objective``), and the scale of the frozen-prior
guidance inside the amortized RTB posterior (:func:`pipeline.lensing.finetune.tune_rtb_guidance`; the ELBO of
the untrained posterior, which is the guided chain itself). Tuning observations come from
``posterior.tune_seed`` through :func:`prior_predictive_observation`, the one way a lensing observation is
drawn from the prior predictive.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_section, read_device
from pipeline.diffusion.schedule import load_chain
from pipeline.diffusion.network_prior import load_prior
from pipeline.errors import InputFileError
from pipeline.lensing.config import BrightnessConfig, PosteriorConfig, load_lensing_config
from pipeline.lensing.observation import load_observation
from pipeline.lensing.simulate import draw_lens, make_problem
from pipeline.runtime import choose_device
from pipeline.samplers import TUNED_METHODS
from pipeline.samplers.tuning import prior_predictive, tune_on_separate_seed

log = logging.getLogger(__name__)


def draw_lens_problem(lcfg, prior, rng: np.random.Generator, noise_sigma: float, device=None):
    """A lens from the configured ranges (``rng``), assembled on the configured grids with noise level
    ``noise_sigma`` [SCI units] and the prior's brightness map."""
    problem = make_problem(draw_lens(lcfg.lens, rng), lcfg.geometry, sigma=noise_sigma,
                           device=prior.device if device is None else device)
    return problem.set_brightness(prior.scale, prior.offset)


def prior_predictive_observation(lcfg, prior, chain, rng: np.random.Generator, gen: torch.Generator,
                                 noise_sigma: float):
    """One prior-predictive observation: (problem, truth (1, *x_shape), y (ny, nx)); the lens from ``rng``,
    the prior-chain truth and then the noise from ``gen`` (network units)."""
    problem = draw_lens_problem(lcfg, prior, rng, noise_sigma)
    y, truth = prior_predictive(prior, chain, problem, 1, gen)
    return problem, truth, y[0]


def tune_guidance_scale(method, prior, chain, lcfg, pcfg, sigma, device, n_obs: int = 4, n: int = 32) -> dict:
    """The heuristic DPS / DPS+CLA scale, tuned on ``n_obs`` prior-predictive observations under one lens
    drawn from ``posterior.tune_seed`` (``n`` samples in all), objective ``posterior.tune_objective``. The
    frozen scale and its record go into every posterior file's provenance."""
    problem = draw_lens_problem(lcfg, prior, np.random.default_rng(pcfg.tune_seed), sigma, device)
    scale, record = tune_on_separate_seed(method, prior, chain, problem, pcfg.tune_seed, n_obs=n_obs,
                                          grid=pcfg.guidance_scales.get(method), n=n, seed=pcfg.tune_seed,
                                          refine=False, sampler_opts={"device": device},
                                          objective=pcfg.tune_objective)
    log.info("%s: tuned scale %.3g on seed %d (%s)", method, scale, pcfg.tune_seed, record.get("objective"))
    return record


def tune_for_observations(config_path, method: str, prior_dir, obs_file) -> dict:
    """The tuning record of ``method`` for observations at the noise level of ``obs_file`` (its largest
    NOISE value, as ``sample`` does): what ``tune`` writes and ``sample --tuning`` reads, so every set
    sampled at that noise level shares one frozen scale."""
    if method not in TUNED_METHODS:
        raise InputFileError("--method", f"'{method}' has no guidance scale to tune (tuned: {', '.join(TUNED_METHODS)})")
    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    device = choose_device(read_device(config_path))
    prior = load_prior(prior_dir, device=device)
    chain = load_chain(config_path, prior)
    problem = load_observation(obs_file, lcfg, device=device,
                               brightness=BrightnessConfig(scale=prior.scale, offset=prior.offset))[0]
    return tune_guidance_scale(method, prior, chain, lcfg, pcfg, float(problem.sigma.max()), device)


def read_tuning_record(path, method: str) -> dict:
    """A tuning record written by ``tune`` for ``method``; a one-line error naming the file and the field
    if it is unreadable, for another method, or has no scale."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"not a readable tuning record ({type(exc).__name__})") from None
    if not isinstance(record, dict) or record.get("method") != method:
        got = record.get("method") if isinstance(record, dict) else None
        raise InputFileError(path, f"tuning record is for method {got!r}, not {method!r}", field="method")
    scale = record.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
        raise InputFileError(path, f"tuning record has no valid scale (got {scale!r})", field="scale")
    return record
