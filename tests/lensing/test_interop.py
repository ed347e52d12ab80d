"""Lens conversions from and to lenstronomy and PyAutoLens (pipeline.lensing.interop): round trips, the
conventions against closed-form deflections, a lenstronomy-made image against the operator's, refusals."""

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.lensing.critical import lens_equation, lens_system
from pipeline.lensing.interop import (LensConversionError, from_lenstronomy, from_pyautolens, lenstronomy_frame,
                                      pyautolens_frame, to_lenstronomy, to_pyautolens)
from pipeline.lensing.observation import parse_lens, world_to_array
from pipeline.lensing.operator import LensingProblem, LensParams, gaussian_psf

N, PIX = 32, 0.1
ROUND_TRIP_TOL = 1e-10


def _kwargs_data(angle=0.4, n=N, pix=PIX, origin=(0.0, 0.0)):
    """lenstronomy ImageData keywords of an RA-left image turned by ``angle`` [rad] (det T < 0), whose
    (ra, dec) origin lies ``origin`` [pixels] from the array centre."""
    T = pix * np.array([[-math.cos(angle), math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    c = np.array([(n - 1) / 2, (n - 1) / 2]) + np.asarray(origin)
    w0 = -T @ c
    return dict(image_data=np.zeros((n, n)), ra_at_xy_0=float(w0[0]), dec_at_xy_0=float(w0[1]), transform_pix2angle=T)


@contextlib.contextmanager
def _no_warning():
    """Any warning inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _random_lenses(n=200, seed=0):
    """LensParams over the parameter space: phi anywhere in (-2 pi, 2 pi) (period pi), every tenth q = 1."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        model = "EPL" if i % 2 else "SIE"
        out.append(LensParams(model=model, x0=rng.uniform(-0.5, 0.5), y0=rng.uniform(-0.5, 0.5),
                              q=1.0 if i % 10 == 0 else rng.uniform(0.2, 1.0),
                              phi=rng.uniform(-2 * math.pi, 2 * math.pi),
                              rein=rng.uniform(0.3, 2.0), t=rng.uniform(0.3, 1.7) if model == "EPL" else 1.0,
                              g1=rng.uniform(-0.1, 0.1), g2=rng.uniform(-0.1, 0.1)))
    return out


def _angle_gap(a, b):
    """Distance of two axis angles [rad] modulo pi."""
    d = (a - b) % math.pi
    return min(d, math.pi - d)


def _assert_same(lens: LensParams, back: dict, tol=ROUND_TRIP_TOL):
    assert back["model"] == f"{lens.model}+SHEAR" and back["frame"] == "ARRAY"
    for k in ("x0", "y0", "q", "rein", "g1", "g2"):
        assert back[k] == pytest.approx(getattr(lens, k), abs=tol), k
    if lens.model == "EPL":
        assert back["t"] == pytest.approx(lens.t, abs=tol)
    if lens.q < 1:
        assert _angle_gap(back["phi"], lens.phi) <= tol
    else:
        assert back["phi"] == 0.0                   # a round lens has no angle
    assert 0 <= back["phi"] < math.pi


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("origin", [(0.0, 0.0), (3.5, -2.0)])
def test_lenstronomy_round_trip(origin):
    kd = _kwargs_data(origin=origin)
    for lens in _random_lenses():
        names, kwargs = to_lenstronomy(lens, kwargs_data=kd)
        assert names == [lens.model, "SHEAR"]
        if lens.model == "EPL":
            assert kwargs[0]["gamma"] == pytest.approx(lens.t + 1, abs=1e-12)
        shift = math.hypot(lens.g1, lens.g2) * (0 if origin == (0.0, 0.0) else 1)
        with pytest.warns(UserWarning, match="shear centre") if shift else _no_warning():
            back = from_lenstronomy(kwargs, names, frame="ARRAY", kwargs_data=kd)
        _assert_same(lens, back)


def test_lenstronomy_world_frame_is_unchanged():
    """WORLD: lenstronomy's (ra, dec) values pass through, and back."""
    for lens in _random_lenses(50, seed=1):
        world = dict(lens.as_dict(), model=f"{lens.model}+SHEAR", frame="WORLD")
        names, kwargs = to_lenstronomy(world)
        assert kwargs[0]["center_x"] == lens.x0 and kwargs[1]["gamma2"] == lens.g2
        back = from_lenstronomy(kwargs, names, z_lens=lens.z_lens, z_source=lens.z_source)
        assert back["frame"] == "WORLD" and back["z_source"] == lens.z_source
        _assert_same(lens, dict(back, frame="ARRAY"))


@pytest.mark.parametrize("flip", [False, True])
def test_pyautolens_round_trip(flip):
    for lens in _random_lenses(seed=2):
        name, mass, shear = to_pyautolens(lens, flip_for_ds9=flip)
        assert name == ("PowerLaw" if lens.model == "EPL" else "Isothermal")
        _assert_same(lens, from_pyautolens(mass, shear, flip_for_ds9=flip))


def test_pyautolens_objects_with_attributes():
    """Profile objects are read by their class name and attributes, like PyAutoLens's own."""
    PowerLaw = type("PowerLaw", (), {})
    ExternalShear = type("ExternalShear", (), {})
    m, s = PowerLaw(), ExternalShear()
    m.centre, m.ell_comps, m.einstein_radius, m.slope = (0.1, -0.2), (0.05, 0.1), 0.8, 2.3
    s.gamma_1, s.gamma_2 = 0.02, -0.01
    as_dict = from_pyautolens(dict(centre=m.centre, ell_comps=m.ell_comps, einstein_radius=0.8, slope=2.3),
                              dict(gamma_1=0.02, gamma_2=-0.01))
    assert from_pyautolens(m, s) == as_dict
    assert as_dict["model"] == "EPL+SHEAR" and as_dict["t"] == pytest.approx(1.3)


# ------------------------------------------------------------------------------------------ conventions
def test_lenstronomy_convention_values():
    """e1 + i e2 = (1-q)/(1+q) exp(2 i phi); SHEAR_GAMMA_PSI as gamma (cos 2 psi, sin 2 psi); SIS round."""
    sie = dict(theta_E=0.9, e1=0.0, e2=0.1, center_x=0.1, center_y=-0.2)
    k = from_lenstronomy([sie, dict(gamma_ext=0.05, psi_ext=math.pi / 8)], ["SIE", "SHEAR_GAMMA_PSI"])
    assert k["q"] == pytest.approx(0.9 / 1.1, abs=1e-14) and k["phi"] == pytest.approx(math.pi / 4, abs=1e-14)
    assert (k["g1"], k["g2"]) == pytest.approx((0.05 / math.sqrt(2), 0.05 / math.sqrt(2)), abs=1e-14)
    assert k["rein"] == 0.9 and (k["x0"], k["y0"]) == (0.1, -0.2) and "t" not in k
    sis = from_lenstronomy([dict(theta_E=0.7)], ["SIS"])
    assert (sis["q"], sis["phi"], sis["g1"], sis["g2"]) == (1.0, 0.0, 0.0, 0.0)
    epl = from_lenstronomy([dict(theta_E=0.7, gamma=2.2, e1=-0.1, e2=0.0)], ["EPL_NUMBA"])
    assert epl["model"] == "EPL+SHEAR" and epl["t"] == pytest.approx(1.2) and epl["phi"] == pytest.approx(math.pi / 2)


def test_array_frame_matches_the_observation_reader():
    """lenstronomy -> ARRAY equals lenstronomy -> WORLD read through a WCS whose CRPIX is lenstronomy's origin
    (observation.world_to_array, the file reader's rule), for RA-left frames at several rotations."""
    for angle in (0.0, 0.4, 2.5):
        for origin in ((0.0, 0.0), (4.0, -1.5)):
            kd = _kwargs_data(angle=angle, origin=origin)
            for lens in _random_lenses(20, seed=3):
                names, kwargs = to_lenstronomy(dict(lens.as_dict(), model=lens.model, frame="WORLD"))
                w, _ = parse_lens(from_lenstronomy(kwargs, names), "w")
                via_wcs = world_to_array(w, kd["transform_pix2angle"], np.asarray(origin))
                with pytest.warns(UserWarning) if origin != (0.0, 0.0) else _no_warning():
                    direct = from_lenstronomy(kwargs, names, frame="ARRAY", kwargs_data=kd)
                _assert_same(via_wcs, direct, tol=1e-12)


def test_ra_left_mapping_signs():
    """transform_pix2angle = diag(-pix, pix) centred: x -> -x, phi -> pi - phi, g2 -> -g2."""
    kd = _kwargs_data(angle=0.0)
    k = from_lenstronomy([dict(theta_E=0.7, e1=0.1, e2=0.05, center_x=0.03, center_y=-0.02),
                          dict(gamma1=0.03, gamma2=-0.02)], ["SIE", "SHEAR"], frame="ARRAY", kwargs_data=kd)
    world = from_lenstronomy([dict(theta_E=0.7, e1=0.1, e2=0.05, center_x=0.03, center_y=-0.02),
                              dict(gamma1=0.03, gamma2=-0.02)], ["SIE", "SHEAR"])
    assert (k["x0"], k["y0"]) == pytest.approx((-0.03, -0.02), abs=1e-15)
    assert k["phi"] == pytest.approx(math.pi - world["phi"], abs=1e-14)
    assert (k["g1"], k["g2"]) == pytest.approx((0.03, 0.02), abs=1e-15)
    R, shift = lenstronomy_frame(kd)
    assert np.allclose(R, np.diag([-1.0, 1.0])) and np.allclose(shift, 0.0, atol=1e-15)


def _al_isothermal_deflection(centre, ell_comps, theta, y, x):
    """PyAutoLens's documented Isothermal deflection (y, x) (Kormann et al. 1994 as it writes it):
    with its rescaled radius b = theta / (1 + q), the frame turned by its angle, psi = sqrt(q^2 x'^2 + y'^2),
    alpha_x' = 2 b q / sqrt(1-q^2) atan(sqrt(1-q^2) x' / psi), alpha_y' the same with atanh and y'."""
    f = math.hypot(*ell_comps)
    q = (1 - f) / (1 + f)
    ang = 0.5 * math.atan2(ell_comps[0], ell_comps[1])
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = x - centre[1], y - centre[0]
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    psi = np.sqrt(q * q * xr * xr + yr * yr)
    k = 2 * theta / (1 + q) * q / math.sqrt(1 - q * q)
    ax, ay = k * np.arctan(math.sqrt(1 - q * q) * xr / psi), k * np.arctanh(math.sqrt(1 - q * q) * yr / psi)
    return s * ax + c * ay, c * ax - s * ay


def _al_shear_deflection(g1, g2, y, x):
    """PyAutoLens's ExternalShear: alpha = (|g| x', -|g| y') in the frame turned by atan2(g2, g1) / 2."""
    g, ang = math.hypot(g1, g2), 0.5 * math.atan2(g2, g1)
    c, s = math.cos(ang), math.sin(ang)
    xr, yr = c * x + s * y, -s * x + c * y
    ax, ay = g * xr, -g * yr
    return s * ax + c * ay, c * ax - s * ay


def test_pyautolens_isothermal_deflection_closed_form():
    """The operator's deflection of the converted lens equals PyAutoLens's Isothermal + ExternalShear formulas
    (measured against autolens 2026.10.26.1 itself: 3e-8 arcsec)."""
    mass = dict(centre=(-0.1, 0.05), ell_comps=(0.15, -0.2), einstein_radius=0.8)
    shear = dict(gamma_1=0.04, gamma_2=-0.03)
    rng = np.random.default_rng(4)
    y, x = rng.uniform(-1.5, 1.5, 100), rng.uniform(-1.5, 1.5, 100)
    lens, _ = parse_lens(from_pyautolens(mass, shear, flip_for_ds9=True), "al")
    bx, by = lens_equation(lens_system(lens), x, y)
    ay, ax = _al_isothermal_deflection(mass["centre"], mass["ell_comps"], mass["einstein_radius"], y, x)
    sy, sx = _al_shear_deflection(shear["gamma_1"], shear["gamma_2"], y, x)
    assert np.abs((x - bx) - (ax + sx)).max() <= 1e-6
    assert np.abs((y - by) - (ay + sy)).max() <= 1e-6


@pytest.mark.parametrize("slope", [1.6, 2.0, 2.4])
def test_pyautolens_power_law_convergence_closed_form(slope):
    """The operator's convergence (half the divergence of its deflection) equals PyAutoLens's documented
    PowerLaw kappa = (3 - slope) / (1 + q) theta^(slope - 1) R^(1 - slope), R = sqrt(x'^2 + y'^2 / q^2)."""
    mass = dict(centre=(0.07, -0.04), ell_comps=(-0.1, 0.12), einstein_radius=0.75, slope=slope)
    lens, _ = parse_lens(from_pyautolens(mass, None, flip_for_ds9=True), "al")
    system = lens_system(lens)
    rng = np.random.default_rng(5)
    y, x = rng.uniform(-1.2, 1.2, 40), rng.uniform(-1.2, 1.2, 40)
    h = 1e-4
    dbx = (lens_equation(system, x + h, y)[0] - lens_equation(system, x - h, y)[0]) / (2 * h)
    dby = (lens_equation(system, x, y + h)[1] - lens_equation(system, x, y - h)[1]) / (2 * h)
    kappa = 1 - 0.5 * (dbx + dby)
    f = math.hypot(*mass["ell_comps"])
    q = (1 - f) / (1 + f)
    ang = 0.5 * math.atan2(mass["ell_comps"][0], mass["ell_comps"][1])
    dx, dy = x - mass["centre"][1], y - mass["centre"][0]
    xr, yr = math.cos(ang) * dx + math.sin(ang) * dy, -math.sin(ang) * dx + math.cos(ang) * dy
    R = np.sqrt(xr ** 2 + yr ** 2 / q ** 2)
    expected = (3 - slope) / (1 + q) * mass["einstein_radius"] ** (slope - 1) * R ** (1 - slope)
    assert np.abs(kappa / expected - 1).max() <= 1e-4


def test_pyautolens_frame_flip():
    """Without flip_for_ds9 PyAutoLens's +y is the array's -y: y0, phi and g2 change sign, x0 and q stay."""
    mass = dict(centre=(0.2, 0.1), ell_comps=(0.1, 0.05), einstein_radius=0.8)
    shear = dict(gamma_1=0.03, gamma_2=0.02)
    a, b = from_pyautolens(mass, shear), from_pyautolens(mass, shear, flip_for_ds9=True)
    assert (a["x0"], a["y0"], a["q"], a["g1"]) == pytest.approx((b["x0"], -b["y0"], b["q"], b["g1"]), abs=1e-15)
    assert a["g2"] == pytest.approx(-b["g2"], abs=1e-15)
    assert _angle_gap(a["phi"], -b["phi"]) <= 1e-14
    assert np.array_equal(pyautolens_frame(False), np.diag([1.0, -1.0]))


# ------------------------------------------------------------------------------------------ lenstronomy image
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("main", [dict(theta_E=0.75, e1=0.1, e2=-0.15, center_x=0.04, center_y=-0.03),
                                  dict(theta_E=0.75, gamma=2.2, e1=0.1, e2=-0.15, center_x=0.04, center_y=-0.03)],
                         ids=["SIE+SHEAR", "EPL+SHEAR"])
def test_lenstronomy_image_matches_operator(main):
    """A lenstronomy image (its own e1/e2, gamma1/gamma2, RA-left frame turned by 0.4 rad, Sersic source,
    PSF) against the operator's image of the same source with the converted lens: within 1 % of the peak
    (0.35 % measured; the source's bilinear pixelisation dominates), and chi2_nu at the true source with the
    same noise draw within 0.02. The unconverted lens (lenstronomy's values read as array-frame ones) fails."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    ss, ns, spix = 2, 64, 0.025
    kd = _kwargs_data(angle=0.4)
    psf = gaussian_psf(0.15, PIX / ss, 11)
    names = ["EPL" if "gamma" in main else "SIE", "SHEAR"]
    kl = [main, dict(gamma1=0.03, gamma2=0.04, ra_0=0.0, dec_0=0.0)]
    ks = [dict(amp=1.0, R_sersic=0.2, n_sersic=0.5, e1=0.08, e2=0.05, center_x=0.05, center_y=0.02)]
    model = ImageModel(ImageData(**kd), PSF(psf_type="PIXEL", kernel_point_source=psf,
                                            point_source_supersampling_factor=ss),
                       lens_model_class=LensModel(names), source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                       kwargs_numerics=dict(supersampling_factor=ss, supersampling_convolution=True))
    img_l = model.image(kwargs_lens=kl, kwargs_source=ks)
    # the source on the project's grid: array-frame point a is lenstronomy pixel p = a / pix + centre
    g = (np.arange(ns) - (ns - 1) / 2) * spix
    X, Y = np.meshgrid(g, g, indexing="xy")
    p = np.stack([X.ravel(), Y.ravel()]) / PIX + (N - 1) / 2
    w = kd["transform_pix2angle"] @ p + np.array([[kd["ra_at_xy_0"]], [kd["dec_at_xy_0"]]])
    src = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(w[0], w[1], ks).reshape(ns, ns)

    def image(keywords):
        lens, _ = parse_lens(keywords, "lenstronomy")
        prob = LensingProblem.from_lens(lens, image_shape=(N, N), image_pixscale=PIX, source_npix=ns,
                                        source_pixscale=spix, supersample=ss, psf=psf, sigma=torch.ones(N, N),
                                        unit_factor=PIX ** 2)
        return prob.physical_forward(torch.tensor(src, dtype=torch.float32)[None])[0].double().numpy()

    ours = image(from_lenstronomy(kl, names, frame="ARRAY", kwargs_data=kd))
    peak = img_l.max()
    assert np.abs(ours - img_l).max() <= 0.01 * peak
    sigma = peak / 30
    y = img_l + sigma * np.random.default_rng(0).standard_normal(img_l.shape)
    chi2_l, chi2_o = (float(np.mean(((y - m) / sigma) ** 2)) for m in (img_l, ours))
    assert abs(chi2_o - chi2_l) <= 0.02
    unconverted = image(dict(from_lenstronomy(kl, names), frame="ARRAY"))
    assert np.abs(unconverted - img_l).max() > 0.2 * peak


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs, names, match", [
    ([dict(Rs=1.0, alpha_Rs=0.5)], ["NFW"], "'NFW'"),
    ([dict(theta_E=1.0, e1=0, e2=0), dict(kappa=0.1)], ["SIE", "CONVERGENCE"], "'CONVERGENCE'"),
    ([dict(theta_E=1.0, e1=0, e2=0), dict(theta_E=0.2, e1=0, e2=0)], ["SIE", "SIE"], "one main deflector"),
    ([dict(gamma1=0.1, gamma2=0.0)], ["SHEAR"], "one main deflector"),
    ([dict(theta_E=1.0, e1=0, e2=0), dict(gamma1=0.0, gamma2=0.0), dict(gamma1=0.0, gamma2=0.0)],
     ["SIE", "SHEAR", "SHEAR"], "at most one external shear"),
    ([dict(theta_E=1.0, e1=0.8, e2=0.7)], ["SIE"], r"kwargs_lens\[0\] \(SIE\): ellipticity"),
    ([dict(theta_E=1.0, e1=0.0)], ["SIE"], r"kwargs_lens\[0\] \(SIE\): 'e2' missing"),
    ([dict(theta_E=1.0, gamma=3.2, e1=0.0, e2=0.0)], ["EPL"], "slope"),
    ([dict(theta_E=-1.0, e1=0.0, e2=0.0)], ["SIE"], "Einstein radius"),
    ([dict(theta_E="big", e1=0.0, e2=0.0)], ["SIE"], "'theta_E' is not a number"),
    ([dict(theta_E=1.0, e1=0.0, e2=0.0)], ["SIE", "SHEAR"], "has 2 profiles but kwargs_lens 1"),
])
def test_lenstronomy_refusals(kwargs, names, match):
    with pytest.raises(LensConversionError, match=match) as exc:
        from_lenstronomy(kwargs, names)
    assert "\n" not in str(exc.value) and isinstance(exc.value, ValueError) and isinstance(exc.value, PipelineError)


def test_frame_arguments_refused():
    sie = [dict(theta_E=1.0, e1=0.0, e2=0.0)]
    with pytest.raises(LensConversionError, match="needs kwargs_data"):
        from_lenstronomy(sie, ["SIE"], frame="ARRAY")
    with pytest.raises(LensConversionError, match="frame 'SKY'"):
        from_lenstronomy(sie, ["SIE"], frame="sky")
    with pytest.raises(LensConversionError, match="'ra_at_xy_0' missing"):
        from_lenstronomy(sie, ["SIE"], frame="ARRAY", kwargs_data=dict(transform_pix2angle=np.eye(2)))
    skewed = dict(_kwargs_data(), transform_pix2angle=np.array([[0.1, 0.02], [0.0, 0.1]]))
    with pytest.raises(LensConversionError, match="square pixels"):
        from_lenstronomy(sie, ["SIE"], frame="ARRAY", kwargs_data=skewed)
    with pytest.raises(LensConversionError, match="needs kwargs_data"):
        to_lenstronomy(LensParams())
    with pytest.raises(LensConversionError, match="ARRAY-frame lens"):
        to_pyautolens(dict(LensParams().as_dict(), frame="WORLD"))


@pytest.mark.parametrize("mass, shear, match", [
    (type("NFW", (), {})(), None, "PyAutoLens mass profile NFW is not supported"),
    (dict(centre=(0, 0), kappa_s=0.1, scale_radius=5.0), None, "unsupported parameter"),
    (dict(einstein_radius=1.0, ell_comps=(0.1,)), None, "'ell_comps' must be a pair"),
    (dict(einstein_radius=1.0, slope=3.5), None, "slope 3.5 must be in"),
    (dict(einstein_radius=1.0), dict(gamma_1=0.1, gamma_2=0.0, centre=(1, 1)), "ExternalShear: unsupported"),
    (dict(einstein_radius=1.0), dict(gamma_1=0.1), "'gamma_2' missing"),
])
def test_pyautolens_refusals(mass, shear, match):
    with pytest.raises(LensConversionError, match=match) as exc:
        from_pyautolens(mass, shear)
    assert "\n" not in str(exc.value)
