"""The conditions an amortized lensing posterior was trained on, and a guard that compares an
observation with them.

An amortized posterior is only trustworthy for observations like those of its training pool. At
export, :func:`measure_trained_conditions` records what the pool covered (``trained_on`` in the
posterior's ``hparams.json``): the image and source grids, pixel scales and supersampling, the PSF
FWHM, the noise level, the lens model and the ranges its parameters were drawn from, the mask
fraction, and the ranges of peak SNR and image flux of the pool's noiseless images and of the source flux
of its truths.

:func:`check_observation` compares one observation (as read by
:func:`pipeline.lensing.observation.load_observation`) with that record, condition by condition;
:func:`apply_policy` then raises one line for a condition whose policy (``posterior.guard``) is
``error`` and returns the reasons for those that only warn.

Units: angles in arcsec, pixel scales in arcsec/pixel, noise and image flux in the flux-per-pixel unit
of the training pool (``bunit``, default electron/s), source flux in electron/s (surface brightness
summed times the source pixel area), position angles in radians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import InputFileError
from pipeline.io.checkpoint import load_checkpoint

# condition name -> (header keyword or HDU the observation gives it in, what it is)
CONDITIONS = {
    "image_grid": ("SCI.NAXIS1", "image grid"),
    "pixel_scale": ("SCI.CD1_1 / PIXSCALE", "image pixel scale"),
    "source_grid": ("SRCNPIX / SRCPIXSC", "source grid"),
    "supersample": ("lensing.geometry.supersample", "supersampling"),
    "psf": ("PSF", "PSF FWHM"),
    "noise": ("NOISE", "noise level"),
    "lens_model": ("LENSMOD", "lens model"),
    "lens_rein": ("LENS_RE", "Einstein radius"),
    "lens_q": ("LENS_Q", "axis ratio"),
    "lens_phi": ("LENS_PHI", "position angle"),
    "lens_center": ("LENS_X0 / LENS_Y0", "lens centre"),
    "lens_slope": ("LENS_T", "EPL slope"),
    "lens_shear": ("SHEAR_G1 / SHEAR_G2", "external shear"),
    "mask": ("MASK", "masked fraction"),
    "peak_snr": ("SCI / NOISE", "peak SNR"),
    "flux": ("SCI", "image flux"),
}

MEASURED_TRUTHS = 1024  # pool truths whose images (with every pool lens) give the peak SNR and flux ranges
_EPS = 1e-9


@dataclass
class Verdict:
    """One condition's outcome: ``inside`` or not, with a one-line ``reason`` when outside."""

    condition: str
    inside: bool
    reason: str = ""
    keyword: str = ""


def _span(values) -> list[float]:
    a = np.asarray(values, dtype=np.float64)
    return [float(a.min()), float(a.max())]


def measure_trained_conditions(lcfg, sigma: float, pool, truths, prior, *, source: str = "pool") -> dict:
    """The ``trained_on`` record of a training pool.

    ``lcfg``: the lensing config the pool was built from (grids, PSF, lens ranges: the support of the
    lens draws); ``sigma``: the pool's fixed noise level [flux per pixel]; ``pool``: its
    :class:`~pipeline.lensing.amortized.MultiLensProblem`; ``truths``: its prior-chain truths (network
    units; the first ``MEASURED_TRUTHS`` are used). The peak SNR (noiseless peak / NOISE) and image flux
    ranges are measured on every (lens, truth) pair, the source flux range on every truth."""
    g, lens = lcfg.geometry, lcfg.lens
    truths = truths[:MEASURED_TRUTHS]
    snr, image_flux = [], []
    with torch.no_grad():
        for problem in pool.problems:
            model = problem.forward(truths)
            snr.append((model / problem.sigma).amax(dim=(-2, -1)))
            image_flux.append(model.sum(dim=(-2, -1)))
    snr, image_flux = torch.cat(snr).cpu().numpy(), torch.cat(image_flux).cpu().numpy()
    phys = prior.to_physical(truths).reshape(truths.shape[0], -1).double()
    source_flux = (phys.sum(1) * g.source_pixscale ** 2).cpu().numpy()
    rec = {
        "image_npix": g.image_npix, "image_pixscale": g.image_pixscale, "source_npix": g.source_npix,
        "source_pixscale": g.source_pixscale, "supersample": g.supersample, "psf_fwhm": g.psf_fwhm,
        "noise_sigma": [float(sigma), float(sigma)], "bunit": lcfg.noise.bunit,
        "lens_model": lens.model, "rein": list(lens.rein), "q": list(lens.q), "phi": list(lens.phi),
        "center": lens.center, "shear_max": lens.shear_max, "mask_fraction": [0.0, 0.0],
        "peak_snr": _span(snr), "image_flux": _span(image_flux), "source_flux": _span(source_flux),
        "measured_on": {"lenses": len(pool), "truths": int(truths.shape[0]), "from": source},
    }
    if lens.model == "EPL":
        rec["t"] = list(lens.t)
    return rec


# ----------------------------------------------------------------------------------------- checks
def _in(v, lo_hi, rtol=0.0) -> bool:
    lo, hi = lo_hi
    return lo * (1 - rtol) - _EPS <= v <= hi * (1 + rtol) + _EPS


def _fmt(lo_hi) -> str:
    return f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]"


def _phi_inside(phi: float, lo_hi) -> bool:
    """Position angles are periodic in pi (an ellipse turned by pi is the same ellipse)."""
    lo, hi = lo_hi
    if hi - lo >= math.pi - 1e-6:
        return True
    return _in(lo + (phi - lo) % math.pi, lo_hi)


def observed_quantities(problem, y, meta: dict) -> dict:
    """The observation's values of every condition, in the record's units: noise and flux in flux per
    pixel (a surface-brightness SCI is multiplied by the pixel area), the noise level as the median
    NOISE over used pixels."""
    mask = np.asarray(meta["mask"], dtype=bool)
    to_flux = meta["pixscale"] ** 2 / meta["unit_factor"]
    sigma = problem.sigma.detach().cpu().numpy()
    data = y.detach().cpu().numpy()
    lens = meta["lens"]
    return {
        "image_shape": tuple(meta["image_shape"]), "pixscale": float(meta["pixscale"]),
        "source_npix": int(meta["source_npix"]), "source_pixscale": float(meta["source_pixscale"]),
        "supersample": int(meta["supersample"]), "psf_fwhm": float(meta["psf_fwhm"]),
        "noise": float(np.median(sigma[mask])) * to_flux if mask.any() else float("nan"),
        "lens": lens, "shear": math.hypot(lens.g1, lens.g2), "mask_fraction": float(meta["mask_fraction"]),
        "peak_snr": float(meta["peak_snr_data"]), "flux": float(data[mask].sum()) * to_flux,
    }


def _grid_checks(rec, obs, gcfg) -> list[Verdict]:
    n = rec["image_npix"]
    v = [Verdict("image_grid", obs["image_shape"] == (n, n),
                 f"image {obs['image_shape'][0]}x{obs['image_shape'][1]}, trained on {n}x{n}"),
         Verdict("pixel_scale", abs(obs["pixscale"] / rec["image_pixscale"] - 1) <= gcfg.pixscale_rtol,
                 f"pixel scale {obs['pixscale']:.4g}\"/px, trained on {rec['image_pixscale']:.4g}\"/px"),
         Verdict("source_grid", obs["source_npix"] == rec["source_npix"]
                 and abs(obs["source_pixscale"] / rec["source_pixscale"] - 1) <= gcfg.pixscale_rtol,
                 f"source grid {obs['source_npix']} px at {obs['source_pixscale']:.4g}\"/px, trained on "
                 f"{rec['source_npix']} px at {rec['source_pixscale']:.4g}\"/px"),
         Verdict("supersample", obs["supersample"] == rec["supersample"],
                 f"supersampling {obs['supersample']}, trained with {rec['supersample']}")]
    fwhm, t_fwhm = obs["psf_fwhm"], rec["psf_fwhm"]
    psf_ok = abs(fwhm - t_fwhm) <= gcfg.psf_rtol * max(t_fwhm, 1e-12) if t_fwhm > 0 else fwhm <= _EPS
    v.append(Verdict("psf", psf_ok, f"PSF FWHM {fwhm:.4g}\", trained on {t_fwhm:.4g}\""))
    v.append(Verdict("noise", _in(obs["noise"], rec["noise_sigma"], gcfg.noise_rtol),
                     f"median noise {obs['noise']:.4g} {rec.get('bunit', '')}, trained on "
                     f"{_fmt(rec['noise_sigma'])}".replace("  ", " ")))
    return v


def _lens_checks(rec, obs) -> list[Verdict]:
    lens = obs["lens"]
    c = rec["center"]
    v = [Verdict("lens_model", lens.model == rec["lens_model"], f"lens model {lens.model}, trained on "
                 f"{rec['lens_model']}"),
         Verdict("lens_rein", _in(lens.rein, rec["rein"]), f"Einstein radius {lens.rein:.4g}\" outside the "
                 f"trained {_fmt(rec['rein'])}"),
         Verdict("lens_q", _in(lens.q, rec["q"]), f"axis ratio {lens.q:.4g} outside the trained {_fmt(rec['q'])}"),
         Verdict("lens_phi", _phi_inside(lens.phi, rec["phi"]), f"position angle {lens.phi:.4g} rad outside "
                 f"the trained {_fmt(rec['phi'])}"),
         Verdict("lens_center", max(abs(lens.x0), abs(lens.y0)) <= c + _EPS, f"lens centre ({lens.x0:.4g}, "
                 f"{lens.y0:.4g})\" beyond the trained |x0|, |y0| <= {c:.4g}\""),
         Verdict("lens_shear", obs["shear"] <= rec["shear_max"] + _EPS, f"shear |gamma| = {obs['shear']:.4g} "
                 f"above the trained maximum {rec['shear_max']:.4g}")]
    if lens.model == "EPL" and "t" in rec:
        v.append(Verdict("lens_slope", _in(lens.t, rec["t"]), f"EPL slope {lens.t:.4g} outside the trained "
                         f"{_fmt(rec['t'])}"))
    return v


def _data_checks(rec, obs, gcfg) -> list[Verdict]:
    mf = rec["mask_fraction"]
    v = [Verdict("mask", obs["mask_fraction"] <= mf[1] + gcfg.mask_slack + _EPS,
                 f"masked fraction {obs['mask_fraction']:.3g}, trained on {_fmt(mf)} (+{gcfg.mask_slack:g} "
                 "allowed)")]
    if "peak_snr" in rec:
        v.append(Verdict("peak_snr", _in(obs["peak_snr"], rec["peak_snr"]), f"peak SNR {obs['peak_snr']:.4g} "
                         f"outside the trained {_fmt(rec['peak_snr'])}"))
    if "image_flux" in rec:
        v.append(Verdict("flux", _in(obs["flux"], rec["image_flux"]), f"image flux {obs['flux']:.4g} "
                         f"{rec.get('bunit', '')} outside the trained {_fmt(rec['image_flux'])}"))
    return v


def check_observation(record: dict, problem, y, meta: dict, gcfg) -> list[Verdict]:
    """Every condition of ``record`` (a posterior's ``trained_on``) judged for one observation;
    ``gcfg`` is the ``posterior.guard`` section (its tolerances)."""
    obs = observed_quantities(problem, y, meta)
    verdicts = _grid_checks(record, obs, gcfg) + _lens_checks(record, obs) + _data_checks(record, obs, gcfg)
    for v in verdicts:
        v.keyword = CONDITIONS[v.condition][0]
    return verdicts


def policy_of(gcfg, condition: str) -> str:
    """``warn`` or ``error`` for ``condition`` in the ``posterior.guard`` section."""
    return getattr(gcfg, condition)


def apply_policy(path, verdicts: list[Verdict], gcfg) -> list[str]:
    """Raise a one-line :class:`InputFileError` naming ``path`` and the keyword for the first condition
    outside whose policy is ``error``; return the one-line reasons of those that only warn."""
    for v in verdicts:
        if not v.inside and policy_of(gcfg, v.condition) == "error":
            raise InputFileError(path, f"outside the posterior's trained conditions: {v.reason} (policy "
                                 f"posterior.guard.{v.condition}: error)", field=v.keyword)
    return [f"{v.condition}: {v.reason}" for v in verdicts if not v.inside]


def trained_record(hparams: dict, posterior_dir) -> dict:
    """The posterior's ``trained_on`` record. An export made before the record existed gives the
    conditions its ``lensing`` entry holds (grids, PSF, noise level, lens ranges; no peak SNR or flux
    ranges, which are then not judged); one line naming its hparams.json when it has neither."""
    hp = hparams or {}
    if hp.get("trained_on"):
        return hp["trained_on"]
    old = hp.get("lensing")
    if not old:
        raise InputFileError(f"{posterior_dir}/hparams.json", "the posterior records no trained conditions; "
                             "re-export it with finetune-posterior", field="trained_on")
    g, lens, sigma = old["geometry"], old["lens_ranges"], float(old["noise_sigma"])
    rec = {k: g[k] for k in ("image_npix", "image_pixscale", "source_npix", "source_pixscale", "supersample",
                             "psf_fwhm")}
    rec.update({"noise_sigma": [sigma, sigma], "lens_model": lens["model"], "rein": lens["rein"], "q": lens["q"],
                "phi": lens["phi"], "center": lens["center"], "shear_max": lens["shear_max"],
                "mask_fraction": [0.0, 0.0]})
    if lens["model"] == "EPL":
        rec["t"] = lens["t"]
    return rec


def read_trained_record(posterior_dir) -> dict:
    """The ``trained_on`` record of the posterior checkpoint at ``posterior_dir`` (its networks unread)."""
    ck = load_checkpoint(posterior_dir, names=[])
    if ck.hparams.get("kind") != "rtb_posterior":
        raise InputFileError(ck.path, "not an RTB posterior checkpoint", field="kind")
    return trained_record(ck.hparams, ck.path)
