"""Critical curves and caustics of the operator's lens against the isothermal lens's closed forms.

caustics' SIE has convergence kappa = sqrt(q) Rein / (2 sqrt(q^2 x'^2 + y'^2)) in the lens frame, and an
isothermal lens has |shear| = kappa, so det = 1 - 2 kappa: the tangential critical curve is the ellipse
kappa = 1/2 with semi-axes Rein / sqrt(q) (along the lens's x') and sqrt(q) Rein, enclosing pi Rein^2 for
every q (the SIS circle of radius Rein at q = 1).
"""

import numpy as np
import pytest
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.lensing.critical import (caustics_of, critical_curves, curves_from_header, jacobian_det, lens_curves,
                                       lens_from_header, lens_system)
from pipeline.lensing.operator import LensParams

REIN = 0.8


def enclosed_area(curve: np.ndarray) -> float:
    """Shoelace area [arcsec^2] of a closed polygon (k, 2)."""
    x, y = curve[:, 0], curve[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def count_cusps(curve: np.ndarray, centre) -> int:
    """Local maxima of the distance from ``centre`` along a closed curve (an astroid has 4)."""
    r = np.hypot(curve[:-1, 0] - centre[0], curve[:-1, 1] - centre[1])
    w = 5
    peaks = [i for i in range(len(r)) if r[i] == max(r[(i + k) % len(r)] for k in range(-w, w + 1))]
    return len(peaks)


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    d = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    return float(max(d.min(1).max(), d.min(0).max()))


def test_sis_critical_curve_is_the_einstein_circle_and_its_caustic_a_point():
    lens = LensParams(q=1.0, rein=REIN, x0=0.1, y0=-0.2)
    crit, caus = lens_curves(lens)
    assert len(crit) == len(caus) == 1
    c = crit[0]
    assert np.allclose(c[0], c[-1])                                  # closed
    r = np.hypot(c[:, 0] - 0.1, c[:, 1] + 0.2)
    np.testing.assert_allclose(r, REIN, atol=2e-4)                   # 2.5e-4 of Rein
    # the caustic collapses onto the lens centre (q -> 1 leaves caustics' 1e-6 ellipticity)
    assert np.hypot(caus[0][:, 0] - 0.1, caus[0][:, 1] + 0.2).max() < 1e-3


def test_sie_critical_ellipse_area_and_axes_and_the_diamond_caustic():
    phi = 0.4
    lens = LensParams(q=0.7, rein=REIN, phi=phi)
    crit, caus = lens_curves(lens)
    assert len(crit) == 1
    c = crit[0]
    assert enclosed_area(c) == pytest.approx(np.pi * REIN ** 2, rel=2e-3)
    # in the lens frame: x'^2 q / Rein^2 + y'^2 / (q Rein^2) = 1
    u = c[:, 0] * np.cos(phi) + c[:, 1] * np.sin(phi)
    v = -c[:, 0] * np.sin(phi) + c[:, 1] * np.cos(phi)
    np.testing.assert_allclose(np.sqrt(u ** 2 * 0.7 + v ** 2 / 0.7), REIN, rtol=1e-3)
    k = caus[0]
    extent_crit = np.hypot(c[:, 0], c[:, 1]).max()
    extent_caus = np.hypot(k[:, 0], k[:, 1]).max()
    assert 0.05 * extent_crit < extent_caus < 0.5 * extent_crit
    assert count_cusps(k, (0.0, 0.0)) == 4


def test_jacobian_det_is_one_minus_twice_kappa_for_the_sie():
    lens = LensParams(q=0.6, rein=1.0, phi=-0.3, x0=0.2)
    x, y = np.array([0.9, -0.5, 0.3, 1.7]), np.array([0.1, 0.8, -1.2, -0.4])
    u = (x - 0.2) * np.cos(-0.3) + y * np.sin(-0.3)
    v = -(x - 0.2) * np.sin(-0.3) + y * np.cos(-0.3)
    kappa = np.sqrt(0.6) / (2 * np.sqrt(0.36 * u ** 2 + v ** 2))
    np.testing.assert_allclose(jacobian_det(lens_system(lens), x, y), 1 - 2 * kappa, atol=1e-6)


@pytest.mark.parametrize("g1,g2", [(0.0, 0.0), (0.08, -0.05)])
def test_lens_offset_shifts_the_curves(g1, g2):
    d = np.array([0.13, -0.21])
    base = LensParams(q=0.75, rein=REIN, phi=1.1, g1=g1, g2=g2)
    moved = LensParams(q=0.75, rein=REIN, phi=1.1, g1=g1, g2=g2, x0=d[0], y0=d[1])
    (c0,), (k0,) = lens_curves(base)
    (c1,), (k1,) = lens_curves(moved)
    assert c0.shape == c1.shape
    np.testing.assert_allclose(c1, c0 + d, atol=1e-9)
    # the shear is centred on the origin: beta' = beta + (I - Gamma) d, so the caustic moves by that
    shift = d - np.array([[g1, g2], [g2, -g1]]) @ d
    np.testing.assert_allclose(k1, k0 + shift, atol=1e-9)
    if g1 or g2:
        assert hausdorff(k1, k0 + d) > 0.01                          # not simply by d


def test_caustics_of_maps_points_through_the_lens_equation():
    lens = LensParams(q=1.0, rein=REIN)
    pts = np.array([[REIN, 0.0], [0.0, 2 * REIN]])
    (out,) = caustics_of(lens, [pts])
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.0, REIN]], atol=1e-5)


def test_epl_shallower_than_isothermal_has_a_radial_critical_curve_too():
    crit = critical_curves(LensParams(model="EPL", t=0.8, q=0.8, rein=REIN))
    assert len(crit) == 2
    areas = sorted(enclosed_area(c) for c in crit)
    assert areas[0] < 0.1 * areas[1]


def test_lens_from_header_reads_the_observation_keywords(tmp_path):
    h = fits.Header()
    assert lens_from_header(h, "x.fits") is None
    assert curves_from_header(h) is None
    h.update({"LENSMOD": "SIE+SHEAR", "LENS_X0": 0.1, "LENS_Y0": -0.1, "LENS_Q": 0.8, "LENS_PHI": 0.2,
              "LENS_RE": 0.9, "SHEAR_G1": 0.02, "SHEAR_G2": -0.01})
    lens = lens_from_header(h, "x.fits")
    assert (lens.model, lens.x0, lens.q, lens.rein, lens.g2) == ("SIE", 0.1, 0.8, 0.9, -0.01)
    crit, caus = curves_from_header(h)
    assert len(crit) == len(caus) == 1
    h["LENSFRAM"] = "WORLD"
    with pytest.raises(InputFileError, match=r"x.fits \[LENSFRAM\]"):
        lens_from_header(h, "x.fits")
    h["LENSFRAM"] = "ARRAY"
    h["LENS_Q"] = 1.5
    with pytest.raises(InputFileError, match=r"x.fits \[LENS_Q\]"):
        lens_from_header(h, "x.fits")
