"""Bringing an observation to the trained pixel grid: flux-conserving rebinning by an integer factor
and cropping to the trained size, before the lens operator is built.

Arrays are flux per pixel (the pipeline's data unit, e.g. electron/s) with a 1-sigma map of the same
unit and a bool map of used pixels. Rebinning by k sums SCI over k x k blocks (flux per pixel is
conserved; a surface brightness, already multiplied by the pixel area on reading, is thereby
averaged), adds the variances (NOISE in quadrature), and keeps a block only when all its pixels are
used. The PSF is not block-summed: it keeps its own sampling (PSFSAMP) and is resampled to the
supersampled grid of the new pixels and renormalised like any file's PSF, since the supersampled
model applies the pixel response itself. Positions are in the array frame (arcsec from the array
centre): every window shifts the array centre, and the lens position with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REBIN_TOL = 1e-6
"""Largest relative difference between k x the file's pixel scale and the trained pixel scale."""


@dataclass
class Pixels:
    """SCI [flux per pixel], sigma [same unit] and used pixels (bool), all (ny, nx); ``pix`` [arcsec/pixel];
    ``shift`` (x, y) [arcsec]: the array centre relative to the file's array centre."""

    sci: np.ndarray
    sigma: np.ndarray
    used: np.ndarray
    pix: float
    shift: tuple[float, float] = (0.0, 0.0)

    @property
    def shape(self):
        return self.sci.shape

    def window(self, y0: int, x0: int, ny: int, nx: int) -> "Pixels":
        """Rows y0..y0+ny-1 and columns x0..x0+nx-1 of every map, the shift updated."""
        H, W = self.shape
        dx = (x0 + (nx - 1) / 2 - (W - 1) / 2) * self.pix
        dy = (y0 + (ny - 1) / 2 - (H - 1) / 2) * self.pix
        sl = (slice(y0, y0 + ny), slice(x0, x0 + nx))
        return Pixels(self.sci[sl], self.sigma[sl], self.used[sl], self.pix,
                      (self.shift[0] + dx, self.shift[1] + dy))


def rebin_factor(pix: float, target: float) -> int | None:
    """The integer k >= 2 with k x ``pix`` = ``target`` (both arcsec/pixel) within REBIN_TOL, else None."""
    k = round(target / pix)
    if k >= 2 and abs(k * pix / target - 1) <= REBIN_TOL:
        return int(k)
    return None


def rebin(px: Pixels, k: int) -> Pixels:
    """Sum k x k blocks (see the module docstring); a side that is not a multiple of k is trimmed,
    the remainder split between both ends."""
    H, W = px.shape
    px = px.window((H % k) // 2, (W % k) // 2, H - H % k, W - W % k)
    H, W = px.shape

    def blocks(a):
        return a.reshape(H // k, k, W // k, k)

    used = blocks(px.used).all(axis=(1, 3))
    sci = blocks(np.where(px.used, px.sci, 0.0)).sum(axis=(1, 3))
    var = blocks(np.where(px.used, px.sigma, 0.0) ** 2).sum(axis=(1, 3))
    sigma = np.where(used, np.sqrt(var), 1.0)
    return Pixels(np.where(used, sci, 0.0), sigma, used, px.pix * k, px.shift)


def crop(px: Pixels, npix: int, centre: tuple[float, float] | None = None) -> Pixels:
    """The npix x npix window around the array centre, or around ``centre`` (x, y) [arcsec, the current
    array frame] kept inside the image; a side already <= npix is kept whole."""
    H, W = px.shape
    starts = []
    for size, c in ((H, None if centre is None else centre[1]), (W, None if centre is None else centre[0])):
        if size <= npix:
            starts.append((0, size))
            continue
        if c is None:
            s = (size - npix) // 2
        else:
            s = int(round((size - 1) / 2 + c / px.pix - (npix - 1) / 2))
        starts.append((min(max(s, 0), size - npix), npix))
    (y0, ny), (x0, nx) = starts
    return px.window(y0, x0, ny, nx)
