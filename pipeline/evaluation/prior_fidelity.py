"""Does a prior chain make galaxies? Image statistics of prior draws against a reference set of galaxies.

Every function takes stacks of single-band images, arrays of shape (n, H, W) in physical surface-brightness
units (electron/(s arcsec2) for the shipped prior and sources cube), and is computed in float64.
:func:`fidelity_statistics` gathers them for draws and data with their ratios and distances; the
classifier two-sample test is in :mod:`pipeline.evaluation.prior_classifier`.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

BACKGROUND_FRACTION = 0.01  # a pixel is background when below this fraction of its image's peak
CORNER_SIZE = 4  # pixels: the side of each of the four corner squares
NEG_THRESHOLD = -5.0  # electron/(s arcsec2): pixels below it count as strongly negative
MIN_SCALE = 4.0  # source pixels: the power-spectrum deviation is taken over scales at least this large


def as_stack(images, name: str = "images") -> np.ndarray:
    """``images`` as a float64 array (n, H, W); ValueError naming ``name`` for any other shape."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"{name}: expected a stack of images (n, H, W), got shape {x.shape}")
    return x


def background_pixels(images, frac: float = BACKGROUND_FRACTION) -> np.ndarray:
    """The pixels of each image below ``frac`` times that image's peak (its maximum), pooled over images (1-D)."""
    x = as_stack(images)
    peak = x.max(axis=(1, 2), keepdims=True)
    return x[x < frac * peak]


def background_std(images, frac: float = BACKGROUND_FRACTION) -> float:
    """Standard deviation (ddof 0, input units) of :func:`background_pixels`; NaN when there are none."""
    pix = background_pixels(images, frac)
    return float(pix.std()) if pix.size else float("nan")


def corner_pixels(images, size: int = CORNER_SIZE) -> np.ndarray:
    """The pixels of the four ``size`` x ``size`` corner squares of every image, pooled (1-D)."""
    x = as_stack(images)
    if 2 * size > min(x.shape[1:]):
        raise ValueError(f"corner size {size} does not fit twice into images of {x.shape[1]}x{x.shape[2]}")
    corners = [x[:, :size, :size], x[:, :size, -size:], x[:, -size:, :size], x[:, -size:, -size:]]
    return np.concatenate([c.ravel() for c in corners])


def corner_std(images, size: int = CORNER_SIZE) -> float:
    """Standard deviation (ddof 0, input units) of :func:`corner_pixels`."""
    return float(corner_pixels(images, size).std())


def fraction_below(images, threshold: float = NEG_THRESHOLD) -> float:
    """Fraction of all pixels strictly below ``threshold`` (input units)."""
    return float(np.mean(as_stack(images) < threshold))


def ks_two_sample(a, b) -> dict:
    """Two-sample Kolmogorov-Smirnov test of 1-D samples (NaNs dropped): distance ``ks`` (max CDF gap)
    and ``p`` (scipy's ``ks_2samp``, two-sided, exact for small samples, asymptotic for large)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    res = stats.ks_2samp(a, b)
    return {"ks": float(res.statistic), "p": float(res.pvalue)}


def radial_power_spectrum(images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuthally averaged power spectrum of a stack, mean over images.

    The power of one image is ``|FFT2(image)|^2 / (H W)`` (input units squared); spatial frequencies
    f = |(f_y, f_x)| in cycles/pixel are binned at the integers k = round(f N), N = min(H, W), for
    k = 1 .. N // 2 (the mean, k = 0, is left out). Returns (k, scale, power): ``scale = N / k`` is the
    wavelength of the bin in pixels, ``power`` the mean over the frequencies of the bin and the images.
    """
    x = as_stack(images)
    n_img, h, w = x.shape
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(axis=0) / (h * w)
    side = min(h, w)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    k_of = np.rint(f * side).astype(int)
    k = np.arange(1, side // 2 + 1)
    binned = np.array([power[k_of == kk].mean() for kk in k])
    return k, side / k, binned


def power_spectrum_ratio(draws, data, min_scale: float = MIN_SCALE) -> dict:
    """Per radial bin (:func:`radial_power_spectrum`) the ratio draws/data, with the bin's scale in
    pixels, and ``max_abs_dev``: max |ratio - 1| over the bins of scale >= ``min_scale`` pixels."""
    k, scale, p_draws = radial_power_spectrum(draws)
    k2, _, p_data = radial_power_spectrum(data)
    if len(k) != len(k2):
        raise ValueError(f"draws and data differ in image size: {as_stack(draws).shape} vs {as_stack(data).shape}")
    ratio = p_draws / p_data
    keep = scale >= min_scale
    return {"k": k.tolist(), "scale_pix": scale.tolist(), "ratio": ratio.tolist(),
            "min_scale_pix": float(min_scale),
            "max_abs_dev": float(np.max(np.abs(ratio[keep] - 1.0))) if keep.any() else float("nan")}


def total_flux(images, pixscale: float) -> np.ndarray:
    """Per image, the sum of its pixels times the pixel area ``pixscale**2`` (arcsec2): electron/s for
    images in electron/(s arcsec2). Shape (n,)."""
    return as_stack(images).sum(axis=(1, 2)) * float(pixscale) ** 2


def half_light_radius(images, pixscale: float) -> np.ndarray:
    """Circularised half-light radius of each image in arcsec (``pixscale`` in arcsec/pixel). Shape (n,).

    Negative pixels are set to zero first. Around the flux-weighted centroid of the rest, the growth
    curve (flux of the pixels whose centres lie within radius r) is interpolated linearly at half the
    total flux (a few per cent discretisation error at radii of ~3 pixels); images without positive
    flux give NaN.
    """
    w = np.clip(as_stack(images), 0.0, None)
    n, h, wd = w.shape
    tot = w.sum(axis=(1, 2))
    yy, xx = np.mgrid[:h, :wd].astype(np.float64)
    out = np.full(n, np.nan)
    for i in np.flatnonzero(tot > 0):
        cy, cx = (w[i] * yy).sum() / tot[i], (w[i] * xx).sum() / tot[i]
        r = np.hypot(yy - cy, xx - cx).ravel()
        order = np.argsort(r, kind="stable")
        growth = np.cumsum(w[i].ravel()[order])
        out[i] = np.interp(0.5 * tot[i], growth, r[order]) * float(pixscale)
    return out


def flux_unit(unit: str) -> str:
    """The unit of :func:`total_flux` for images in surface-brightness ``unit`` (times arcsec2)."""
    return "electron/s" if unit == "electron/(s arcsec2)" else f"{unit} arcsec2"


def _summary(draws_value: float, data_value: float) -> dict:
    ratio = draws_value / data_value if data_value != 0 else float("nan")
    return {"draws": float(draws_value), "data": float(data_value), "ratio": float(ratio)}


def _distribution(draws_values: np.ndarray, data_values: np.ndarray) -> dict:
    return {"draws_median": float(np.nanmedian(draws_values)), "data_median": float(np.nanmedian(data_values)),
            **ks_two_sample(draws_values, data_values)}


def fidelity_statistics(draws, data, pixscale: float, neg_threshold: float = NEG_THRESHOLD,
                        bg_frac: float = BACKGROUND_FRACTION, corner: int = CORNER_SIZE,
                        min_scale: float = MIN_SCALE, unit: str = "electron/(s arcsec2)") -> dict:
    """All image statistics of ``draws`` against ``data`` (both (n, H, W), same units and pixel grid;
    ``pixscale`` in arcsec/pixel; ``unit`` their surface-brightness unit, recorded). Each scalar
    statistic comes as {draws, data, ratio}; distributions as medians with the two-sample KS distance
    and p-value. Pixel values within an image are correlated, so the pixel-value KS p-value overstates
    the significance (compare the distances); total flux and half-light radius are one value per image.
    """
    draws, data = as_stack(draws, "draws"), as_stack(data, "data")
    if draws.shape[1:] != data.shape[1:]:
        raise ValueError(f"draws are {draws.shape[1]}x{draws.shape[2]} images, data {data.shape[1]}x{data.shape[2]}")
    return {
        "background_std": {**_summary(background_std(draws, bg_frac), background_std(data, bg_frac)),
                           "unit": unit, "rule": f"std of pixels below {bg_frac} x own image peak, pooled"},
        "corner_std": {**_summary(corner_std(draws, corner), corner_std(data, corner)), "unit": unit,
                       "rule": f"std of the four {corner}x{corner} corners, pooled"},
        "fraction_below": {**_summary(fraction_below(draws, neg_threshold), fraction_below(data, neg_threshold)),
                           "threshold": float(neg_threshold), "unit": unit},
        "pixel_values": {**_distribution(draws.ravel(), data.ravel()), "unit": unit},
        "power_spectrum": power_spectrum_ratio(draws, data, min_scale),
        "total_flux": {**_distribution(total_flux(draws, pixscale), total_flux(data, pixscale)),
                       "unit": flux_unit(unit)},
        "half_light_radius": {**_distribution(half_light_radius(draws, pixscale),
                                              half_light_radius(data, pixscale)), "unit": "arcsec"},
    }
