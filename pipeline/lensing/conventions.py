"""Instrument conventions of observation files: the noise extension, data-quality masks, the pixel
grid from the SCI header's WCS, and checks of SCI that catch unusable data before any work.

* Noise, first found of: ``NOISE`` or ``ERR`` (1 sigma per pixel, SCI's unit), ``IVM`` (inverse
  variance, SCI's unit^-2), ``WHT`` as inverse variance only when its ``WHTTYPE`` (in WHT, SCI or the
  primary header) is ``IVM`` or ``lensing.observation.wht`` is ``ivm``: HST drizzle's default WHT is an
  exposure-time map, and JWST's depends on the resampling weight type. Pixels of zero inverse
  variance are masked. The noise is taken as uncorrelated between pixels; this cannot be checked,
  and the ERR of drizzled (resampled) images understates the noise of sums of pixels.
* Masks: ``MASK`` (``MASKTYPE`` GOOD: nonzero = used; BAD: nonzero = ignored) and ``DQ`` (nonzero =
  bad, e.g. HST/JWST data-quality flags); both apply when both are present.
* Pixel grid: SCI's pixel->world matrix read by ``astropy.wcs`` (CD, PC x CDELT, or CDELT with
  CROTA2; CUNIT arcsec, arcmin or deg, deg when absent), else ``PIXSCALE`` [arcsec/pixel]; pixels
  must be square. ``PIXSCALE``, ``PIXAR_A2`` [arcsec^2] or ``PIXAR_SR`` [sr] given besides must agree.
"""

from __future__ import annotations

import math
import warnings

import astropy.units as u
import numpy as np
from astropy.wcs import WCS, FITSFixedWarning

from pipeline.errors import InputFileError
from pipeline.lensing.grids import ARCSEC_PER_UNIT
from pipeline.lensing.units import header_number

NOISE_HDUS = ("NOISE", "ERR", "IVM", "WHT")
WCS_NUMBERS = ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "CDELT1", "CDELT2", "PC1_1", "PC1_2", "PC2_1", "PC2_2",
               "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CROTA2")
ARCSEC2_PER_SR = (u.sr).to(u.arcsec ** 2)
PIXEL_AREA_TOL = 0.05
"""Largest relative difference between PIXAR_A2 / PIXAR_SR and the square of the pixel scale."""


def noise_sigma(path, hdus: dict, wht: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(HDU used, 1-sigma map [that HDU's linear unit, SCI's], covered): NOISE/ERR as they are,
    IVM/WHT as 1/sqrt; ``covered`` (bool) is False where the inverse variance is zero or negative."""
    for name in NOISE_HDUS:
        if name not in hdus or hdus[name][0] is None:
            continue
        arr, h = hdus[name]
        if name in ("NOISE", "ERR"):
            return name, arr, np.ones(arr.shape, bool)
        if name == "WHT" and wht != "ivm":
            kind = str(h.get("WHTTYPE", hdus["SCI"][1].get("WHTTYPE", hdus["PRIMARY"][1].get("WHTTYPE", "")))).strip()
            if kind.upper() not in ("IVM", "INVVAR"):
                raise InputFileError(path, "WHT is not labelled as an inverse variance (HST drizzle's default WHT "
                                     "is an exposure-time map): set WHTTYPE = 'IVM' if it is one, or give NOISE, "
                                     "ERR or IVM", field="WHT.WHTTYPE")
        covered = arr > 0                     # NaN compares False: masked as not covered
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = np.where(covered, 1.0 / np.sqrt(np.where(covered, arr, 1.0)), 1.0)
        return name, sigma, covered
    raise InputFileError(path, f"required image HDU NOISE missing (or ERR, IVM, WHT; HDUs: {', '.join(hdus)})",
                         field="NOISE")


def quality_mask(path, hdus: dict, shape) -> np.ndarray:
    """Used pixels (bool, SCI's shape) from ``MASK`` and ``DQ``; all True without them."""
    good = np.ones(shape, bool)
    for name in ("MASK", "DQ"):
        if name not in hdus or hdus[name][0] is None:
            continue
        m, mh = hdus[name]
        if m.shape != shape:
            raise InputFileError(path, f"{name} shape {m.shape} != SCI shape {shape}", field=name)
        if not np.isfinite(m).all():
            raise InputFileError(path, f"{name} contains NaN", field=name)
        kind = str(mh.get("MASKTYPE", "GOOD" if name == "MASK" else "BAD")).upper()
        if kind not in ("GOOD", "BAD"):
            raise InputFileError(path, f"MASKTYPE must be GOOD or BAD, got {kind!r}", field=f"{name}.MASKTYPE")
        good &= (m != 0) if kind == "GOOD" else (m == 0)
    return good


def _wcs_matrix(path, sci_h) -> np.ndarray | None:
    """SCI's pixel->world matrix [arcsec/pixel], None without CD or CDELT keywords."""
    for key in WCS_NUMBERS:
        if key in sci_h:
            header_number(sci_h, key, path, "SCI")
    has_cd = any(k in sci_h for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"))
    if not has_cd and not ("CDELT1" in sci_h and "CDELT2" in sci_h):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            J = np.array(WCS(sci_h, fix=False, naxis=2).pixel_scale_matrix, dtype=np.float64)
    except Exception as exc:  # wcslib raises several types for inconsistent headers
        raise InputFileError(path, f"unreadable WCS ({str(exc).splitlines()[0]})", field="SCI.CTYPE1") from None
    u1 = str(sci_h.get("CUNIT1", "deg")).strip().lower()
    u2 = str(sci_h.get("CUNIT2", u1)).strip().lower()
    if u1 not in ARCSEC_PER_UNIT or u2 not in ARCSEC_PER_UNIT:
        raise InputFileError(path, f"unsupported WCS unit {u1!r}/{u2!r} (arcsec, arcmin, deg)", field="SCI.CUNIT1")
    return J * np.array([[ARCSEC_PER_UNIT[u1]], [ARCSEC_PER_UNIT[u2]]])


def pixel_geometry(path, sci_h, prim_h, shape) -> tuple[float, np.ndarray | None, np.ndarray]:
    """(pixel scale [arcsec/pixel], J [arcsec/pixel] or None, CRPIX - array centre (x, y) [pixel]) from
    SCI's WCS, else PIXSCALE; PIXSCALE / PIXAR_A2 / PIXAR_SR given besides are checked against it."""
    J = _wcs_matrix(path, sci_h)
    offset = np.zeros(2)
    if J is not None:
        det = np.linalg.det(J)
        if not np.isfinite(J).all() or abs(det) <= 0:
            raise InputFileError(path, "pixel->world matrix is singular", field="SCI.CD1_1")
        pix = math.sqrt(abs(det))
        if not np.allclose(J.T @ J, pix * pix * np.eye(2), rtol=1e-4, atol=1e-8 * pix * pix):
            raise InputFileError(path, "pixels are not square or the WCS is skewed (CD/PC matrix not a scaled "
                                 "rotation); resample to square pixels first", field="SCI.CD1_1")
        ny, nx = shape
        crpix = np.array([header_number(sci_h, k, path, "SCI") if k in sci_h else (n + 1) / 2
                          for k, n in (("CRPIX1", nx), ("CRPIX2", ny))])
        offset = crpix - np.array([(nx + 1) / 2, (ny + 1) / 2])
    pix_kw = [(name, h) for name, h in (("SCI", sci_h), ("PRIMARY", prim_h)) if "PIXSCALE" in h]
    for i, (name, h) in enumerate(pix_kw):
        v = header_number(h, "PIXSCALE", path, name)
        if J is None and i == 0:
            if not v > 0:
                raise InputFileError(path, f"PIXSCALE must be > 0, got {v}", field=f"{name}.PIXSCALE")
            pix = v
        elif abs(v / pix - 1) > 1e-3:
            where = "WCS pixel scale" if J is not None else f"{pix_kw[0][0]} PIXSCALE"
            raise InputFileError(path, f"PIXSCALE {v} disagrees with the {where} {pix:.6g}",
                                 field=f"{name}.PIXSCALE")
    if J is None and not pix_kw:
        raise InputFileError(path, "pixel scale missing: give SCI a CD/CDELT WCS in arcsec or PIXSCALE",
                             field="SCI.PIXSCALE")
    _check_pixel_area(path, pix, sci_h, prim_h)
    return pix, J, offset


def _check_pixel_area(path, pix: float, sci_h, prim_h) -> None:
    """PIXAR_A2 [arcsec^2] / PIXAR_SR [sr], when given, must equal pix^2 within PIXEL_AREA_TOL."""
    for name, h in (("SCI", sci_h), ("PRIMARY", prim_h)):
        for key, to_a2 in (("PIXAR_A2", 1.0), ("PIXAR_SR", ARCSEC2_PER_SR)):
            if key in h:
                area = header_number(h, key, path, name) * to_a2
                if not abs(area / (pix * pix) - 1) <= PIXEL_AREA_TOL:
                    raise InputFileError(path, f"pixel area {key} ({area:.6g} arcsec2) disagrees with the pixel "
                                         f"scale {pix:.6g}\"/pixel ({pix * pix:.6g} arcsec2)", field=f"{name}.{key}")


def check_sci_values(path, sci) -> None:
    """Refuse SCI without a finite pixel, and SCI that is all zero."""
    finite = np.isfinite(sci)
    if not finite.any():
        raise InputFileError(path, "SCI has no finite pixel (all NaN or inf)", field="SCI")
    if not (sci[finite] != 0).any():
        raise InputFileError(path, "SCI is all zero", field="SCI")


def check_noise_scale(path, sci, sigma, used, noise_name: str, max_ratio: float) -> None:
    """Refuse SCI whose robust scatter (1.4826 x median absolute deviation) over the ``used`` pixels
    differs from the median noise by more than ``max_ratio`` either way (SCI and noise in different
    units or scales)."""
    vals = sci[used]
    scatter = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
    level = float(np.median(sigma[used]))
    if scatter > 0 and level > 0 and not 1 / max_ratio <= scatter / level <= max_ratio:
        raise InputFileError(path, f"SCI's pixel scatter {scatter:.4g} is {scatter / level:.3g} times the median "
                             f"{noise_name} {level:.4g}: SCI and {noise_name} look like different units or scales",
                             field="SCI")
