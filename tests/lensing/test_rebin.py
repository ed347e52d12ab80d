"""Rebinning and cropping of observation pixels (pipeline.lensing.rebin), checked by hand."""

import numpy as np
import pytest

from pipeline.lensing.rebin import Pixels, crop, rebin, rebin_factor


def test_rebin_factor_only_for_integer_fractions():
    assert rebin_factor(0.05, 0.1) == 2 and rebin_factor(0.025, 0.1) == 4 and rebin_factor(0.1 / 3, 0.1) == 3
    assert rebin_factor(0.1, 0.1) is None and rebin_factor(0.04, 0.1) is None and rebin_factor(0.2, 0.1) is None


def test_rebin_sums_flux_adds_variance_and_drops_partly_bad_blocks():
    sci = np.arange(16, dtype=float).reshape(4, 4)
    sigma = np.full((4, 4), 0.5)
    used = np.ones((4, 4), bool)
    used[3, 3] = False
    out = rebin(Pixels(sci, sigma, used, 0.05), 2)
    assert out.pix == pytest.approx(0.1) and out.shift == (0.0, 0.0)
    assert out.sci[0, 0] == 0 + 1 + 4 + 5 and out.sci[1, 0] == 8 + 9 + 12 + 13
    assert out.sigma[0, 0] == pytest.approx(1.0)            # sqrt(4 x 0.25)
    assert out.used.tolist() == [[True, True], [True, False]]
    assert out.sci[1, 1] == 0 and out.sigma[1, 1] == 1.0      # dropped block: neutral values


def test_rebin_trims_odd_sides_and_records_the_centre_shift():
    px = Pixels(np.ones((5, 6)), np.ones((5, 6)), np.ones((5, 6), bool), 0.05)
    out = rebin(px, 2)
    assert out.shape == (2, 3)
    # rows 0..3 kept of 0..4: the centre moves from row 2 to row 1.5, i.e. -0.5 px = -0.025"
    assert out.shift == pytest.approx((0.0, -0.025))


def test_crop_around_centre_and_around_a_point():
    n = 10
    sci = np.arange(n * n, dtype=float).reshape(n, n)
    px = Pixels(sci, np.ones((n, n)), np.ones((n, n), bool), 0.1)
    c = crop(px, 4)
    assert c.sci[0, 0] == sci[3, 3] and c.shift == pytest.approx((0.0, 0.0))
    p = crop(px, 4, centre=(0.3, -0.2))                        # 3 px right, 2 px down of the centre
    assert p.shift == pytest.approx((0.3, -0.2))
    assert p.sci[0, 0] == sci[1, 6]                          # rows 1..4, columns 6..9
    edge = crop(px, 4, centre=(5.0, 0.0))                      # kept inside the image
    assert edge.sci[0, -1] == sci[3, 9]
    assert crop(px, 20).shape == (n, n)
