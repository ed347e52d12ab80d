"""The observation's sky WCS for the pixels inference used: SCI's celestial WCS moved through the
rebinning and cropping of :mod:`pipeline.lensing.rebin`.

Both steps map an output pixel p (0-based, per axis) to a position in the file's pixels,
X = a + k p, with k the rebin factor (1 without rebinning) and a the file position of the first output
pixel's centre (a k x k block's centre is its mean pixel position). In FITS' 1-based pixels the new WCS
therefore has CRPIX' = (CRPIX - (a + 1 - k)) / k and a pixel matrix k times larger (CD, or CDELT with
PC unchanged); for a rebin alone a = (k - 1) / 2 and CRPIX' = (CRPIX - 0.5) / k + 0.5. Only the linear
part and the projection are carried over: distortion terms (SIP, lookup tables) are dropped.
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning


def celestial_wcs(header) -> WCS | None:
    """The celestial 2-D WCS of an image header without distortion terms, or None when it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            w = WCS(header, naxis=2)
        except Exception:  # astropy raises many types on malformed WCS keywords
            return None
    if not w.has_celestial or w.naxis != 2:
        return None
    w.sip = None
    w.cpdis1 = w.cpdis2 = w.det2im1 = w.det2im2 = None
    w.wcs.ctype = [c.replace("-SIP", "") for c in w.wcs.ctype]
    w.wcs.set()
    return w


def first_pixel(file_shape, image_shape, shift, file_pixscale: float, k: int) -> np.ndarray:
    """(a_x, a_y): file position (0-based pixels) of the centre of output pixel (0, 0).

    ``shift`` (x, y) [arcsec]: the output array centre relative to the file's array centre (array
    frame); ``file_pixscale`` [arcsec/pixel]; ``k`` the rebin factor."""
    (H, W), (ny, nx) = file_shape, image_shape
    cx = (W - 1) / 2 + shift[0] / file_pixscale - k * (nx - 1) / 2
    cy = (H - 1) / 2 + shift[1] / file_pixscale - k * (ny - 1) / 2
    return np.array([cx, cy])


def resampled_wcs(w: WCS, first: np.ndarray, k: int) -> WCS:
    """``w`` for pixels p whose centres lie at file positions X = first + k p (0-based, per axis)."""
    out = w.deepcopy()
    out.wcs.crpix = (np.asarray(w.wcs.crpix, float) - (np.asarray(first, float) + 1 - k)) / k
    if w.wcs.has_cd():
        out.wcs.cd = np.asarray(w.wcs.cd, float) * k
    else:
        out.wcs.cdelt = np.asarray(w.wcs.cdelt, float) * k
    out.wcs.set()
    return out


def observation_wcs_header(sci_header, meta: dict) -> fits.Header | None:
    """The WCS cards for the observation as inference saw it (``meta`` from
    :func:`pipeline.lensing.observation.load_observation`: file_shape, image_shape, crop_shift,
    file_pixscale, rebin), or None when SCI has no celestial WCS."""
    w = celestial_wcs(sci_header)
    if w is None:
        return None
    k = int(meta.get("rebin") or 1)
    first = first_pixel(meta["file_shape"], meta["image_shape"], meta["crop_shift"], meta["file_pixscale"], k)
    return resampled_wcs(w, first, k).to_header()
