"""Reading an observation FITS file into a :class:`LensingProblem` (the contract with users;
docs/observations.md describes it for users).

File: ImageHDUs ``SCI`` (lens-light-subtracted image, or with an optional ``LENSLIGHT`` HDU holding the
lens light model, which is subtracted on read), the noise (``NOISE`` or ``ERR`` 1 sigma, ``IVM``, or
``WHT`` labelled as inverse variance: :mod:`pipeline.lensing.conventions`), ``PSF`` (odd, sums to 1,
``PSFSAMP`` [arcsec/px], in SCI's pixel orientation; the optical PSF *without* pixel response
(``PSFPIXR`` = T gives a warning), resampled to the supersampled scale by
:func:`pipeline.lensing.operator.resample_psf`), optional ``MASK`` (``MASKTYPE`` 'GOOD' (default):
nonzero = used; 'BAD': nonzero = ignored) and ``DQ`` (nonzero = bad), optional ``TRUTH``. Pixel scale
and orientation come from SCI's WCS (astropy.wcs: CD, PC*CDELT, CROTA2; CUNIT arcsec/arcmin/deg), or
from ``PIXSCALE`` when there is no WCS; pixels must be square.

Units: SCI, the noise and LENSLIGHT are converted from their ``BUNIT`` to the data unit
``lensing.noise.bunit`` (flux per pixel, default electron/s) by :mod:`pipeline.lensing.units`; the
model is caustics' mean surface brightness [``lensing.sources.bunit``] times the pixel area, and the
likelihood (log Z too) is in the data unit. The image may then be rebinned to the trained pixel scale
and cropped to the trained size (:mod:`pipeline.lensing.rebin`, ``lensing.observation.rebin`` / ``crop``)
before the operator is built.

Lens model: the keywords that :mod:`pipeline.lensing.simulate` writes (LENSMOD, LENS_X0, ...) in the
primary (or SCI) header, or a YAML file beside the FITS (``<stem>.lens.yaml`` or ``<stem>.yaml``; keys
model, x0, y0, q, phi, rein, t, g1, g2, z_lens, z_source, frame). Frame (``LENSFRAM`` / ``frame``):

* ``ARRAY`` (default): +x along columns, +y along rows, arcsec from the array centre, angles CCW from +x.
* ``WORLD``: the linear intermediate world coordinates of SCI's WCS (lenstronomy's ``ra, dec`` with
  ``transform_pix2angle = J``): a position is ``w = J (p - CRPIX)`` for pixel p. Mapping to the array
  frame with R = pix * J^-1 (orthogonal: a rotation, or a reflection for RA-left images):
  ``a = R w + pix * (CRPIX - centre)``; the mass position angle turns as the direction (cos phi, sin phi)
  under R; the shear as a spin-2 quantity, its angle theta = atan2(g2, g1)/2 turning like phi.
  Any other frame is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
import yaml
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.io.fits import _open
from pipeline.lensing.config import BrightnessConfig, GeometryConfig, LensingConfig, ObservationConfig
from pipeline.lensing.conventions import (check_noise_scale, check_sci_values, noise_sigma, pixel_geometry,
                                         quality_mask)
from pipeline.lensing.operator import LensingProblem, LensParams, psf_fwhm, resample_psf
from pipeline.lensing.rebin import Pixels, crop, rebin, rebin_factor
from pipeline.lensing.units import (conversion_factor, data_unit, header_number, is_surface_brightness, model_factor,
                                    parse_bunit)

log = logging.getLogger(__name__)

LENS_KEYS = {"x0": "LENS_X0", "y0": "LENS_Y0", "q": "LENS_Q", "phi": "LENS_PHI", "rein": "LENS_RE",
             "t": "LENS_T", "g1": "SHEAR_G1", "g2": "SHEAR_G2", "z_lens": "Z_LENS", "z_source": "Z_SRC"}


def _read_all(source):
    """{HDU name: (array or None, header)} of the FITS file at ``source`` or of an in-memory HDUList (left
    open), with native float64 arrays; NaNs allowed here."""
    if not isinstance(source, fits.HDUList):
        with _open(source) as hdul:
            return _read_all(hdul)
    out = {}
    for i, h in enumerate(source):
        name = h.name or ("PRIMARY" if i == 0 else f"HDU{i}")
        data = getattr(h, "data", None)
        if data is not None and isinstance(data, np.ndarray) and data.dtype.fields is None:
            data = np.array(data, dtype=np.float64)
        else:
            data = None
        out[name] = (data, h.header.copy())
    return out


def lens_keywords(h) -> dict | None:
    """The raw lens keywords of header ``h`` (LENSMOD, LENSFRAM, LENS_KEYS) as a dict of the YAML keys,
    or None when LENSMOD is absent; :func:`parse_lens` checks and converts them."""
    if "LENSMOD" not in h:
        return None
    out = {"model": str(h["LENSMOD"]), "frame": str(h.get("LENSFRAM", "ARRAY"))}
    for k, key in LENS_KEYS.items():
        if key in h:
            out[k] = h[key]
    return out


def _lens_from_yaml(path: Path) -> tuple[dict | None, Path | None]:
    for cand in (path.with_suffix(".lens.yaml"), path.with_suffix(".yaml")):
        if cand.is_file():
            try:
                data = yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError:
                raise InputFileError(cand, "lens YAML is not valid YAML") from None
            if not isinstance(data, dict):
                raise InputFileError(cand, "lens YAML must be a mapping")
            data = dict(data.get("lens", data))
            data.setdefault("frame", "ARRAY")
            return data, cand
    return None, None


def parse_lens(raw: dict, source, default_z=(0.5, 1.5)) -> tuple[LensParams, str]:
    """LensParams (still in the file's frame) and the frame name from a header/YAML dict."""
    model = str(raw.get("model", "")).upper().replace(" ", "")
    base = model.split("+")[0]
    if base not in ("SIE", "EPL") or (model != base and model.split("+", 1)[1] != "SHEAR"):
        raise InputFileError(source, f"unsupported lens model {raw.get('model')!r} (SIE+SHEAR, EPL+SHEAR)",
                             field="LENSMOD")
    vals = {}
    for k, key in LENS_KEYS.items():
        if k in raw and raw[k] is not None:
            try:
                vals[k] = float(raw[k])
            except (TypeError, ValueError):
                raise InputFileError(source, f"not a number: {raw[k]!r}", field=key) from None
            if not math.isfinite(vals[k]):
                raise InputFileError(source, f"not finite: {raw[k]!r}", field=key)
    for k in ("x0", "y0", "q", "phi", "rein"):
        if k not in vals:
            raise InputFileError(source, "lens keyword missing", field=LENS_KEYS[k])
    if base == "EPL" and "t" not in vals:
        raise InputFileError(source, "EPL needs its slope", field="LENS_T")
    if not 0 < vals["q"] <= 1:
        raise InputFileError(source, f"axis ratio must be in (0, 1], got {vals['q']}", field="LENS_Q")
    if not vals["rein"] > 0:
        raise InputFileError(source, f"Einstein radius must be > 0, got {vals['rein']}", field="LENS_RE")
    lens = LensParams(model=base, x0=vals["x0"], y0=vals["y0"], q=vals["q"], phi=vals["phi"], rein=vals["rein"],
                      t=vals.get("t", 1.0), g1=vals.get("g1", 0.0), g2=vals.get("g2", 0.0),
                      z_lens=vals.get("z_lens", default_z[0]), z_source=vals.get("z_source", default_z[1]))
    if lens.z_source <= lens.z_lens:
        raise InputFileError(source, f"Z_SRC {lens.z_source} must exceed Z_LENS {lens.z_lens}", field="Z_SRC")
    return lens, str(raw.get("frame", "ARRAY")).upper()


def world_to_array(lens: LensParams, J: np.ndarray, crpix_offset: np.ndarray) -> LensParams:
    """Convert lens parameters given in the WCS's intermediate world frame (arcsec) to the array frame.

    ``J`` is the pixel->world matrix in arcsec/px (columns: +x pixel, +y pixel); ``crpix_offset`` is
    CRPIX - array centre in pixels (x, y)."""
    pix = math.sqrt(abs(np.linalg.det(J)))
    R = pix * np.linalg.inv(J)
    pos = R @ np.array([lens.x0, lens.y0]) + pix * np.asarray(crpix_offset, float)

    def turn(angle):
        v = R @ np.array([math.cos(angle), math.sin(angle)])
        return math.atan2(v[1], v[0])

    phi = turn(lens.phi) % math.pi
    g = math.hypot(lens.g1, lens.g2)
    theta = turn(0.5 * math.atan2(lens.g2, lens.g1)) if g > 0 else 0.0
    return LensParams(model=lens.model, x0=float(pos[0]), y0=float(pos[1]), q=lens.q, phi=phi, rein=lens.rein,
                      t=lens.t, g1=g * math.cos(2 * theta), g2=g * math.sin(2 * theta),
                      z_lens=lens.z_lens, z_source=lens.z_source)


def _unit_factor(path, name: str, hdus: dict, bunit: str, pix: float, ocfg, target) -> tuple[float, bool]:
    """(factor taking HDU ``name`` from ``bunit`` to ``target``, whether ``bunit`` is a surface brightness);
    EXPTIME and photometric keywords are looked up in that HDU, SCI, then the primary header."""
    unit = parse_bunit(bunit, path, f"{name}.BUNIT")
    headers = [(n, hdus[n][1]) for n in dict.fromkeys((name, "SCI", "PRIMARY")) if n in hdus]
    return conversion_factor(unit, target, pix * pix, headers, path, f"{name}.BUNIT", ocfg.gain, bunit), \
        is_surface_brightness(unit)


def _science(path, hdus: dict, prim_h, pix: float, cfg: LensingConfig, warn) -> dict:
    """SCI less any LENSLIGHT, and the noise (NOISE, ERR, IVM or WHT), each converted from its BUNIT
    (default SCI's, then the primary header's) to the data unit ``cfg.noise.bunit``: keys sci, sigma
    ((ny, nx) float64, may hold NaN), covered (bool), noise_hdu, bunit, surface_brightness, factor,
    lens_light."""
    if "PSF" not in hdus or hdus["PSF"][0] is None:
        raise InputFileError(path, f"required image HDU PSF missing (HDUs: {', '.join(hdus)})", field="PSF")
    sci, sci_h = hdus["SCI"]
    noise_name, sigma, covered = noise_sigma(path, hdus, cfg.observation.wht)
    if sigma.shape != sci.shape:
        raise InputFileError(path, f"{noise_name} shape {sigma.shape} != SCI shape {sci.shape}", field=noise_name)
    target = data_unit(cfg)
    bunit = str(sci_h.get("BUNIT", prim_h.get("BUNIT", ""))).strip()
    if not bunit:
        warn(f"SCI has no BUNIT: taken as {cfg.noise.bunit} (flux per pixel)")
    factor, sb = _unit_factor(path, "SCI", hdus, bunit or cfg.noise.bunit, pix, cfg.observation, target)
    noise_unit = bunit if noise_name in ("IVM", "WHT") else str(hdus[noise_name][1].get("BUNIT", bunit)).strip()
    nfactor = _unit_factor(path, noise_name, hdus, noise_unit or cfg.noise.bunit, pix, cfg.observation, target)[0]
    lens_light = "LENSLIGHT" in hdus and hdus["LENSLIGHT"][0] is not None
    if lens_light:
        ll, llh = hdus["LENSLIGHT"]
        if ll.shape != sci.shape:
            raise InputFileError(path, f"LENSLIGHT shape {ll.shape} != SCI shape {sci.shape}", field="LENSLIGHT")
        if not np.isfinite(ll).all():
            raise InputFileError(path, "LENSLIGHT contains NaN or inf", field="LENSLIGHT")
        lfactor = _unit_factor(path, "LENSLIGHT", hdus, str(llh.get("BUNIT", bunit)).strip() or cfg.noise.bunit,
                               pix, cfg.observation, target)[0]
        sci = sci * factor - ll * lfactor if (factor, lfactor) != (1.0, 1.0) else sci - ll
    elif factor != 1.0:
        sci = sci * factor
    if nfactor != 1.0:
        sigma = sigma * nfactor
    return {"sci": sci, "sigma": sigma, "covered": covered, "noise_hdu": noise_name, "bunit": bunit,
            "surface_brightness": sb, "factor": factor, "lens_light": lens_light}


def _usable_pixels(path, hdus: dict, d: dict, nan_policy: str, warn) -> tuple[np.ndarray, np.ndarray]:
    """(used, bad): MASK and DQ, less pixels without coverage, less the NaN/inf pixels of SCI or the noise
    (an error with ``nan_policy`` 'error' when a used pixel is one); the noise must be > 0 on every used
    pixel. Both (ny, nx) bool; ``bad`` are the NaN/inf pixels."""
    sci, noise, name = d["sci"], d["sigma"], d["noise_hdu"]
    mask = quality_mask(path, hdus, sci.shape) & d["covered"]
    bad = ~np.isfinite(sci) | ~np.isfinite(noise)
    nbad = int((bad & mask).sum())
    if nbad:
        which = "SCI" if (~np.isfinite(sci) & mask).any() else name
        if nan_policy == "error":
            raise InputFileError(path, f"{nbad} NaN/inf pixels (lensing.observation.nan_policy = error)", field=which)
        warn(f"{nbad} NaN/inf pixels in {which} masked")
    mask &= ~bad
    if not mask.any():
        raise InputFileError(path, "no usable pixels (all masked or NaN)", field="MASK")
    if (noise[mask] <= 0).any():
        raise InputFileError(path, f"{name} must be > 0 on used pixels ({int((noise[mask] <= 0).sum())} are not)",
                             field=name)
    return mask, bad


def _resize(path, px: Pixels, cfg: LensingConfig, lens: LensParams) -> tuple[Pixels, LensParams, int]:
    """``px`` rebinned to the geometry's pixel scale and cropped to its size as ``cfg.observation`` asks,
    with the lens shifted to the new array centre; (pixels, lens, rebin factor or 1). Refuses an image
    larger than ``max_image_npix`` before the operator is built."""
    ocfg, geom = cfg.observation, cfg.geometry
    k = rebin_factor(px.pix, geom.image_pixscale) if ocfg.rebin == "auto" else None
    if k:
        px = rebin(px, k)
        log.info("%s: rebinned %dx%d to %.6g\"/pixel", path, k, k, px.pix)
    if ocfg.crop != "off" and max(px.shape) > geom.image_npix:
        shape = px.shape
        px = crop(px, geom.image_npix, (lens.x0, lens.y0) if ocfg.crop == "lens" else None)
        log.info("%s: cropped %dx%d to %dx%d around the %s centre", path, *shape, *px.shape,
                 "lens" if ocfg.crop == "lens" else "array")
    if max(px.shape) > ocfg.max_image_npix:
        raise InputFileError(path, f"SCI is {px.shape[0]}x{px.shape[1]} pixels, more than "
                             f"lensing.observation.max_image_npix = {ocfg.max_image_npix}: set "
                             f"lensing.observation.crop (centre or lens) to cut it to {geom.image_npix}x"
                             f"{geom.image_npix}", field="SCI")
    if px.shift != (0.0, 0.0):
        lens = dataclasses.replace(lens, x0=lens.x0 - px.shift[0], y0=lens.y0 - px.shift[1])
    return px, lens, k or 1


def _psf(path, hdus: dict, pix: float, ocfg: ObservationConfig, warn) -> tuple[np.ndarray, float]:
    """The PSF HDU (odd, finite, non-negative, sum 1 within ``ocfg.psf_sum_tol``) and its sampling
    PSFSAMP [arcsec/px] (the image pixel scale ``pix`` when absent)."""
    psf, psf_h = hdus["PSF"]
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise InputFileError(path, f"PSF must be 2-D with odd sizes, got {psf.shape}", field="PSF")
    if not np.isfinite(psf).all():
        raise InputFileError(path, "PSF contains NaN or inf", field="PSF")
    if psf.min() < -1e-3 * psf.max():
        raise InputFileError(path, f"PSF has negative values (min {psf.min():.3g})", field="PSF")
    if abs(psf.sum() - 1.0) > ocfg.psf_sum_tol:
        raise InputFileError(path, f"PSF must be normalised to 1 (sum {psf.sum():.6g}, tolerance "
                             f"{ocfg.psf_sum_tol})", field="PSF")
    if "PSFSAMP" in psf_h:
        psfsamp = header_number(psf_h, "PSFSAMP", path, "PSF")
        if not psfsamp > 0:
            raise InputFileError(path, f"PSFSAMP must be > 0, got {psfsamp}", field="PSF.PSFSAMP")
    else:
        psfsamp = pix
        warn("PSF has no PSFSAMP: taken as sampled at the image pixel scale")
    if bool(psf_h.get("PSFPIXR", False)):
        warn("PSFPIXR = T: the PSF includes the pixel response, which the supersampled model applies again")
    return psf, psfsamp


def _lens(path: Path, prim_h, sci_h, J, crpix_off, default_z) -> tuple[LensParams, str, str]:
    """(lens in the array frame, the file's frame, where it was read): from the primary or SCI header,
    else from the YAML file beside ``path``; WORLD-frame lenses mapped through SCI's WCS ``J``."""
    raw = lens_keywords(prim_h) or lens_keywords(sci_h)
    lens_source = str(path)
    if raw is None:
        raw, ypath = _lens_from_yaml(path)
        if raw is None:
            raise InputFileError(path, "no lens model: set LENSMOD and the lens keywords in the primary header, or "
                                 f"put {path.with_suffix('.lens.yaml').name} beside the file", field="LENSMOD")
        lens_source = str(ypath)
    lens, frame = parse_lens(raw, lens_source, default_z)
    if frame == "WORLD":
        if J is None:
            raise InputFileError(path, "LENSFRAM = WORLD needs a CD/CDELT WCS on SCI", field="LENSFRAM")
        lens = world_to_array(lens, J, crpix_off)
    elif frame != "ARRAY":
        raise InputFileError(lens_source, f"unsupported lens frame {frame!r} (ARRAY, WORLD)", field="LENSFRAM")
    return lens, frame, lens_source


def _header_source_grid(path, prim_h, geom: GeometryConfig, warn) -> tuple:
    """The file's SRCNPIX / SRCPIXSC (None when absent), with a warning when they differ from the
    configured source grid (which is used)."""
    ns, sps = geom.source_npix, geom.source_pixscale
    hdr_ns, hdr_sps = (header_number(prim_h, k, path, "PRIMARY") if k in prim_h else None
                       for k in ("SRCNPIX", "SRCPIXSC"))
    if hdr_ns is not None:
        hdr_ns = int(hdr_ns)
    if (hdr_ns is not None and hdr_ns != ns) or (hdr_sps is not None and abs(float(hdr_sps) / sps - 1) > 1e-6):
        warn(f"file's source grid ({hdr_ns}, {hdr_sps}\"/px) differs from the configured ({ns}, {sps}\"/px); "
             "using the configured grid")
    return hdr_ns, hdr_sps


def _truth(hdus: dict, ns: int, warn) -> np.ndarray | None:
    """The TRUTH HDU (ns, ns) float32 [source surface brightness], None when absent or of another shape."""
    if "TRUTH" not in hdus or hdus["TRUTH"][0] is None:
        return None
    truth = hdus["TRUTH"][0].astype(np.float32)
    if truth.shape != (ns, ns):
        warn(f"TRUTH shape {truth.shape} differs from the source grid ({ns}, {ns}); ignored")
        return None
    return truth


def _read_checked(path: Path, cfg: LensingConfig, warn, hdul: fits.HDUList | None = None) -> dict:
    """Every HDU read (from ``hdul`` when given, else the file ``path``), converted and checked, before any
    resizing: keys hdus, prim_h, file_pix, d (from :func:`_science`), mask, bad, psf, psfsamp, lens, frame,
    lens_source."""
    hdus = _read_all(path if hdul is None else hdul)
    prim_h = hdus.setdefault("PRIMARY", (None, {}))[1]
    if "SCI" not in hdus or hdus["SCI"][0] is None or hdus["SCI"][0].ndim != 2:
        shape = "missing" if "SCI" not in hdus or hdus["SCI"][0] is None else f"of shape {hdus['SCI'][0].shape}"
        raise InputFileError(path, f"SCI must be a 2-D image HDU, {shape} (HDUs: {', '.join(hdus)})", field="SCI")
    file_pix, J, crpix_off = pixel_geometry(path, hdus["SCI"][1], prim_h, hdus["SCI"][0].shape)
    d = _science(path, hdus, prim_h, file_pix, cfg, warn)
    check_sci_values(path, d["sci"])
    mask, bad = _usable_pixels(path, hdus, d, cfg.observation.nan_policy, warn)
    check_noise_scale(path, d["sci"], d["sigma"], mask, d["noise_hdu"], cfg.observation.max_noise_ratio)
    psf, psfsamp = _psf(path, hdus, file_pix, cfg.observation, warn)
    lens, frame, lens_source = _lens(path, prim_h, hdus["SCI"][1], J, crpix_off, (cfg.lens.z_lens, cfg.lens.z_source))
    return {"hdus": hdus, "prim_h": prim_h, "file_pix": file_pix, "d": d, "mask": mask, "bad": bad, "psf": psf,
            "psfsamp": psfsamp, "lens": lens, "frame": frame, "lens_source": lens_source}


def load_observation(path, config: LensingConfig | None = None, *, device="cpu",
                     brightness: BrightnessConfig | None = None, name: str = "HDUList"):
    """Validate the observation at ``path`` and build its problem.

    ``path``: the FITS file, or an in-memory :class:`~astropy.io.fits.HDUList` in the same format, which
    messages and ``meta["path"]`` call ``name`` (its lens must be in the headers: there is no file beside it).
    Returns ``(problem, y, meta)``: ``problem`` a :class:`LensingProblem` (sources in network units via
    ``brightness``, default ``config.brightness``), ``y`` the SCI image (ny, nx) float32 tensor on
    ``device`` in the data unit ``config.noise.bunit`` (masked / NaN pixels set to 0), and ``meta``
    (lens, frame, pixscale [arcsec/px], the file's bunit, unit_factor, source grid, psf, truth, mask
    fraction, peak SNR, rebinning and cropping, warnings). Errors are one-line :class:`InputFileError`
    naming the file and the HDU/keyword."""
    cfg = config or LensingConfig()
    geom = cfg.geometry
    hdul = path if isinstance(path, fits.HDUList) else None
    path = Path(name if hdul is not None else path)
    warnings: list[str] = []

    def warn(msg):
        warnings.append(msg)
        log.warning("%s: %s", path, msg)

    r = _read_checked(path, cfg, warn, hdul)
    hdus, prim_h, d, file_pix, psf, psfsamp = r["hdus"], r["prim_h"], r["d"], r["file_pix"], r["psf"], r["psfsamp"]
    lens, frame, lens_source, bad = r["lens"], r["frame"], r["lens_source"], r["bad"]
    file_shape = d["sci"].shape
    px, lens, k = _resize(path, Pixels(d["sci"], d["sigma"], r["mask"], file_pix), cfg, lens)
    sci, noise, mask, pix = px.sci, px.sigma, px.used, px.pix
    psf_used = resample_psf(psf, psfsamp, pix / geom.supersample)
    ns, sps = geom.source_npix, geom.source_pixscale
    header_grid = _header_source_grid(path, prim_h, geom, warn)
    b = brightness or cfg.brightness
    unit_factor = model_factor(cfg, pix)
    y_np = np.where(mask, sci, 0.0).astype(np.float32)
    sigma_np = np.where(mask, noise, 1.0).astype(np.float32)
    problem = LensingProblem.from_lens(
        lens, image_shape=sci.shape, image_pixscale=pix, source_npix=ns, source_pixscale=sps,
        supersample=geom.supersample, psf=psf_used, sigma=torch.as_tensor(sigma_np), mask=torch.as_tensor(mask),
        unit_factor=unit_factor, scale=b.scale, offset=b.offset, device=device, meta={"path": str(path)})
    truth = _truth(hdus, ns, warn)
    snr = np.where(mask, sci / sigma_np, 0.0)
    meta = {
        "path": str(path), "obs_id": str(prim_h.get("OBSID", path.stem)), "lens": lens, "frame": frame,
        "lens_source": lens_source, "pixscale": pix, "bunit": d["bunit"] or "flux/pixel (assumed)",
        "data_unit": cfg.noise.bunit, "unit_conversion": d["factor"], "noise_hdu": d["noise_hdu"],
        "surface_brightness": d["surface_brightness"], "unit_factor": unit_factor, "image_shape": tuple(sci.shape),
        "file_shape": tuple(file_shape), "file_pixscale": file_pix, "rebin": k, "crop_shift": px.shift,
        "source_npix": ns, "source_pixscale": sps, "supersample": geom.supersample,
        "psf_shape": tuple(psf.shape), "psfsamp": psfsamp, "psf_fwhm": psf_fwhm(psf, psfsamp),
        "psf_used": psf_used, "mask": mask, "mask_fraction": float(1 - mask.mean()),
        "n_nan": int(bad.sum()), "peak_snr_data": float(snr.max()), "truth": truth,
        "header_source_grid": header_grid, "lens_light_subtracted": d["lens_light"], "warnings": warnings,
        "sci_header": hdus["SCI"][1],
    }
    if truth is not None:
        model = problem.physical_forward(torch.as_tensor(truth, device=problem.device)[None])[0].cpu().numpy()
        meta["peak_snr_truth"] = float(np.where(mask, model / sigma_np, 0.0).max())
    return problem, torch.as_tensor(y_np, device=problem.device), meta
