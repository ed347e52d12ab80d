"""Lensing posteriors, sampling: any registered method on a set of observation files.

``sample_observations`` loads the prior (and the amortized posterior), builds the method's sampler
once (:func:`pipeline.samplers.make_sampler`), samples each observation and writes one posterior FITS
per observation. For the amortized posterior every observation is first judged against the conditions
it was trained on (:mod:`pipeline.lensing.guard`, policy ``posterior.guard``): refused with one line
before anything is sampled, or sampled with warnings in the log and ``OODWARN`` header cards.
Besides the samples, each file carries the model and residual images of the posterior mean, the lens it
is conditional on, the observation's sky WCS and the source's flux, magnification and half-light radius
(docs/posterior-files.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits

import pipeline
from pipeline.config import config_hash, load_section, load_yaml, read_device
from pipeline.diffusion.schedule import load_chain
from pipeline.diffusion.network_prior import load_prior
from pipeline.errors import ConfigError, InputFileError
from pipeline.io.posterior import posterior_moments, write_posterior
from pipeline.lensing.amortized import amortized_sampler
from pipeline.lensing.config import BrightnessConfig, PosteriorConfig, load_lensing_config
from pipeline.lensing.critical import curves_from_header
from pipeline.lensing.guard import apply_policy, check_observation, trained_record
from pipeline.lensing.observation import load_observation
from pipeline.lensing.simulate import lens_header
from pipeline.lensing.sky_wcs import observation_wcs_header
from pipeline.lensing.tuning import tune_guidance_scale
from pipeline.lensing.units import model_factor, parse_bunit
from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.metrics.logz import estimate_logz_samples
from pipeline.metrics.source_stats import source_stats
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.sampler import GN_ITERATIONS
from pipeline.runtime import choose_device
from pipeline.samplers import AMORTIZED_METHODS, make_sampler, method_spec

log = logging.getLogger(__name__)


def load_amortized(posterior_dir, prior, chain=None):
    """Load the exported amortized posterior; it samples any observation given with its own
    :class:`~pipeline.lensing.operator.LensingProblem`. Returns (posterior, hparams). ``chain``: the
    config's chain, which must be the one the posterior was trained on (None: not checked)."""
    return load_posterior(posterior_dir, prior, chain=chain)


def guard_observations(files, lcfg, brightness, device, record, gcfg) -> list[tuple]:
    """Read every observation and judge it against the posterior's trained conditions ``record`` (None:
    not judged) before any is sampled, so an ``error`` policy refuses the whole call with one line and
    no output. Returns (problem, y, meta, out-of-condition warnings) per file."""
    loaded = []
    for path in files:
        problem, y, meta = load_observation(path, lcfg, device=device, brightness=brightness)
        ood = []
        if record is not None:
            ood = apply_policy(path, check_observation(record, problem, y, meta, gcfg), gcfg)
            for reason in ood:
                log.warning("%s: outside the posterior's trained conditions: %s", path, reason)
        loaded.append((problem, y, meta, ood))
    return loaded


def fps_smc_options(pcfg: PosteriorConfig, n: int) -> dict:
    """FPS-SMC sampler options for ``n`` returned samples per observation (``posterior.fps_smc_*``).

    ``runs`` (default): ``n`` independent runs of ``fps_smc_particles`` particles each, one sample drawn per
    run, so the samples are independent and their per-pixel intervals calibrated. Cost: n x particles
    trajectories, ``batch_size`` trajectories per network call (on CPU the demo prior costs ~1.5x more per
    trajectory in calls of 256 than in calls of 64, so batching beyond that is no cheaper).
    ``weighted``: one run of ``n`` shared particles per observation (PARTICLES + WEIGHTS in the posterior
    file when the final weights differ; SAMPLES are resampled from them): one run's weighted-particle
    approximation, a cheap posterior mean at n trajectories. Resampling makes its particles share ancestors,
    so intervals from it are too narrow (linear-Gaussian toy, n = 32: 68 / 95 % coverage 0.57 / 0.80,
    against 0.72 / 0.95 for runs with 2 particles and 0.71 / 0.94 for exact samples).
    """
    if pcfg.fps_smc_mode == "weighted":
        return {"particles": int(n), "mode": "weighted"}
    return {"particles": pcfg.fps_smc_particles, "mode": "runs", "batch_size": pcfg.batch_size}


def observation_files(specs) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files += sorted(f for f in p.glob("*.fits"))
        elif p.is_file():
            files.append(p)
        else:
            raise InputFileError(p, "observation file or directory not found", field="--obs")
    if not files:
        raise InputFileError(specs[0] if specs else "--obs", "no observation FITS files found", field="--obs")
    return files


def _build_sampler(method, config_path, prior, chain, posterior_dir, first_obs, lcfg, pcfg, n, device,
                   tuning=None):
    """The method's sampler, built once for every observation; returns (sampler, provenance entries,
    the amortized posterior's hparams or None). ``tuning``: a frozen tuning record to use instead of tuning
    the guidance scale here."""
    spec = method_spec(method)
    problem = load_observation(first_obs, lcfg, device=device,
                               brightness=BrightnessConfig(scale=prior.scale, offset=prior.offset))[0]
    if spec.trained:
        if not spec.amortized:
            raise ConfigError(config_path, "methods", f"lensing samples the amortized RTB posterior "
                              f"({', '.join(AMORTIZED_METHODS)}); '{method}' needs one fine-tuning per "
                              f"observation")
        if posterior_dir is None:
            raise InputFileError("--posterior", f"{method} needs the fine-tuned posterior directory")
        post, hp = load_amortized(posterior_dir, prior, chain)
        extra = {"rtb_amortized_is": {"particles": pcfg.particles},
                 "rtb_amortized_gn": {"last_step": "gauss_newton", "iterations": GN_ITERATIONS}}.get(method)
        sampler = amortized_sampler(method, post, batch_size=pcfg.batch_size, particles=pcfg.particles)
        return sampler, {"posterior": str(posterior_dir), **({"options": extra} if extra else {})}, hp
    opts, prov = {"device": device}, {}
    if spec.tuned:
        prov["tuning"] = tuning or tune_guidance_scale(method, prior, chain, lcfg, pcfg, float(problem.sigma.max()),
                                                       device)
        opts["scale"] = prov["tuning"]["scale"]
    if method == "fps_smc":
        opts.update(fps_smc_options(pcfg, n))
    if method == "prior_is":
        opts["particles"] = pcfg.particles
    prov = {"options": {k: v for k, v in opts.items() if k != "device"}, **prov}
    return make_sampler(method, prior, chain, **opts), prov, None


def _logz(spec, smp) -> dict | None:
    """The observation's log Z estimates (nats) as the method declares them (:mod:`pipeline.samplers.registry`)."""
    if spec.logz == "info":
        return smp.info.get("logz")
    if spec.logz == "trajectory":
        try:
            est = estimate_logz_samples(smp)
        except ValueError:
            return None
        return {"elbo": est.elbo, "elbo_se": est.elbo_se, "iw": est.iw}
    return None


def _to_write(prior, smp, problem, n, gen):
    """(SAMPLES in network units, SAMPLES physical, PARTICLES or None, WEIGHTS or None)."""
    def phys(x):
        return prior.to_physical(x).reshape(x.shape[0], *problem.x_shape[-2:])

    x_net = smp.x0.reshape(smp.x0.shape[0], *problem.x_shape)
    if "particles_x0" in smp.info:
        # every trajectory is kept as a particle, weighted within its group (1/n per group), and
        # SAMPLES holds the one drawn from each group
        parts = smp.info["particles_x0"]
        weights = (smp.info["particles_weights"] / n).reshape(-1).cpu().numpy()
        return x_net, phys(x_net), phys(parts.reshape(parts.shape[0], *problem.x_shape)).cpu().numpy(), weights
    x_phys = phys(x_net)
    if smp.log_w is not None and float(smp.log_w.max() - smp.log_w.min()) > 0:
        # weighted particles: keep them, and resample equally weighted SAMPLES from them
        w = torch.softmax(smp.log_w.double(), 0)
        idx = torch.multinomial(w.float().cpu(), n, replacement=True, generator=gen)
        return x_net[idx.to(x_net.device)], x_phys[idx.to(x_phys.device)], x_phys.cpu().numpy(), w.cpu().numpy()
    return x_net, x_phys, None, None


def image_products(problem, y, mean, x_phys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(MODEL, RESID, per-sample image flux): the noiseless image of the posterior mean ``mean``
    [physical source units, (ny_s, nx_s)] in the data unit, the residuals (y - MODEL) / sigma
    (dimensionless, NaN on masked pixels), and the total model-image flux of each physical sample
    ``x_phys`` (n, ...) [data unit, every image pixel]."""
    dev = problem.device
    model = problem.physical_forward(torch.as_tensor(mean, device=dev)[None])[0].cpu().numpy()
    used = problem.mask.cpu().numpy() > 0
    resid = np.where(used, (y.cpu().numpy() - model) / problem.sigma.cpu().numpy(), np.nan).astype(np.float32)
    with torch.no_grad():
        flux = problem.physical_forward(x_phys).double().sum(dim=(-2, -1)).cpu().numpy()
    return model.astype(np.float32), resid, flux


def lens_cards(meta: dict) -> dict:
    """The lens the posterior is conditional on as primary cards: the observation files' keywords, in the
    array frame of the image inference used (after any crop), and LENSFILE, where it was read from."""
    h = fits.Header()
    lens_header(meta["lens"], h)
    cards = {c.keyword: (c.value, c.comment) for c in h.cards}
    cards["LENSFILE"] = (Path(meta["lens_source"]).name, "file the lens was read from")
    return cards


def flux_unit(lcfg) -> str:
    """The unit of total source flux: ``lensing.sources.bunit`` x arcsec^2 (electron/s by default)."""
    return (parse_bunit(lcfg.sources.bunit, "config", "lensing.sources.bunit") * u.arcsec ** 2).to_string()


def _products(path, lcfg, problem, y, meta, x_phys, particles, weights) -> dict:
    """write_posterior's image-plane, lens and source-statistics arguments for one observation."""
    x_np = x_phys.cpu().numpy()
    mean, std = posterior_moments(x_np, particles, weights)
    model, resid, image_flux = image_products(problem, y, mean, x_phys)
    stats = source_stats(x_np, lcfg.geometry.source_pixscale, image_flux, model_factor(lcfg, 1.0))
    return {"mean": mean, "std": std, "model": model, "resid": resid, "data_unit": lcfg.noise.bunit,
            "image_wcs": observation_wcs_header(fits.getheader(path, "SCI"), meta), "lens_cards": lens_cards(meta),
            "source_stats": stats, "flux_unit": flux_unit(lcfg)}


def sample_observations(config_path, method, prior_dir, posterior_dir, obs_specs, out_dir=None, *, out_file=None,
                        png=None, n=None, seed=None, tuning=None, only=None) -> list[dict]:
    """Sample ``method``'s posterior for every observation; one posterior FITS per observation.

    Load the prior (and posterior), build the sampler once (tuning its guidance scale if it has one, unless
    ``tuning`` gives the frozen record), then sample and write each observation in turn. Returns one dict
    per observation: obs, out, seconds, logz, chi2_median, source_stats (``{"flux" [flux_unit],
    "magnification", "r_half" [arcsec]}``, each posterior mean and 16th / 84th percentiles), flux_unit.
    ``only``: indices (in the sorted file order) of the observations to sample, the others skipped; each keeps
    its own seed, so a subset gives the same files as the whole run.
    """
    lcfg = load_lensing_config(config_path)
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    device = choose_device(read_device(config_path))
    prior = load_prior(prior_dir, device=device)
    chain = load_chain(config_path, prior)
    K, var = chain.K, chain.variance
    n = n or pcfg.n_samples
    seed = pcfg.seed if seed is None else seed
    files = observation_files(obs_specs)
    brightness = BrightnessConfig(scale=prior.scale, offset=prior.offset)
    provenance = {"version": pipeline.__version__, "seed": seed, "config_hash": config_hash(load_yaml(config_path)),
                  "prior": str(prior_dir), "K": K, "variance": var}
    sampler, prov, hp = _build_sampler(method, config_path, prior, chain, posterior_dir, files[0], lcfg, pcfg, n,
                                       device, tuning)
    provenance.update(prov)
    record = None if hp is None else trained_record(hp, posterior_dir)
    loaded = guard_observations(files, lcfg, brightness, device, record, pcfg.guard)
    spec = method_spec(method)
    results = []
    for i, (path, (problem, y, meta, ood)) in enumerate(zip(files, loaded)):
        if only is not None and i not in only:
            continue
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        t0 = time.time()
        smp = sampler.sample(problem, y, n, generator=gen)
        seconds = time.time() - t0
        x_net, x_phys, particles, weights = _to_write(prior, smp, problem, n, gen)
        logz = _logz(spec, smp)
        chi = chi2_per_sample(problem, x_net, y)
        target = Path(out_file) if out_file else Path(out_dir) / f"{path.stem}.fits"
        products = _products(path, lcfg, problem, y, meta, x_phys, particles, weights)
        write_posterior(target, x_phys.cpu().numpy(), truth=meta.get("truth"), obs=y.cpu().numpy(), logz=logz,
                        particles=particles, weights=weights,
                        chi2=chi["chi2_nu"], src_pixscale=lcfg.geometry.source_pixscale, method=method,
                        provenance=provenance, seconds=seconds, obs_file=str(path),
                        obs_pixscale=meta.get("pixscale"), bunit=lcfg.sources.bunit, ood_warnings=ood,
                        extra_header=smp.info.get("header"), **products)
        stats = products["source_stats"]
        results.append({"obs": str(path), "out": str(target), "seconds": seconds, "logz": logz,
                        "chi2_median": float(np.median(chi["chi2_nu"])), "source_stats": stats,
                        "flux_unit": products["flux_unit"]})
        log.info("%s %s: %.1f s, chi2_nu median %.3f, log Z %s, source flux %s %s, magnification %s, "
                 "r_half %s arcsec", method, path.stem, seconds, results[-1]["chi2_median"],
                 None if logz is None else round(logz["elbo"], 2), _fmt(stats["flux"]), products["flux_unit"],
                 _fmt(stats["magnification"]), _fmt(stats["r_half"]))
        if png:
            from pipeline.plots.lens import plot_posterior_file

            plot_posterior_file(target, png, obs_pixscale=meta.get("pixscale"), lens_curves=curves_from_header)
    return results


def _fmt(v: dict) -> str:
    """'mean [lo, hi]' of a summarised statistic, or 'n/a'."""
    if v["mean"] is None:
        return "n/a"
    return f"{v['mean']:.4g} [{v['lo']:.4g}, {v['hi']:.4g}]"
