"""Simulated lensed observations and their FITS files.

One file per observation, ``obs-0000.fits`` ... in the output directory, plus ``manifest.json`` (file
names, lens parameters, source index, peak SNR), written last so a directory with a manifest is complete.
:func:`simulate_set` lenses the given truths with the inference operator itself (the prior-drawn set:
exact under the chain); :mod:`pipeline.lensing.heldout` renders held-out sets with a finer forward model.

File layout: primary HDU with the lens keywords (array frame, ``LENSFRAM='ARRAY'``): LENSMOD
('SIE+SHEAR' / 'EPL+SHEAR'), LENS_X0, LENS_Y0 [arcsec], LENS_Q, LENS_PHI [rad, CCW from +x],
LENS_RE [arcsec], LENS_T (EPL), SHEAR_G1, SHEAR_G2 (shear centred on the array origin), Z_LENS, Z_SRC,
SRCNPIX, SRCPIXSC [arcsec/px], PIXSCALE, BUNIT, provenance. ImageHDUs: SCI (flux per pixel, BUNIT),
NOISE (1 sigma, same unit), PSF (odd, sum 1, PSFSAMP [arcsec/px]; the optical PSF without pixel response
at the supersampled scale), TRUTH (the true source, surface brightness, source-plane WCS), optional MASK
(1 = used). Image WCS: CTYPE 'OFFSET_X'/'OFFSET_Y', CUNIT arcsec, CDELT = +PIXSCALE (the array frame),
CRPIX = (n+1)/2, CRVAL = 0. Written with checksums.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits
from tqdm import tqdm

from pipeline import __version__
from pipeline.io.atomic import atomic_directory
from pipeline.io.fits import write_fits_atomic
from pipeline.lensing.config import BrightnessConfig, GeometryConfig, LensConfig, NoiseConfig
from pipeline.lensing.lens_prior import draw_lens
from pipeline.lensing.operator import LensingProblem, LensParams, build_simulator, caustics_forward, gaussian_psf
from pipeline.runtime import tqdm_disable

log = logging.getLogger(__name__)


@dataclass
class Observation:
    """An observation in memory. Arrays float32; ``sci``/``noise`` in ``bunit`` (flux per pixel)."""

    sci: np.ndarray
    noise: np.ndarray
    psf: np.ndarray
    psfsamp: float
    lens: LensParams
    pixscale: float
    source_npix: int
    source_pixscale: float
    truth: np.ndarray | None = None
    mask: np.ndarray | None = None          # bool, True = used
    bunit: str = "electron/s"
    source_bunit: str = "electron/(s arcsec2)"
    header: dict = field(default_factory=dict)   # extra primary keywords (provenance)


def typical_lens(cfg: LensConfig) -> LensParams:
    """The middle of the ranges, no shear: the reference lens for the noise level."""
    mid = lambda r: 0.5 * (r[0] + r[1])  # noqa: E731
    return LensParams(model=cfg.model, q=mid(cfg.q), phi=mid(cfg.phi), rein=mid(cfg.rein),
                      t=mid(cfg.t) if cfg.model == "EPL" else 1.0, z_lens=cfg.z_lens, z_source=cfg.z_source)


def default_psf(geometry: GeometryConfig) -> tuple[np.ndarray, float]:
    """The configured Gaussian PSF at the supersampled scale and that scale (PSFSAMP)."""
    samp = geometry.image_pixscale / geometry.supersample
    return gaussian_psf(geometry.psf_fwhm, samp, geometry.psf_npix), samp


def make_problem(lens: LensParams, geometry: GeometryConfig, sigma, mask=None, psf: np.ndarray | None = None,
                 brightness: BrightnessConfig | None = None, flux_per_pixel: bool = True, device="cpu",
                 image_shape=None) -> LensingProblem:
    """The sparse LensingProblem of ``lens`` on the configured grids. SCI is flux per pixel by default
    (caustics' mean surface brightness x pixel area)."""
    if psf is None:
        psf, _ = default_psf(geometry)
    b = brightness or BrightnessConfig()
    n = geometry.image_npix
    shape = tuple(image_shape) if image_shape is not None else (n, n)
    sigma = torch.as_tensor(np.broadcast_to(np.asarray(sigma, np.float32), shape).copy())
    return LensingProblem.from_lens(
        lens, image_shape=shape, image_pixscale=geometry.image_pixscale,
        source_npix=geometry.source_npix, source_pixscale=geometry.source_pixscale,
        supersample=geometry.supersample, psf=psf, sigma=sigma, mask=mask,
        unit_factor=geometry.image_pixscale ** 2 if flux_per_pixel else 1.0,
        scale=b.scale, offset=b.offset, device=device)


def typical_noise_sigma(sources: np.ndarray, geometry: GeometryConfig, lens_cfg: LensConfig,
                        target_peak_snr: float, n_max: int = 128, seed: int = 0) -> float:
    """sigma [SCI units, flux per pixel] = median over up to ``n_max`` sources, each lensed by a lens
    drawn from ``lens_cfg`` (fixed ``seed``), of the noiseless image peak, divided by
    ``target_peak_snr``. A property of the source *population* and lens ranges, never of the truth of
    an individual observation; the median observation then has peak SNR ~ target."""
    if len(sources) == 0:
        raise ValueError("no sources to set the noise level from")
    rng = np.random.default_rng(seed)
    n = geometry.image_npix
    psf, _ = default_psf(geometry)
    peaks = []
    for src in np.asarray(sources[:n_max], np.float32):
        sim = build_simulator(draw_lens(lens_cfg, rng), (n, n), geometry.image_pixscale, geometry.source_npix,
                              geometry.source_pixscale, geometry.supersample, psf)
        peaks.append(float(caustics_forward(sim, torch.as_tensor(src)[None]).max()) * geometry.image_pixscale ** 2)
    return float(np.median(peaks)) / target_peak_snr


def simulate_observation(truth: np.ndarray, lens: LensParams, geometry: GeometryConfig, noise: NoiseConfig,
                         rng: np.random.Generator, problem: LensingProblem | None = None,
                         source_bunit: str = "electron/(s arcsec2)") -> Observation:
    """Lens ``truth`` (n_s, n_s) [surface brightness], convolve, pixelise and add Gaussian noise.

    ``noise.sigma`` must be set (the fixed map level in SCI units). With ``noise.poisson`` the source's
    Poisson variance max(model, 0) / exposure_time is added to the variance and written into NOISE
    (realism sets only). ``problem`` may pass a prebuilt operator for ``lens`` (physical units used)."""
    if noise.sigma is None:
        raise ValueError("noise.sigma must be resolved before simulating (see typical_noise_sigma)")
    psf, samp = default_psf(geometry)
    x = torch.as_tensor(np.asarray(truth, np.float32))[None]
    if problem is None:  # one caustics call is far cheaper than assembling the sparse operator
        n = geometry.image_npix
        sim = build_simulator(lens, (n, n), geometry.image_pixscale, geometry.source_npix,
                              geometry.source_pixscale, geometry.supersample, psf)
        model = caustics_forward(sim, x)[0].double().numpy() * geometry.image_pixscale ** 2
    else:
        model = problem.physical_forward(x.to(problem.device))[0].cpu().double().numpy()
    sci, sd, peak_snr = add_noise(model, noise, rng)
    return Observation(sci=sci.astype(np.float32), noise=sd.astype(np.float32), psf=psf.astype(np.float32),
                       psfsamp=samp, lens=lens, pixscale=geometry.image_pixscale,
                       source_npix=geometry.source_npix, source_pixscale=geometry.source_pixscale,
                       truth=np.asarray(truth, np.float32), bunit=noise.bunit, source_bunit=source_bunit,
                       header=noise_keywords(noise, peak_snr, geometry.supersample))


def noise_keywords(noise: NoiseConfig, peak_snr: float, supersample: int) -> dict:
    """The primary keywords of a simulated observation's noise: PEAKSNR (peak of the noiseless model /
    NOISE), NOISEREF (the fixed level [BUNIT]), POISSON and SUPERSMP (supersampling used to simulate)."""
    return {"PEAKSNR": (round(peak_snr, 4), "peak of noiseless model / NOISE"),
            "NOISEREF": (noise.sigma, "fixed noise level [BUNIT]"),
            "POISSON": (bool(noise.poisson), "Poisson term in NOISE"),
            "SUPERSMP": (supersample, "supersampling used to simulate")}


def add_noise(model: np.ndarray, noise: NoiseConfig, rng: np.random.Generator):
    """(SCI, NOISE, peak SNR) of a noiseless ``model`` [SCI units]: Gaussian noise of the fixed level
    ``noise.sigma`` plus, with ``noise.poisson``, the Poisson variance max(model, 0) / exposure_time."""
    var = np.full(model.shape, noise.sigma ** 2)
    if noise.poisson:
        var = var + np.clip(model, 0, None) / noise.exposure_time
    sd = np.sqrt(var)
    sci = model + sd * rng.standard_normal(model.shape)
    return sci, sd, float((model / sd).max())


def lens_header(lens: LensParams, h: fits.Header):
    """Write the lens keywords (array frame) into header ``h``."""
    h["LENSMOD"] = (f"{lens.model}+SHEAR", "main deflector + external shear")
    h["LENSFRAM"] = ("ARRAY", "+x columns, +y rows, from centre")
    h["LENS_X0"] = (lens.x0, "[arcsec] lens centre x")
    h["LENS_Y0"] = (lens.y0, "[arcsec] lens centre y")
    h["LENS_Q"] = (lens.q, "axis ratio")
    h["LENS_PHI"] = (lens.phi, "[rad] position angle, CCW from +x")
    h["LENS_RE"] = (lens.rein, "[arcsec] Einstein radius")
    if lens.model == "EPL":
        h["LENS_T"] = (lens.t, "EPL slope (caustics t, 1 = isothermal)")
    h["SHEAR_G1"] = (lens.g1, "external shear gamma_1 (centre 0,0)")
    h["SHEAR_G2"] = (lens.g2, "external shear gamma_2")
    h["Z_LENS"] = (lens.z_lens, "lens redshift")
    h["Z_SRC"] = (lens.z_source, "source redshift")


def _image_wcs(h: fits.Header, n_y: int, n_x: int, pixscale: float, plane: str = "image"):
    h["PIXSCALE"] = (pixscale, "[arcsec/pixel]")
    for ax, nn in ((1, n_x), (2, n_y)):
        h[f"CTYPE{ax}"] = ("OFFSET_X" if ax == 1 else "OFFSET_Y", f"array frame, {plane} plane")
        h[f"CUNIT{ax}"] = "arcsec"
        h[f"CDELT{ax}"] = pixscale
        h[f"CRPIX{ax}"] = (nn + 1) / 2
        h[f"CRVAL{ax}"] = 0.0


def observation_hdul(obs: Observation, extra: dict | None = None) -> fits.HDUList:
    """The HDU list of ``obs`` (the file layout above); ``extra``: more primary keywords."""
    prim = fits.PrimaryHDU()
    h = prim.header
    lens_header(obs.lens, h)
    h["SRCNPIX"] = (obs.source_npix, "source grid size")
    h["SRCPIXSC"] = (obs.source_pixscale, "[arcsec/pixel] source grid")
    h["PIXSCALE"] = (obs.pixscale, "[arcsec/pixel] image")
    h["BUNIT"] = (obs.bunit, "SCI and NOISE unit (flux per pixel)")
    h["PKGVER"] = (__version__, "pipeline version")
    for k, v in {**obs.header, **(extra or {})}.items():
        h[k] = v
    ny, nx = obs.sci.shape
    hdus = [prim]
    for name, arr in (("SCI", obs.sci), ("NOISE", obs.noise)):
        hdu = fits.ImageHDU(np.asarray(arr, np.float32), name=name)
        hdu.header["BUNIT"] = obs.bunit
        _image_wcs(hdu.header, ny, nx, obs.pixscale)
        hdus.append(hdu)
    psf = fits.ImageHDU(np.asarray(obs.psf, np.float32), name="PSF")
    psf.header["PSFSAMP"] = (obs.psfsamp, "[arcsec/pixel] PSF sampling")
    psf.header["PSFPIXR"] = (False, "pixel response not included")
    hdus.append(psf)
    if obs.mask is not None:
        m = fits.ImageHDU(np.asarray(obs.mask, np.uint8), name="MASK")
        m.header["MASKTYPE"] = ("GOOD", "1 = pixel used, 0 = ignored")
        _image_wcs(m.header, ny, nx, obs.pixscale)
        hdus.append(m)
    if obs.truth is not None:
        t = fits.ImageHDU(np.asarray(obs.truth, np.float32), name="TRUTH")
        t.header["BUNIT"] = obs.source_bunit
        _image_wcs(t.header, obs.source_npix, obs.source_npix, obs.source_pixscale, plane="source")
        hdus.append(t)
    return fits.HDUList(hdus)


def write_observation(path, obs: Observation, extra: dict | None = None) -> Path:
    """Write ``obs`` (and the primary keywords ``extra``) atomically (temp file + rename) with checksums."""
    return write_fits_atomic(path, observation_hdul(obs, extra))


def simulate_set(sources: np.ndarray, n: int, out_dir, geometry: GeometryConfig, lens_cfg: LensConfig,
                 noise: NoiseConfig, seed: int, extra: dict | None = None, source_bunit: str = "electron/(s arcsec2)",
                 device="cpu") -> list[dict]:
    """``n`` observations of sources drawn without replacement (with replacement if n > len) from
    ``sources``; files ``obs-%04d.fits`` and ``manifest.json`` written into a temp dir renamed to
    ``out_dir`` at the end (no partial output). Returns the manifest entries."""
    if len(sources) == 0:
        raise ValueError("no sources in the chosen split")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(sources), size=n, replace=n > len(sources))
    entries = []
    with atomic_directory(out_dir) as tmp:  # the directory appears whole or not at all
        for i in tqdm(range(n), desc="simulate", disable=tqdm_disable()):
            lens = draw_lens(lens_cfg, rng)
            obs = simulate_observation(sources[idx[i]], lens, geometry, noise, rng, source_bunit=source_bunit)
            name = f"obs-{i:04d}.fits"
            hdr = {"OBSID": (name[:-5], "observation id"), "SRCIDX": (int(idx[i]), "index in the source split"),
                   "SIMSEED": (seed, "simulation seed"), **(extra or {})}
            write_observation(tmp / name, obs, hdr)
            entries.append({"file": name, "source_index": int(idx[i]), "lens": lens.as_dict(),
                            "peak_snr": obs.header["PEAKSNR"][0]})
        with open(tmp / "manifest.json", "w") as fh:
            json.dump({"n": n, "seed": seed, "noise_sigma": noise.sigma, "observations": entries}, fh, indent=1)
    return entries


def peak_snr_stats(entries: list[dict]) -> dict:
    """Median and 10/90th percentiles of the per-observation peak SNR."""
    s = np.array([e["peak_snr"] for e in entries], dtype=float)
    return {"median": float(np.median(s)), "p10": float(np.percentile(s, 10)), "p90": float(np.percentile(s, 90))}


__all__ = ["Observation", "draw_lens", "typical_lens", "default_psf", "make_problem", "typical_noise_sigma",
           "simulate_observation", "add_noise", "noise_keywords", "observation_hdul", "write_observation",
           "simulate_set", "lens_header", "peak_snr_stats"]
