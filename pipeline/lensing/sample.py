"""Lensing posteriors, sampling: any registered method on a set of observation files.

``sample_observations`` loads the prior (and the amortized posterior), builds the method's sampler
once (:func:`pipeline.samplers.make_sampler`), samples each observation and writes one posterior FITS
per observation. For the amortized posterior every observation is first judged against the conditions
it was trained on (:mod:`pipeline.lensing.guard`, policy ``posterior.guard``): refused with one line
before anything is sampled, or sampled with warnings in the log and ``OODWARN`` header cards. After
sampling, every observation gets a posterior predictive check (:mod:`pipeline.metrics.ppc`): a fit whose
chi2 is inconsistent with the noise is logged as a WARNING and marked ``PPCWARN = T`` in its file.
Besides the samples, each file carries the model and residual images of the posterior mean, the lens it
is conditional on, the observation's sky WCS and the source's flux, magnification and half-light radius
(docs/posterior-files.md). The steps (:func:`load_setup`, :func:`method_run`, :func:`guard_observation`,
:func:`sample_observation`, :func:`write_observation`) take already-loaded observations, so the Python API
(``pipeline.reconstruct``) runs them on arrays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
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
from pipeline.lensing.config import BrightnessConfig, LensingConfig, PosteriorConfig, load_lensing_config
from pipeline.lensing.critical import curves_from_header
from pipeline.lensing.guard import apply_policy, check_observation, trained_record
from pipeline.lensing.observation import load_observation
from pipeline.lensing.simulate import lens_header
from pipeline.lensing.sky_wcs import observation_wcs_header
from pipeline.lensing.tuning import tune_guidance_scale
from pipeline.lensing.units import model_factor, parse_bunit
from pipeline.metrics.chi2 import chi2_per_sample
from pipeline.metrics.logz import estimate_logz_samples
from pipeline.metrics.ppc import PPCResult, posterior_predictive_check
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


def guard_observation(run: MethodRun, path, problem, y, meta) -> list[str]:
    """Judge one loaded observation against the posterior's trained conditions (no judgement for methods
    without a trained posterior): the out-of-condition warnings, logged; policy ``error`` refuses it with one
    line (:func:`pipeline.lensing.guard.apply_policy`)."""
    if run.record is None:
        return []
    ood = apply_policy(path, check_observation(run.record, problem, y, meta, run.pcfg.guard), run.pcfg.guard)
    for reason in ood:
        log.warning("%s: outside the posterior's trained conditions: %s", path, reason)
    return ood


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


def _build_sampler(method, config_path, prior, chain, posterior_dir, problem, lcfg, pcfg, n, device,
                   tuning=None):
    """The method's sampler, built once for every observation; returns (sampler, provenance entries,
    the amortized posterior's hparams or None). ``problem``: the first observation's (its noise level sets the
    guidance scale's tuning); ``tuning``: a frozen tuning record to use instead of tuning here."""
    spec = method_spec(method)
    if spec.trained:
        if not spec.amortized:
            raise ConfigError(config_path, "methods", f"lensing samples the amortized RTB posterior "
                              f"({', '.join(AMORTIZED_METHODS)}); '{method}' needs one fine-tuning per "
                              f"observation")
        if posterior_dir is None:
            raise InputFileError("--posterior", f"{method} needs the fine-tuned posterior directory")
        post, hp = load_amortized(posterior_dir, prior, chain)
        extra = {"rtb_amortized_is": {"particles": pcfg.particles}, "rtb_amortized_smc": {"particles": pcfg.particles},
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


def _products(lcfg, problem, y, meta, x_phys, particles, weights) -> dict:
    """write_posterior's image-plane, lens and source-statistics arguments for one observation."""
    x_np = x_phys.cpu().numpy()
    mean, std = posterior_moments(x_np, particles, weights)
    model, resid, image_flux = image_products(problem, y, mean, x_phys)
    stats = source_stats(x_np, lcfg.geometry.source_pixscale, image_flux, model_factor(lcfg, 1.0))
    return {"mean": mean, "std": std, "model": model, "resid": resid, "data_unit": lcfg.noise.bunit,
            "image_wcs": observation_wcs_header(meta["sci_header"], meta), "lens_cards": lens_cards(meta),
            "source_stats": stats, "flux_unit": flux_unit(lcfg)}


def posterior_check(path, chi: dict) -> PPCResult:
    """The posterior predictive check of one observation's samples from their per-sample chi2 ``chi``
    (:func:`~pipeline.metrics.chi2.chi2_per_sample`); a flagged fit is logged as a WARNING naming ``path``."""
    ppc = posterior_predictive_check(chi)
    if ppc.flag:
        log.warning("%s: posterior predictive check: %s", path, ppc.message())
    return ppc


@dataclass
class Setup:
    """What every method shares: the config's sections, the device, the prior and its chain, and the number of
    samples ``n`` and ``seed`` per observation."""

    config_path: str
    lcfg: LensingConfig
    pcfg: PosteriorConfig
    device: torch.device
    prior: object
    chain: object
    n: int
    seed: int

    @property
    def brightness(self) -> BrightnessConfig:
        """The prior's network <-> physical brightness map (observations are loaded with it)."""
        return BrightnessConfig(scale=self.prior.scale, offset=self.prior.offset)


def load_setup(config_path, prior_dir, n=None, seed=None, device=None) -> Setup:
    """Read the config at ``config_path`` and load the prior at ``prior_dir`` on ``device`` (auto, cpu, cuda;
    default the config's); ``n`` and ``seed`` default to ``posterior.n_samples`` and ``posterior.seed``."""
    pcfg = load_section(config_path, "posterior", PosteriorConfig)
    device = choose_device(device or read_device(config_path))
    prior = load_prior(prior_dir, device=device)
    return Setup(str(config_path), load_lensing_config(config_path), pcfg, device, prior,
                 load_chain(config_path, prior), n or pcfg.n_samples, pcfg.seed if seed is None else seed)


@dataclass
class MethodRun:
    """One method ready to sample observations: its sampler (built once), the provenance every posterior file
    records, and the trained conditions the guard judges observations against (None: not judged)."""

    setup: Setup
    method: str
    sampler: object
    provenance: dict
    record: dict | None

    @property
    def pcfg(self) -> PosteriorConfig:
        return self.setup.pcfg


def method_run(setup: Setup, method, prior_dir, posterior_dir, problem, tuning=None) -> MethodRun:
    """Build ``method``'s sampler for ``setup`` (the fine-tuned posterior from ``posterior_dir`` for the
    amortized methods; the guidance scale tuned at ``problem``'s noise level unless ``tuning`` is given)."""
    s = setup
    provenance = {"version": pipeline.__version__, "seed": s.seed,
                  "config_hash": config_hash(load_yaml(s.config_path)), "prior": str(prior_dir), "K": s.chain.K,
                  "variance": s.chain.variance}
    sampler, prov, hp = _build_sampler(method, s.config_path, s.prior, s.chain, posterior_dir, problem, s.lcfg,
                                       s.pcfg, s.n, s.device, tuning)
    provenance.update(prov)
    record = None if hp is None else trained_record(hp, posterior_dir)
    return MethodRun(setup, method, sampler, provenance, record)


@dataclass
class ObservationPosterior:
    """One observation's posterior: the physical samples ``x_phys`` (n, ny_s, nx_s) [``lensing.sources.bunit``],
    any weighted PARTICLES / WEIGHTS, log Z estimates [nats] or None, the per-sample chi2 of
    :func:`~pipeline.metrics.chi2.chi2_per_sample`, write_posterior's image-plane and source products
    (:func:`_products`), the data ``obs`` [data unit], sampling time [s], the sampler's extra header cards and
    the guard's warnings."""

    x_phys: np.ndarray
    particles: np.ndarray | None
    weights: np.ndarray | None
    logz: dict | None
    chi: dict
    products: dict
    obs: np.ndarray
    seconds: float
    header: dict | None
    ppc: PPCResult
    ood: list[str] = field(default_factory=list)


def sample_observation(run: MethodRun, problem, y, meta, index: int = 0, ood=()) -> ObservationPosterior:
    """Sample observation number ``index`` of a call (its seed is ``seed * 100003 + index``) and compute what
    its posterior file holds."""
    s = run.setup
    gen = torch.Generator().manual_seed(s.seed * 100003 + index)
    t0 = time.time()
    smp = run.sampler.sample(problem, y, s.n, generator=gen)
    seconds = time.time() - t0
    x_net, x_phys, particles, weights = _to_write(s.prior, smp, problem, s.n, gen)
    logz = _logz(method_spec(run.method), smp)
    chi = chi2_per_sample(problem, x_net, y)
    ppc = posterior_check(meta["path"], chi)
    products = _products(s.lcfg, problem, y, meta, x_phys, particles, weights)
    return ObservationPosterior(x_phys.cpu().numpy(), particles, weights, logz, chi, products, y.cpu().numpy(),
                                seconds, smp.info.get("header"), ppc, list(ood))


def write_observation(target, post: ObservationPosterior, meta, *, method: str, provenance: dict,
                      lcfg: LensingConfig, label: str | None = None) -> Path:
    """Write ``post`` (of the observation ``meta`` describes) as the posterior FITS ``target``
    (:func:`pipeline.io.posterior.write_posterior`); ``label``: the run's name in calibration tables
    (``LABEL``), for a baseline sampled beside the methods."""
    header = {**(post.header or {}), **({"LABEL": (label, "name in calibration tables")} if label else {})}
    write_posterior(target, post.x_phys, truth=meta.get("truth"), obs=post.obs, logz=post.logz,
                    particles=post.particles, weights=post.weights, chi2=post.chi["chi2_nu"],
                    src_pixscale=lcfg.geometry.source_pixscale, method=method, provenance=provenance,
                    seconds=post.seconds, obs_file=meta["path"], obs_pixscale=meta.get("pixscale"),
                    bunit=lcfg.sources.bunit, ood_warnings=post.ood, extra_header=header or None,
                    ppc=post.ppc.as_dict(), **post.products)
    return Path(target)


def _summary(run: MethodRun, post: ObservationPosterior, meta, target) -> dict:
    """The result entry of one observation, logged on one line."""
    stats, unit = post.products["source_stats"], post.products["flux_unit"]
    out = {"obs": meta["path"], "out": str(target), "seconds": post.seconds, "logz": post.logz,
           "chi2_median": float(np.median(post.chi["chi2_nu"])), "ppc": post.ppc.as_dict(), "source_stats": stats,
           "flux_unit": unit}
    log.info("%s %s: %.1f s, chi2_nu median %.3f, log Z %s, source flux %s %s, magnification %s, "
             "r_half %s arcsec", run.method, Path(meta["path"]).stem, post.seconds, out["chi2_median"],
             None if post.logz is None else round(post.logz["elbo"], 2), _fmt(stats["flux"]), unit,
             _fmt(stats["magnification"]), _fmt(stats["r_half"]))
    return out


def sample_observations(config_path, method, prior_dir, posterior_dir, obs_specs, out_dir=None, *, out_file=None,
                        png=None, n=None, seed=None, tuning=None, only=None, label=None) -> list[dict]:
    """Sample ``method``'s posterior for every observation; one posterior FITS per observation.

    Load the prior and every observation (each judged by the guard before any is sampled, so an ``error``
    policy refuses the whole call with one line and no output), build the sampler once (tuning its guidance
    scale if it has one, unless ``tuning`` gives the frozen record; the amortized posterior from
    ``posterior_dir``), then sample and write each observation in turn. Returns one dict per observation: obs,
    out, seconds, logz, chi2_median, ppc (:meth:`~pipeline.metrics.ppc.PPCResult.as_dict`: the posterior
    predictive check, also in the file's ``PPC*`` cards), source_stats (``{"flux" [flux_unit],
    "magnification", "r_half" [arcsec]}``, each posterior mean and 16th / 84th percentiles), flux_unit.
    ``only``: indices (in the sorted file order) of the observations to sample, the others skipped; each keeps
    its own seed, so a subset gives the same files as the whole run. ``label``: the run's name in calibration
    tables (the files' ``LABEL``; a ``baselines:`` item's name), else the method's.
    """
    setup = load_setup(config_path, prior_dir, n, seed)
    files = observation_files(obs_specs)
    loaded = [load_observation(f, setup.lcfg, device=setup.device, brightness=setup.brightness) for f in files]
    run = method_run(setup, method, prior_dir, posterior_dir, loaded[0][0], tuning)
    oods = [guard_observation(run, f, *obs) for f, obs in zip(files, loaded)]
    results = []
    for i, (path, (problem, y, meta), ood) in enumerate(zip(files, loaded, oods)):
        if only is not None and i not in only:
            continue
        post = sample_observation(run, problem, y, meta, i, ood)
        target = write_observation(Path(out_file) if out_file else Path(out_dir) / f"{path.stem}.fits", post, meta,
                                   method=method, provenance=run.provenance, lcfg=setup.lcfg, label=label)
        results.append(_summary(run, post, meta, target))
        if png:
            from pipeline.plots.lens import plot_posterior_file

            plot_posterior_file(target, png, obs_pixscale=meta.get("pixscale"), lens_curves=curves_from_header)
    return results


def _fmt(v: dict) -> str:
    """'mean [lo, hi]' of a summarised statistic, or 'n/a'."""
    if v["mean"] is None:
        return "n/a"
    return f"{v['mean']:.4g} [{v['lo']:.4g}, {v['hi']:.4g}]"
