"""Pixel grids: the pixel scale read from a FITS header, bilinear resampling and block averages.

Array frame: [row = y, column = x]; grids are centred on their array centres (even grids on the corner
between the four central pixels).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from pipeline.errors import InputFileError

ARCSEC_PER_UNIT = {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0}


def pixel_matrix(header) -> np.ndarray:
    """The 2x2 pixel->world matrix [world units per pixel] from CD, or PC*CDELT; KeyError if absent."""
    if "CD1_1" in header or "CD2_2" in header:
        return np.array([[header.get("CD1_1", 0.0), header.get("CD1_2", 0.0)],
                         [header.get("CD2_1", 0.0), header.get("CD2_2", 0.0)]], dtype=np.float64)
    if "CDELT1" in header and "CDELT2" in header:
        pc = np.array([[header.get("PC1_1", 1.0), header.get("PC1_2", 0.0)],
                       [header.get("PC2_1", 0.0), header.get("PC2_2", 1.0)]], dtype=np.float64)
        return pc * np.array([[header["CDELT1"]], [header["CDELT2"]]], dtype=np.float64)
    raise KeyError("no CD or CDELT")


def header_pixscale(header, path, field: str) -> float | None:
    """Pixel scale [arcsec/px] from PIXSCALE, or a CD / PC*CDELT matrix (CUNIT1 arcsec, arcmin or deg,
    default deg); None when the header has neither. ``path`` and ``field`` (the HDU name) name the
    file and keyword in errors."""
    if "PIXSCALE" in header:
        v = float(header["PIXSCALE"])
        if not v > 0:
            raise InputFileError(path, f"PIXSCALE must be > 0, got {v}", field=f"{field}.PIXSCALE")
        return v
    try:
        J = pixel_matrix(header)
    except KeyError:
        return None
    unit = str(header.get("CUNIT1", "deg")).strip().lower()
    fac = ARCSEC_PER_UNIT.get(unit)
    if fac is None:
        raise InputFileError(path, f"unsupported CUNIT1 {unit!r} (arcsec, arcmin, deg)", field=f"{field}.CUNIT1")
    return float(math.sqrt(abs(np.linalg.det(J)))) * fac


def resample_image(img: np.ndarray, from_scale: float, to_scale: float, npix: int) -> np.ndarray:
    """Bilinear samples of a surface-brightness map ``img`` (ny, nx) of pixel ``from_scale`` at the
    centres of an npix x npix grid of spacing ``to_scale`` (both in the same unit, e.g. arcsec/px),
    both grids centred on their array centres; zero outside the input. (npix, npix) float64, same unit
    as ``img``."""
    ny, nx = img.shape
    c = (np.arange(npix) - (npix - 1) / 2) * to_scale / from_scale
    rows = c[:, None] + (ny - 1) / 2 + 0 * c[None, :]
    cols = c[None, :] + (nx - 1) / 2 + 0 * c[:, None]
    return ndi.map_coordinates(img, [rows, cols], order=1, mode="constant", cval=0.0)


def block_average(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks: (..., f n, f n) -> (..., n, n) float64. Surface brightness keeps
    its unit, so the total flux (sum x pixel area) is unchanged."""
    img = np.asarray(img, np.float64)
    *lead, ny, nx = img.shape
    if ny % factor or nx % factor:
        raise ValueError(f"shape {img.shape[-2:]} is not a multiple of the factor {factor}")
    return img.reshape(*lead, ny // factor, factor, nx // factor, factor).mean(axis=(-3, -1))
