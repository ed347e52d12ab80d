"""Source-plane quantities astronomers quote, per posterior sample: total flux, magnification and
half-light radius, and their posterior mean and central 68 % interval.

Units: source images are surface brightness on a square grid of ``pixscale`` [arcsec/pixel], so the
total flux is sum(x) x pixscale^2 in (surface-brightness unit x arcsec^2), e.g. electron/s for
electron/(s arcsec2). The half-light radius is in arcsec. The magnification is dimensionless: the total
flux of the noiseless model image (every image pixel, masked or not, within the observed field) over the
source's intrinsic flux, both in the same flux unit.
"""

from __future__ import annotations

import numpy as np


def _stack(x) -> np.ndarray:
    """(n, ny, nx) float64 from (ny, nx), (n, ny, nx) or (n, 1, ny, nx)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"source images must have shape (n, ny, nx), got {a.shape}")
    return a


def total_flux(x, pixscale: float) -> np.ndarray:
    """(n,) total flux of each source image: sum of surface brightness x pixel area [unit x arcsec^2]."""
    if not pixscale > 0:
        raise ValueError(f"pixscale must be > 0 (arcsec/pixel), got {pixscale}")
    return _stack(x).sum(axis=(1, 2)) * float(pixscale) ** 2


def half_light_radius(x, pixscale: float) -> np.ndarray:
    """(n,) circularised half-light radius [arcsec] of each source image.

    Around the flux-weighted centroid, the radius of the circle holding half the total flux: pixels are
    taken at their centres and sorted by distance, each counted half inside at its own distance, and the
    radius at which the cumulative flux first reaches half the total is interpolated linearly between
    neighbouring pixel distances (within 2.5 % of the exact value for a Gaussian of sigma >= 3 pixels).
    Signed values are used (sample noise averages out); NaN where the total flux is not positive."""
    a = _stack(x)
    n, ny, nx = a.shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64) * float(pixscale)
    out = np.full(n, np.nan)
    for i in range(n):
        f = a[i]
        tot = f.sum()
        if not tot > 0:
            continue
        cx, cy = (f * xx).sum() / tot, (f * yy).sum() / tot
        r = np.hypot(xx - cx, yy - cy).ravel()
        order = np.argsort(r, kind="stable")
        fs = f.ravel()[order]
        r, cum = r[order], np.cumsum(fs) - 0.5 * fs  # a pixel is half inside at its own distance
        k = int(np.argmax(cum >= 0.5 * tot))
        if k == 0:
            out[i] = r[0]
            continue
        c0, c1 = cum[k - 1], cum[k]
        out[i] = r[k - 1] + (0.5 * tot - c0) / (c1 - c0) * (r[k] - r[k - 1])
    return out


def magnification(image_flux, source_flux) -> np.ndarray:
    """(n,) total model-image flux over intrinsic source flux (same unit); NaN where the source flux is
    not positive."""
    img, src = np.asarray(image_flux, np.float64), np.asarray(source_flux, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(src > 0, img / np.where(src > 0, src, 1.0), np.nan)


COVERED_PERCENTILES = (0.0, 1.0, 50.0, 99.0, 100.0)
"""Percentiles of a training set's per-image quantities that :func:`covered_ranges` records."""


def covered_ranges(x, pixscale: float) -> dict:
    """What a set of source images covers, for a guard to compare new sources with: per image the total
    flux [unit x arcsec^2], the half-light radius [arcsec] and the peak surface brightness [unit], each
    summarised by its ``COVERED_PERCENTILES`` (min, 1 %, median, 99 %, max; NaNs dropped).

    Returns {"percentiles": [...], "flux": [...], "r_half": [...], "peak": [...], "n": int}."""
    a = _stack(x)
    per_image = {"flux": total_flux(a, pixscale), "r_half": half_light_radius(a, pixscale),
                 "peak": a.max(axis=(1, 2))}
    out = {"percentiles": list(COVERED_PERCENTILES), "n": int(a.shape[0])}
    for name, v in per_image.items():
        v = v[np.isfinite(v)]
        out[name] = [float(q) for q in np.percentile(v, COVERED_PERCENTILES)] if v.size else None
    return out


def summarize(values) -> dict:
    """Posterior mean and central 68 % interval (16th and 84th percentiles) of per-sample values, NaNs
    dropped: {"mean", "lo", "hi"} (None when no value is finite)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": None, "lo": None, "hi": None}
    lo, hi = np.percentile(v, [16.0, 84.0])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi)}


def source_stats(samples, pixscale: float, image_flux, flux_to_data: float = 1.0) -> dict:
    """Per-sample statistics of source ``samples`` (n, ny, nx) [surface brightness] summarised.

    ``image_flux``: (n,) total flux of each sample's noiseless model image [data unit];
    ``flux_to_data``: data unit per (surface-brightness unit x arcsec^2), so that the magnification
    compares like with like. Returns {"flux", "magnification", "r_half"}, each {"mean", "lo", "hi"};
    flux in (surface-brightness unit x arcsec^2), r_half in arcsec."""
    flux = total_flux(samples, pixscale)
    return {"flux": summarize(flux),
            "magnification": summarize(magnification(image_flux, flux * float(flux_to_data))),
            "r_half": summarize(half_light_radius(samples, pixscale))}
