"""Reading an observation FITS file into a :class:`LensingProblem` (the contract with users).

File: ImageHDUs ``SCI`` (lens-light-subtracted image, or with an optional ``LENSLIGHT`` HDU holding the
lens light model in SCI's units, which is subtracted on read), ``NOISE`` (1 sigma, SCI's unit,
uncorrelated), ``PSF`` (odd, sums to 1, ``PSFSAMP`` [arcsec/px], in SCI's pixel orientation; the optical
PSF *without* pixel response (``PSFPIXR`` = T gives a warning), resampled to the supersampled scale by
:func:`pipeline.lensing.operator.resample_psf`), optional ``MASK`` (``MASKTYPE`` 'GOOD' (default):
nonzero = used; 'BAD': nonzero = ignored), optional ``TRUTH``. Pixel scale and orientation come from
SCI's pixel->world matrix (CD, or PC*CDELT; CUNIT arcsec/arcmin/deg), or from ``PIXSCALE`` when there is
no WCS; pixels must be square.

Units: if SCI's ``BUNIT`` is a surface brightness (per arcsec^2 or per sr) the model is caustics' mean
surface brightness; otherwise (e.g. electron/s, the default when BUNIT is missing) SCI is flux per pixel
and the model is multiplied by the pixel area. The likelihood stays in SCI's own units (log Z too).

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

import logging
import math
from pathlib import Path

import astropy.units as u
import numpy as np
import torch
import yaml

from pipeline.errors import InputFileError
from pipeline.io.fits import _open
from pipeline.lensing.config import BrightnessConfig, GeometryConfig, LensingConfig, ObservationConfig
from pipeline.lensing.grids import ARCSEC_PER_UNIT, pixel_matrix
from pipeline.lensing.operator import LensingProblem, LensParams, psf_fwhm, resample_psf

log = logging.getLogger(__name__)

LENS_KEYS = {"x0": "LENS_X0", "y0": "LENS_Y0", "q": "LENS_Q", "phi": "LENS_PHI", "rein": "LENS_RE",
             "t": "LENS_T", "g1": "SHEAR_G1", "g2": "SHEAR_G2", "z_lens": "Z_LENS", "z_source": "Z_SRC"}


def _read_all(path):
    """{HDU name: (array or None, header)} with native float64 arrays; NaNs allowed here."""
    out = {}
    with _open(path) as hdul:
        for i, h in enumerate(hdul):
            name = h.name or ("PRIMARY" if i == 0 else f"HDU{i}")
            data = getattr(h, "data", None)
            if data is not None and isinstance(data, np.ndarray) and data.dtype.fields is None:
                data = np.array(data, dtype=np.float64)
            else:
                data = None
            out[name] = (data, h.header.copy())
    return out


def _is_surface_brightness(bunit: str) -> bool:
    """True when ``bunit`` is per unit solid angle (arcsec^-2, sr^-1, ...)."""
    try:
        unit = u.Unit(bunit, parse_strict="raise")
        for base, power in zip(unit.decompose().bases, unit.decompose().powers):
            if base == u.rad and power <= -2:
                return True
        return False
    except (ValueError, TypeError):
        b = bunit.lower().replace(" ", "")
        return "arcsec" in b or "/sr" in b or "sr-1" in b


def _lens_from_header(h) -> dict | None:
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


def _pixel_geometry(path, sci_h, prim_h):
    """(pixscale, J [arcsec/px] or None, crpix offset (x, y) in px) from SCI's WCS or PIXSCALE."""
    try:
        J = pixel_matrix(sci_h)
    except KeyError:
        J = None
    if J is not None:  # FITS default CUNIT for celestial axes is deg
        u1 = str(sci_h.get("CUNIT1", "deg")).strip().lower()
        u2 = str(sci_h.get("CUNIT2", u1)).strip().lower()
        if u1 not in ARCSEC_PER_UNIT or u2 not in ARCSEC_PER_UNIT:
            raise InputFileError(path, f"unsupported WCS unit {u1!r}/{u2!r} (arcsec, arcmin, deg)", field="SCI.CUNIT1")
        J = J * np.array([[ARCSEC_PER_UNIT[u1]], [ARCSEC_PER_UNIT[u2]]])
        det = np.linalg.det(J)
        if not np.isfinite(J).all() or abs(det) <= 0:
            raise InputFileError(path, "pixel->world matrix is singular", field="SCI.CD1_1")
        pix = math.sqrt(abs(det))
        if not np.allclose(J.T @ J, pix * pix * np.eye(2), rtol=1e-4, atol=1e-8 * pix * pix):
            raise InputFileError(path, "pixels are not square or the WCS is skewed (CD/PC matrix not a scaled "
                                 "rotation); resample to square pixels first", field="SCI.CD1_1")
        for key in ("PIXSCALE",):
            for h in (sci_h, prim_h):
                if key in h and abs(float(h[key]) / pix - 1) > 1e-3:
                    raise InputFileError(path, f"PIXSCALE {h[key]} disagrees with the WCS pixel scale {pix:.6g}",
                                         field=f"SCI.{key}")
        ny, nx = int(sci_h["NAXIS2"]), int(sci_h["NAXIS1"])
        crpix = np.array([float(sci_h.get("CRPIX1", (nx + 1) / 2)), float(sci_h.get("CRPIX2", (ny + 1) / 2))])
        return pix, J, crpix - np.array([(nx + 1) / 2, (ny + 1) / 2])
    for h in (sci_h, prim_h):
        if "PIXSCALE" in h:
            pix = float(h["PIXSCALE"])
            if not pix > 0:
                raise InputFileError(path, f"PIXSCALE must be > 0, got {pix}", field="SCI.PIXSCALE")
            return pix, None, np.zeros(2)
    raise InputFileError(path, "pixel scale missing: give SCI a CD/CDELT WCS in arcsec or PIXSCALE",
                         field="SCI.PIXSCALE")


def _science(path, hdus: dict, prim_h, warn) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(SCI, NOISE, BUNIT, lens light subtracted?): the required HDUs SCI / NOISE / PSF checked present,
    SCI 2-D, NOISE of SCI's shape and unit, and the optional LENSLIGHT (same shape and unit, finite)
    subtracted from SCI. Arrays (ny, nx) float64 in BUNIT (may hold NaN)."""
    for name in ("SCI", "NOISE", "PSF"):
        if name not in hdus or hdus[name][0] is None:
            raise InputFileError(path, f"required image HDU {name} missing (HDUs: {', '.join(hdus)})", field=name)
    sci, sci_h = hdus["SCI"]
    noise, noise_h = hdus["NOISE"]
    if sci.ndim != 2:
        raise InputFileError(path, f"SCI must be 2-D, got shape {sci.shape}", field="SCI")
    if noise.shape != sci.shape:
        raise InputFileError(path, f"NOISE shape {noise.shape} != SCI shape {sci.shape}", field="NOISE")
    bunit = str(sci_h.get("BUNIT", prim_h.get("BUNIT", ""))).strip()
    nb = str(noise_h.get("BUNIT", bunit)).strip()
    if nb != bunit:
        raise InputFileError(path, f"NOISE BUNIT {nb!r} differs from SCI BUNIT {bunit!r}", field="NOISE.BUNIT")
    if not bunit:
        warn("SCI has no BUNIT: taken as flux per pixel")
    if "LENSLIGHT" not in hdus or hdus["LENSLIGHT"][0] is None:
        return sci, noise, bunit, False
    ll, llh = hdus["LENSLIGHT"]
    if ll.shape != sci.shape:
        raise InputFileError(path, f"LENSLIGHT shape {ll.shape} != SCI shape {sci.shape}", field="LENSLIGHT")
    if not np.isfinite(ll).all():
        raise InputFileError(path, "LENSLIGHT contains NaN or inf", field="LENSLIGHT")
    lb = str(llh.get("BUNIT", bunit)).strip()
    if lb != bunit:
        raise InputFileError(path, f"LENSLIGHT BUNIT {lb!r} differs from SCI BUNIT {bunit!r}", field="LENSLIGHT.BUNIT")
    return sci - ll, noise, bunit, True


def _file_mask(path, hdus: dict, shape) -> np.ndarray:
    """The MASK HDU as a bool array (True = used; MASKTYPE GOOD: nonzero used, BAD: nonzero ignored),
    all True without one."""
    if "MASK" not in hdus or hdus["MASK"][0] is None:
        return np.ones(shape, bool)
    m, mh = hdus["MASK"]
    if m.shape != shape:
        raise InputFileError(path, f"MASK shape {m.shape} != SCI shape {shape}", field="MASK")
    if not np.isfinite(m).all():
        raise InputFileError(path, "MASK contains NaN", field="MASK")
    kind = str(mh.get("MASKTYPE", "GOOD")).upper()
    if kind not in ("GOOD", "BAD"):
        raise InputFileError(path, f"MASKTYPE must be GOOD or BAD, got {kind!r}", field="MASK.MASKTYPE")
    return (m != 0) if kind == "GOOD" else (m == 0)


def _usable_pixels(path, hdus: dict, sci, noise, nan_policy: str, warn) -> tuple[np.ndarray, np.ndarray]:
    """(mask, bad): the file's MASK less the NaN/inf pixels of SCI or NOISE (an error with
    ``nan_policy`` 'error' when a used pixel is one), and those NaN/inf pixels; NOISE must be > 0
    on every used pixel. Both (ny, nx) bool."""
    mask = _file_mask(path, hdus, sci.shape)
    bad = ~np.isfinite(sci) | ~np.isfinite(noise)
    nbad = int((bad & mask).sum())
    if nbad:
        which = "SCI" if (~np.isfinite(sci) & mask).any() else "NOISE"
        if nan_policy == "error":
            raise InputFileError(path, f"{nbad} NaN/inf pixels (lensing.observation.nan_policy = error)", field=which)
        warn(f"{nbad} NaN/inf pixels in {which} masked")
    mask &= ~bad
    if not mask.any():
        raise InputFileError(path, "no usable pixels (all masked or NaN)", field="MASK")
    if (noise[mask] <= 0).any():
        raise InputFileError(path, f"NOISE must be > 0 on used pixels ({int((noise[mask] <= 0).sum())} are not)",
                             field="NOISE")
    return mask, bad


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
        psfsamp = float(psf_h["PSFSAMP"])
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
    raw = _lens_from_header(prim_h) or _lens_from_header(sci_h)
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


def _header_source_grid(prim_h, geom: GeometryConfig, warn) -> tuple:
    """The file's SRCNPIX / SRCPIXSC (None when absent), with a warning when they differ from the
    configured source grid (which is used)."""
    ns, sps = geom.source_npix, geom.source_pixscale
    hdr_ns, hdr_sps = prim_h.get("SRCNPIX"), prim_h.get("SRCPIXSC")
    if (hdr_ns is not None and int(hdr_ns) != ns) or (hdr_sps is not None and abs(float(hdr_sps) / sps - 1) > 1e-6):
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


def load_observation(path, config: LensingConfig | None = None, *, device="cpu",
                     brightness: BrightnessConfig | None = None):
    """Validate the observation at ``path`` and build its problem.

    Returns ``(problem, y, meta)``: ``problem`` a :class:`LensingProblem` (sources in network units via
    ``brightness``, default ``config.brightness``), ``y`` the SCI image (ny, nx) float32 tensor on
    ``device`` [SCI's BUNIT] (masked / NaN pixels set to 0), and ``meta`` (lens, frame, pixscale
    [arcsec/px], bunit, unit_factor, source grid, psf, truth, mask fraction, peak SNR, warnings). Errors
    are one-line :class:`InputFileError` naming the file and the HDU/keyword."""
    cfg = config or LensingConfig()
    geom = cfg.geometry
    path = Path(path)
    warnings: list[str] = []

    def warn(msg):
        warnings.append(msg)
        log.warning("%s: %s", path, msg)

    hdus = _read_all(path)
    prim_h = hdus.get("PRIMARY", (None, {}))[1]
    sci, noise, bunit, lens_light = _science(path, hdus, prim_h, warn)
    mask, bad = _usable_pixels(path, hdus, sci, noise, cfg.observation.nan_policy, warn)
    pix, J, crpix_off = _pixel_geometry(path, hdus["SCI"][1], prim_h)
    unit_sb = bool(bunit) and _is_surface_brightness(bunit)
    unit_factor = 1.0 if unit_sb else pix * pix
    psf, psfsamp = _psf(path, hdus, pix, cfg.observation, warn)
    psf_used = resample_psf(psf, psfsamp, pix / geom.supersample)
    lens, frame, lens_source = _lens(path, prim_h, hdus["SCI"][1], J, crpix_off, (cfg.lens.z_lens, cfg.lens.z_source))
    ns, sps = geom.source_npix, geom.source_pixscale
    header_grid = _header_source_grid(prim_h, geom, warn)
    b = brightness or cfg.brightness
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
        "lens_source": lens_source, "pixscale": pix, "bunit": bunit or "flux/pixel (assumed)",
        "surface_brightness": unit_sb, "unit_factor": unit_factor, "image_shape": tuple(sci.shape),
        "source_npix": ns, "source_pixscale": sps, "supersample": geom.supersample,
        "psf_shape": tuple(psf.shape), "psfsamp": psfsamp, "psf_fwhm": psf_fwhm(psf, psfsamp),
        "psf_used": psf_used, "mask": mask, "mask_fraction": float(1 - mask.mean()),
        "n_nan": int(bad.sum()), "peak_snr_data": float(snr.max()), "truth": truth,
        "header_source_grid": header_grid, "lens_light_subtracted": lens_light, "warnings": warnings,
    }
    if truth is not None:
        model = problem.physical_forward(torch.as_tensor(truth, device=problem.device)[None])[0].cpu().numpy()
        meta["peak_snr_truth"] = float(np.where(mask, model / sigma_np, 0.0).max())
    return problem, torch.as_tensor(y_np, device=problem.device), meta
