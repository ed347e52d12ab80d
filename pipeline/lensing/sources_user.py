"""The user's own source cube: a FITS cube (N, ny, nx) of surface brightness with its pixel scale in the
header (PIXSCALE, or a CD / CDELT matrix in arcsec, arcmin or deg), bilinearly resampled to the source
grid when the scale or shape differ (zero outside the cube)."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import InputFileError
from pipeline.io.fits import _open
from pipeline.lensing.grids import header_pixscale, resample_image

log = logging.getLogger(__name__)


def _read_cube(path, hdu: str | None) -> tuple[np.ndarray, object, str]:
    """The cube (N, ny, nx) float64 of HDU ``hdu`` (default: the first 3-D image HDU), its header and
    its name; one-line errors naming the file and HDU."""
    with _open(path) as hdul:
        if hdu is not None:
            if hdu.upper() not in [h.name for h in hdul]:
                raise InputFileError(path, f"no HDU named {hdu!r}", field=hdu)
            h = hdul[hdu]
        else:
            h = next((x for x in hdul if getattr(x, "data", None) is not None and x.data.ndim == 3), None)
            if h is None:
                raise InputFileError(path, "no 3-D image HDU (N, ny, nx) found", field="PRIMARY")
        name = h.name or "PRIMARY"
        data, header = h.data, h.header.copy()
    if data is None or data.ndim != 3:
        raise InputFileError(path, f"expected a cube (N, ny, nx), got shape {None if data is None else data.shape}",
                             field=name)
    cube = np.asarray(data, dtype=np.float64)
    if not np.isfinite(cube).all():
        raise InputFileError(path, "cube contains NaN or infinite values", field=name)
    return cube, header, name


def user_sources(path, npix: int, pixscale: float, hdu: str | None = None) -> np.ndarray:
    """The user's cube (N, ny, nx) at ``path`` as (N, npix, npix) float32 surface brightness (the cube's
    unit) on the source grid of ``pixscale`` [arcsec/px]."""
    cube, header, name = _read_cube(path, hdu)
    scale = header_pixscale(header, path, name)
    if scale is None:
        raise InputFileError(path, "pixel scale missing: set PIXSCALE [arcsec/pixel] or a CD/CDELT matrix",
                             field=f"{name}.PIXSCALE")
    if cube.shape[1:] == (npix, npix) and abs(scale / pixscale - 1) < 1e-6:
        return cube.astype(np.float32)
    log.info("resampling user cube %s from %.4g\"/px %s to %.4g\"/px (%d, %d)", path, scale, cube.shape[1:],
             pixscale, npix, npix)
    return np.stack([resample_image(im, scale, pixscale, npix) for im in cube]).astype(np.float32)
