"""Python API: reconstruct a lensed source from arrays in a notebook, no files or config path needed.

:func:`reconstruct` takes an image (a 2-D array with its noise, PSF and pixel scale; an astropy
``CCDData``; or an observation in the project's FITS format, as a path or an ``HDUList``) and a lens, and
returns a :class:`Reconstruction`: posterior samples of the unlensed source, their mean and spread, the
model and residual images, chi2, log Z and warnings. Arrays are packed into the observation format
(:func:`observation_hdul`) and read by :func:`pipeline.lensing.observation.load_observation`, so they get
the same checks, unit conversion, rebinning and cropping as a file; sampling and the posterior products are
:func:`pipeline.lensing.sample.sample_observation`, the code the ``sample`` command runs, so the same
observation, method and seed give bit-identical samples either way.

Checkpoints (a directory holding ``prior/`` and ``posterior/``), first found of: the ``checkpoints=``
argument, the environment variable ``LENSING_RTB_CHECKPOINTS``, the repository's ``data/pretrained`` when
the package runs from a source checkout. Config, first found of: ``config=`` (a YAML path),
``config.yaml`` inside the checkpoint directory (the config the checkpoints were made with), the
repository's ``config/config.yaml``. docs/api.md documents the arguments with an example.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData, InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.wcs import WCS

from pipeline.errors import InputFileError
from pipeline.io.fits import open_fits
from pipeline.lensing.config import GeometryConfig, NoiseConfig, load_lensing_config
from pipeline.lensing.interop import from_lenstronomy, from_pyautolens
from pipeline.lensing.observation import LENS_KEYS, load_observation, parse_lens
from pipeline.lensing.operator import LensParams, gaussian_psf
from pipeline.lensing.sample import (guard_observation, load_setup, method_run, sample_observation,
                                     write_observation)
from pipeline.lensing.simulate import lens_header, simulate_observation

CHECKPOINTS_ENV = "LENSING_RTB_CHECKPOINTS"
REPOSITORY = Path(__file__).resolve().parents[1]
PHOTOMETRY_KEYS = ("EXPTIME", "PHOTMJSR", "PHOTFNU", "PHOTFLAM", "PIXAR_A2", "PIXAR_SR")
"""Header keywords copied from a CCDData's ``meta`` into SCI: what unit conversion may need."""


def _bad(field_name: str, message: str) -> InputFileError:
    return InputFileError("reconstruct", message, field=field_name)


def find_checkpoints(checkpoints=None) -> Path:
    """The checkpoint directory (holding ``prior/`` and ``posterior/``): ``checkpoints``, else
    ``$LENSING_RTB_CHECKPOINTS``, else the source checkout's ``data/pretrained``; one-line error otherwise."""
    for where, d in (("checkpoints", checkpoints), (CHECKPOINTS_ENV, os.environ.get(CHECKPOINTS_ENV))):
        if d:
            if not (Path(d) / "prior").is_dir():
                raise InputFileError(d, "no prior/ checkpoint directory inside", field=where)
            return Path(d)
    shipped = REPOSITORY / "data" / "pretrained"
    if (shipped / "prior").is_dir():
        return shipped
    raise _bad("checkpoints", f"no checkpoints found: pass checkpoints=DIR (holding prior/ and posterior/), set "
                              f"{CHECKPOINTS_ENV}, or run from a source checkout, which ships data/pretrained")


def find_config(config, checkpoints: Path | None) -> Path:
    """``config``, else ``checkpoints/config.yaml`` (``checkpoints`` None: none), else the source checkout's
    ``config/config.yaml``."""
    if config is not None:
        if not Path(config).is_file():
            raise InputFileError(config, "config file not found", field="config")
        return Path(config)
    for cand in ([checkpoints / "config.yaml"] if checkpoints else []) + [REPOSITORY / "config" / "config.yaml"]:
        if cand.is_file():
            return cand
    raise _bad("config", "no config: pass config=PATH, or put the config the checkpoints were made with in their "
                         "directory as config.yaml")


def _lens_keywords(lens, lens_models=None, kwargs_data=None):
    """``lens`` as LensParams or a keyword dict: lenstronomy's ``kwargs_lens`` with ``lens_models`` (WORLD
    frame, or the ARRAY frame with lenstronomy's ``kwargs_data``) and PyAutoLens's mass profile, or
    (mass, shear), converted by :mod:`pipeline.lensing.interop`."""
    if lens_models is not None:
        return from_lenstronomy(lens, lens_models, frame="ARRAY" if kwargs_data is not None else "WORLD",
                                kwargs_data=kwargs_data)
    if isinstance(lens, tuple) and len(lens) == 2:
        return from_pyautolens(*lens)
    if hasattr(lens, "einstein_radius") or (isinstance(lens, dict) and "einstein_radius" in lens):
        return from_pyautolens(lens)
    return lens


def _lens_header(lens, lens_models=None, kwargs_data=None) -> fits.Header:
    """The lens keywords (LENSMOD, LENSFRAM, LENS_X0, ...) of ``lens`` (see :func:`_lens_keywords`)."""
    h = fits.Header()
    lens = _lens_keywords(lens, lens_models, kwargs_data)
    if isinstance(lens, LensParams):
        lens_header(lens, h)
    elif isinstance(lens, dict):
        params, frame = parse_lens(lens, "reconstruct [lens]")
        lens_header(params, h)
        h["LENSFRAM"] = frame
    else:
        raise _bad("lens", f"expected LensParams, a lens keyword dict, lenstronomy kwargs_lens with lens_models or "
                           f"a PyAutoLens mass profile, got {type(lens).__name__}")
    return h


def _noise_array(noise, shape, used) -> np.ndarray:
    """The 1-sigma map: ``noise`` broadcast to ``shape``, > 0 and finite on the ``used`` pixels."""
    if noise is None:
        raise _bad("noise", "required: the 1-sigma noise per pixel (array or scalar, the image's unit)")
    sigma = np.asarray(noise, dtype=np.float64)
    if sigma.ndim and sigma.shape != shape:
        raise _bad("noise", f"shape {sigma.shape} != image shape {shape}")
    sigma = np.broadcast_to(sigma, shape).copy()
    if not (np.isfinite(sigma[used]) & (sigma[used] > 0)).all():
        raise _bad("noise", "must be finite and > 0 on every used pixel")
    return sigma


def _psf_hdu(psf, pixel_scale: float, psf_pixel_scale) -> fits.ImageHDU:
    """PSF HDU from a FWHM [arcsec] (a Gaussian at half the pixel scale) or an array (normalised to sum 1,
    sampled at ``psf_pixel_scale`` [arcsec/pixel], default the image's)."""
    if psf is None:
        raise _bad("psf", "required: a PSF image (odd sizes) or its FWHM in arcsec")
    if np.ndim(psf) == 0:
        fwhm, samp = float(psf), pixel_scale / 2
        if not fwhm >= 0:
            raise _bad("psf", f"FWHM must be >= 0 arcsec, got {psf}")
        kernel = gaussian_psf(fwhm, samp, 2 * math.ceil(2 * fwhm / samp) + 1)
    else:
        kernel, samp = np.asarray(psf, dtype=np.float64), float(psf_pixel_scale or pixel_scale)
        if not (np.isfinite(kernel).all() and kernel.sum() > 0):
            raise _bad("psf", "must be finite with a positive sum")
        kernel = kernel / kernel.sum()
    hdu = fits.ImageHDU(kernel, name="PSF")
    hdu.header["PSFSAMP"] = (samp, "[arcsec/pixel]")
    return hdu


def _from_ccd(image: CCDData) -> tuple:
    """(data, 1-sigma or None, bad-pixel mask or None, unit, WCS header or None, photometry cards)."""
    unc, sigma = image.uncertainty, None
    if isinstance(unc, StdDevUncertainty):
        sigma = np.asarray(unc.array, dtype=np.float64)
    elif isinstance(unc, VarianceUncertainty):
        sigma = np.sqrt(np.asarray(unc.array, dtype=np.float64))
    elif isinstance(unc, InverseVariance):
        with np.errstate(divide="ignore"):
            sigma = 1 / np.sqrt(np.asarray(unc.array, dtype=np.float64))
    elif unc is not None:
        raise _bad("image.uncertainty", f"unsupported uncertainty type {type(unc).__name__}")
    meta = image.meta or {}
    cards = {k: meta[k] for k in PHOTOMETRY_KEYS if k in meta}
    wcs = image.wcs.to_header() if image.wcs is not None else None
    unit = image.unit.to_string() if image.unit is not None else None
    return np.asarray(image.data, dtype=np.float64), sigma, image.mask, unit, wcs, cards


def observation_hdul(image, noise=None, psf=None, lens=None, *, pixel_scale=None, psf_pixel_scale=None,
                     mask=None, unit=None, wcs=None, lens_models=None, kwargs_data=None) -> fits.HDUList:
    """Pack arrays into the observation format (docs/observations.md): SCI, NOISE, PSF, MASK and the lens
    keywords in the primary header. ``image``: 2-D array or CCDData [``unit``: an astropy unit string, default
    ``lensing.noise.bunit``]; ``noise``: 1 sigma per pixel, array or scalar [the image's unit] (a CCDData's
    uncertainty when None); ``pixel_scale`` [arcsec/pixel] (or ``wcs``: an astropy WCS or header in arcsec or
    degrees, which a WORLD-frame lens is given in); ``mask``: True where a pixel is ignored (numpy's and
    CCDData's convention); ``psf``, ``lens``, ``lens_models`` and ``kwargs_data`` as :func:`reconstruct` takes
    them (the pixel scale defaults to that of ``kwargs_data``'s ``transform_pix2angle``)."""
    extra = {}
    if isinstance(image, CCDData):
        image, ccd_sigma, ccd_mask, ccd_unit, ccd_wcs, extra = _from_ccd(image)
        noise = ccd_sigma if noise is None else noise
        mask = ccd_mask if mask is None else mask
        unit, wcs = unit or ccd_unit, wcs if wcs is not None else ccd_wcs
    if pixel_scale is None and kwargs_data is not None and "transform_pix2angle" in kwargs_data:
        pixel_scale = math.sqrt(abs(np.linalg.det(np.asarray(kwargs_data["transform_pix2angle"], float))))
    data = np.asarray(image, dtype=np.float64)
    if data.ndim != 2:
        raise _bad("image", f"expected a 2-D image, got shape {data.shape}")
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if bad.shape != data.shape:
        raise _bad("mask", f"shape {bad.shape} != image shape {data.shape}")
    sci = fits.ImageHDU(data, name="SCI")
    if wcs is not None:
        sci.header.update(wcs.to_header() if isinstance(wcs, WCS) else wcs)
    if pixel_scale is not None:
        if not float(pixel_scale) > 0:
            raise _bad("pixel_scale", f"must be > 0 arcsec/pixel, got {pixel_scale}")
        sci.header["PIXSCALE"] = (float(pixel_scale), "[arcsec/pixel]")
    elif wcs is None:
        raise _bad("pixel_scale", "required for an array image without a WCS (arcsec/pixel)")
    sci.header.update(extra)
    if unit:
        sci.header["BUNIT"] = str(unit)
    pix = float(pixel_scale) if pixel_scale is not None else float(np.sqrt(abs(np.linalg.det(
        WCS(sci.header).pixel_scale_matrix)))) * 3600.0
    if lens is None:
        raise _bad("lens", "required: the lens model the source is reconstructed behind")
    hdus = [fits.PrimaryHDU(header=_lens_header(lens, lens_models, kwargs_data)), sci,
            fits.ImageHDU(_noise_array(noise, data.shape, ~bad), name="NOISE"), _psf_hdu(psf, pix, psf_pixel_scale)]
    if bad.any():
        hdus.append(fits.ImageHDU(bad.astype(np.uint8), name="MASK"))
        hdus[-1].header["MASKTYPE"] = ("BAD", "nonzero = pixel ignored")
    return fits.HDUList(hdus)


def _file_hdul(image, lens, lens_models=None, kwargs_data=None) -> tuple:
    """(observation, name) for a path or HDUList in the observation format; a given ``lens`` replaces the
    file's lens keywords."""
    if lens is None:
        return image, ("HDUList" if isinstance(image, fits.HDUList) else str(image))
    if isinstance(image, fits.HDUList):
        hdul = fits.HDUList([h.copy() for h in image])
    else:
        with open_fits(image) as src:
            hdul = fits.HDUList([h.copy() for h in src])
    for h in hdul[:1] + ([hdul["SCI"]] if "SCI" in hdul else []):
        for key in ("LENSMOD", "LENSFRAM", *LENS_KEYS.values()):
            h.header.remove(key, ignore_missing=True)
    hdul[0].header.update(_lens_header(lens, lens_models, kwargs_data))
    return hdul, "HDUList" if isinstance(image, fits.HDUList) else str(image)


@dataclass
class Reconstruction:
    """A source reconstruction: the posterior of the unlensed source given the image and the lens.

    ``samples`` (n, ny, nx), ``mean``, ``std`` [``source_unit``, a surface brightness] on the source grid
    (``source_pixscale`` [arcsec/pixel], origin at the array centre); ``data``, ``model`` (the image of
    ``mean``) [``data_unit``, flux per pixel] and ``residual`` ((data - model) / sigma, dimensionless, NaN
    where masked) on the image grid inference used (``image_pixscale`` [arcsec/pixel]); ``chi2``: medians
    over the samples of chi2 per degree of freedom over the image (``image``) and over each sample's arc
    (``arc``: pixels where its model exceeds sigma), and the per-sample arrays; ``logz`` the method's log
    evidence estimates [nats] (None when it has none); ``warnings``: the guard's out-of-distribution
    findings, the observation's reading warnings and a failed posterior predictive check; ``ppc`` that check
    (:meth:`pipeline.metrics.ppc.PPCResult.as_dict`: ``flag`` and the chi2 medians against the band an
    exact sampler stays inside); ``lens`` the lens in the array frame; ``method`` and
    ``provenance`` as the posterior file records them; ``source_stats`` the source's flux [``unit``],
    magnification and half-light radius [arcsec]; ``truth`` the file's TRUTH source, when it has one."""

    samples: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    data: np.ndarray
    model: np.ndarray
    residual: np.ndarray
    chi2: dict
    logz: dict | None
    warnings: list[str]
    ppc: dict
    lens: LensParams
    method: str
    provenance: dict
    source_pixscale: float
    image_pixscale: float
    source_unit: str
    data_unit: str
    source_stats: dict
    truth: np.ndarray | None = None
    _write: tuple = field(repr=False, default=())

    def __repr__(self) -> str:
        return (f"<Reconstruction {self.method}: {len(self.samples)} samples, chi2_nu image {self.chi2['image']:.3f}, "
                f"{len(self.warnings)} warnings>")

    def to_fits(self, path) -> Path:
        """Write the posterior FITS file the ``sample`` command writes (docs/posterior-files.md)."""
        post, meta, lcfg = self._write
        return write_observation(path, post, meta, method=self.method, provenance=self.provenance, lcfg=lcfg)

    def summary(self) -> str:
        """A few lines: method, samples, chi2 medians, log Z, source flux and warnings."""
        flux = self.source_stats["flux"]
        lines = [f"{self.method}: {len(self.samples)} samples of a {self.mean.shape[0]}x{self.mean.shape[1]} source "
                 f"at {self.source_pixscale:g} arcsec/pixel",
                 f"chi2_nu median: image {self.chi2['image']:.3f}, arc {self.chi2['arc']:.3f}",
                 "log Z: " + ("n/a" if not self.logz else f"{self.logz['elbo']:.2f} nats (ELBO)")]
        if flux["mean"] is not None:
            lines.append(f"source flux {flux['mean']:.4g} [{flux['lo']:.4g}, {flux['hi']:.4g}] "
                         f"{self.source_stats.get('unit', '')}".rstrip())
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self, n_show: int = 3):
        """A matplotlib Figure: data, model and residual above; posterior mean, std and ``n_show`` samples below
        (arcsec axes, asinh stretch, units on the colour bars); display it or ``fig.savefig(path)``."""
        from pipeline.plots.lens import lens_figure
        from pipeline.plots.common import plt

        fig = lens_figure(mean=self.mean, std=self.std, samples=self.samples, src_pixscale=self.source_pixscale,
                          truth=self.truth,
                           obs=self.data, obs_pixscale=self.image_pixscale, model=self.model,
                           residual=self.residual, bunit=self.source_unit, image_bunit=self.data_unit,
                          n_show=n_show, title=self.method, chi2=self.chi2["image"])
        plt.close(fig)  # pyplot lets go of it: shown once where it is displayed, not again by the backend
        return fig


def _observation(image, noise, psf, lens, kw, data_unit: str) -> tuple:
    """(observation for load_observation, its name in messages); arrays without a unit are in ``data_unit``.
    ``kw``: observation_hdul's keyword arguments."""
    if isinstance(image, (str, os.PathLike, fits.HDUList)):
        lens_kw = {k: kw.pop(k) for k in ("lens_models", "kwargs_data")}
        given = [k for k, v in (("noise", noise), ("psf", psf), *kw.items()) if v is not None]
        if given:
            raise _bad(given[0], "comes from the observation file; give arrays or a CCDData to set it")
        return _file_hdul(image, lens, **lens_kw)
    if kw["unit"] is None and not (isinstance(image, CCDData) and image.unit is not None):
        kw = {**kw, "unit": data_unit}
    return observation_hdul(image, noise, psf, lens, **kw), "image"


def _checkpoint_dirs(checkpoints, prior, posterior, config) -> tuple[Path, Path, Path]:
    """(prior, posterior, config) directories and file: the given ones, the rest found as documented."""
    ckpt = find_checkpoints(checkpoints) if prior is None or posterior is None else None
    prior_dir = Path(prior) if prior is not None else ckpt / "prior"
    posterior_dir = Path(posterior) if posterior is not None else ckpt / "posterior"
    return prior_dir, posterior_dir, find_config(config, ckpt)


def reconstruct(image, noise=None, psf=None, lens=None, *, pixel_scale=None, psf_pixel_scale=None, mask=None,
                unit=None, wcs=None, lens_models=None, kwargs_data=None, method="rtb_amortized", n=None, seed=None,
                config=None, checkpoints=None, prior=None, posterior=None, device=None) -> Reconstruction:
    """Posterior samples of the unlensed source behind ``lens`` given ``image``.

    ``image``: a 2-D array (with ``noise``, ``psf`` and ``pixel_scale`` [arcsec/pixel] or ``wcs``), an astropy
    CCDData (its uncertainty, mask, WCS and unit), or an observation file / HDUList in the project's format.
    ``noise``: 1 sigma per pixel, array or scalar, in the image's ``unit`` (default ``lensing.noise.bunit``,
    electron/s); ``psf``: an image (odd sizes, sum 1, sampled at ``psf_pixel_scale``, default the image's) or a
    Gaussian FWHM [arcsec]; ``mask``: True where a pixel is ignored. ``lens``: LensParams, the project's lens
    keyword dict (model, x0, y0, q, phi, rein, g1, g2, ...; frame ARRAY or WORLD), lenstronomy's
    ``kwargs_lens`` with ``lens_models`` (e.g. ['SIE', 'SHEAR']; in the ARRAY frame through lenstronomy's
    ``kwargs_data``, else the WORLD frame of ``wcs``), or a PyAutoLens mass profile or (mass, shear).
    ``method``: any method of the ``sample`` command; ``n`` samples (default ``posterior.n_samples``), ``seed``
    (default ``posterior.seed``); ``checkpoints``: a directory holding prior/ and posterior/ (or ``prior`` and
    ``posterior`` themselves); ``config``: a YAML path; ``device``: auto, cpu or cuda (default the config's).
    Bad inputs raise a one-line :class:`~pipeline.errors.InputFileError` naming the argument."""
    if n is not None and n < 2:
        raise _bad("n", f"must be >= 2, got {n}")
    prior_dir, posterior_dir, cfg_path = _checkpoint_dirs(checkpoints, prior, posterior, config)
    kw = {"pixel_scale": pixel_scale, "psf_pixel_scale": psf_pixel_scale, "mask": mask, "unit": unit, "wcs": wcs,
          "lens_models": lens_models, "kwargs_data": kwargs_data}
    obs, name = _observation(image, noise, psf, lens, kw, load_lensing_config(cfg_path).noise.bunit)
    setup = load_setup(cfg_path, prior_dir, n, seed, device)
    problem, y, meta = load_observation(obs, setup.lcfg, device=setup.device, brightness=setup.brightness, name=name)
    run = method_run(setup, method, prior_dir, posterior_dir, problem)
    post = sample_observation(run, problem, y, meta, 0, guard_observation(run, name, problem, y, meta))
    arc = post.chi["chi2_arc_nu"]
    chi2 = {"image": float(np.median(post.chi["chi2_nu"])),
            "arc": float(np.nanmedian(arc)) if np.isfinite(arc).any() else float("nan"),
            "image_per_sample": post.chi["chi2_nu"], "arc_per_sample": arc, "nu": post.chi["nu"]}
    pr = post.products
    return Reconstruction(samples=post.x_phys, mean=pr["mean"], std=pr["std"], data=post.obs, model=pr["model"],
                          residual=pr["resid"], chi2=chi2, logz=post.logz, ppc=post.ppc.as_dict(),
                          warnings=list(meta["warnings"]) + post.ood
                          + ([f"posterior predictive check: {post.ppc.message()}"] if post.ppc.flag else []),
                          lens=meta["lens"], method=method, provenance=run.provenance,
                          source_pixscale=setup.lcfg.geometry.source_pixscale, image_pixscale=meta["pixscale"],
                          source_unit=setup.lcfg.sources.bunit, data_unit=setup.lcfg.noise.bunit,
                          source_stats={**pr["source_stats"], "unit": pr["flux_unit"]}, truth=meta.get("truth"),
                          _write=(post, meta, setup.lcfg))

EXAMPLE_LENS = {"model": "SIE+SHEAR", "x0": 0.03, "y0": -0.02, "q": 0.8, "phi": 0.6, "rein": 0.7, "g1": 0.02,
                "g2": -0.01}
"""The lens of :func:`example_observation`: array frame, arcsec and radians, inside the trained ranges."""


def example_observation(seed: int = 0, peak_snr: float = 25.0, noise: float = 0.2573) -> dict:
    """A simulated observation for trying :func:`reconstruct`: an elliptical exponential source behind
    :data:`EXAMPLE_LENS` on the default geometry (32x32 pixels at 0.1 arcsec/pixel, Gaussian PSF of FWHM
    0.15 arcsec), Gaussian noise of ``noise`` [electron/s per pixel; the shipped posterior's trained level]
    and the source scaled so the noiseless image peaks at ``peak_snr`` sigma. Returns reconstruct's keyword
    arguments image, noise, psf [FWHM, arcsec], lens, pixel_scale, and truth (the source [electron/(s
    arcsec2)] on the 32x32 grid at 0.05 arcsec/pixel)."""
    geom = GeometryConfig()
    c = (np.arange(geom.source_npix) - (geom.source_npix - 1) / 2) * geom.source_pixscale
    xx, yy = np.meshgrid(c - 0.04, c + 0.02)
    u, v = xx * np.cos(0.4) + yy * np.sin(0.4), -xx * np.sin(0.4) + yy * np.cos(0.4)
    shape = np.exp(-np.hypot(u, v / 0.6) / 0.1)
    lens = parse_lens(EXAMPLE_LENS, "EXAMPLE_LENS")[0]
    unit_peak = simulate_observation(shape, lens, geom, NoiseConfig(sigma=1.0), np.random.default_rng(seed))
    truth = shape * peak_snr * noise / unit_peak.header["PEAKSNR"][0]
    obs = simulate_observation(truth, lens, geom, NoiseConfig(sigma=noise), np.random.default_rng(seed))
    return {"image": obs.sci, "noise": obs.noise, "psf": geom.psf_fwhm, "lens": dict(EXAMPLE_LENS),
            "pixel_scale": geom.image_pixscale, "truth": obs.truth}
