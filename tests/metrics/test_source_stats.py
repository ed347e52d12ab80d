"""Source statistics on images with known answers: a Gaussian blob's total flux and half-light radius,
magnification as a flux ratio, and the summary's mean and central 68 % interval."""

import math

import numpy as np
import pytest

from pipeline.metrics.source_stats import half_light_radius, magnification, source_stats, summarize, total_flux


def _gauss(n, sigma_px, amp=1.0, cx=0.0, cy=0.0):
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma_px ** 2))


@pytest.mark.parametrize("n, sigma_px, pix, cx, cy", [(64, 5.0, 0.1, 3.3, -4.7), (32, 3.0, 0.05, -1.2, 0.4)])
def test_gaussian_flux_and_half_light_radius(n, sigma_px, pix, cx, cy):
    img = _gauss(n, sigma_px, amp=7.0, cx=cx, cy=cy)
    # analytic: flux = 2 pi sigma^2 amp [per arcsec^2 x arcsec^2]; r_half = sigma sqrt(2 ln 2)
    assert total_flux(img, pix)[0] == pytest.approx(2 * math.pi * (sigma_px * pix) ** 2 * 7.0, rel=1e-4)
    assert half_light_radius(img, pix)[0] == pytest.approx(sigma_px * pix * math.sqrt(2 * math.log(2)), rel=0.025)  # pixel-centre discretisation, sigma >= 3 px


def test_half_light_radius_follows_the_centroid_and_scales_with_the_pixel():
    a, b = _gauss(48, 4.0), _gauss(48, 4.0, cx=8.0, cy=-6.0)
    ra, rb = half_light_radius(np.stack([a, b]), 0.1)
    assert rb == pytest.approx(ra, rel=1e-3)
    assert half_light_radius(a, 0.2)[0] == pytest.approx(2 * ra, rel=1e-12)
    assert np.isnan(half_light_radius(-a, 0.1)[0])  # no positive flux: no radius


def test_magnification_is_image_flux_over_source_flux():
    assert magnification([30.0, 12.0], [3.0, 4.0]) == pytest.approx([10.0, 3.0])
    assert np.isnan(magnification([1.0], [0.0])[0])
    img = _gauss(32, 3.0, amp=2.0)
    flux = total_flux(img, 0.05)[0]
    st = source_stats(np.stack([img, img]), 0.05, [4 * flux * 2.0, 4 * flux * 2.0], flux_to_data=2.0)
    assert st["magnification"]["mean"] == pytest.approx(4.0) and st["flux"]["mean"] == pytest.approx(flux)


def test_summarize_mean_and_central_68_percent():
    v = np.random.default_rng(0).normal(3.0, 2.0, 200_000)
    s = summarize(np.append(v, np.nan))
    assert s["mean"] == pytest.approx(3.0, abs=0.02)
    assert s["lo"] == pytest.approx(3.0 - 2 * 0.9945, abs=0.03) and s["hi"] == pytest.approx(3.0 + 2 * 0.9945, abs=0.03)
    assert summarize([np.nan]) == {"mean": None, "lo": None, "hi": None}
