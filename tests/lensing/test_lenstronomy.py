"""caustics (our forward model) against lenstronomy on the same SIE + shear configuration, and a
lenstronomy-made observation file (RA-left frame, flux per pixel, CD matrix in deg) read into an
InverseProblem that agrees with the one from the pipeline's own simulator."""

import math

import numpy as np
import pytest
import torch
from astropy.io import fits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
pytest.importorskip("lenstronomy")
from lenstronomy.Data.imaging_data import ImageData  # noqa: E402
from lenstronomy.Data.psf import PSF  # noqa: E402
from lenstronomy.ImSim.image_model import ImageModel  # noqa: E402
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.LightModel.light_model import LightModel  # noqa: E402
from lenstronomy.Util import param_util  # noqa: E402

from pipeline.lensing.config import LensingConfig  # noqa: E402
from pipeline.lensing.observation import load_observation, world_to_array  # noqa: E402
from pipeline.lensing.operator import LensingProblem, LensParams, gaussian_psf  # noqa: E402
from pipeline.lensing.simulate import Observation, write_observation  # noqa: E402

N, PIX, SS, NS, SPIX = 32, 0.1, 2, 32, 0.05
LENS = LensParams(x0=0.03, y0=-0.02, q=0.75, phi=0.6, rein=0.7, g1=0.03, g2=-0.02)
SERSIC = dict(x0=0.05, y0=0.02, q=0.6, phi=0.3, n=1.5, Re=0.15)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _lenstronomy_model(source_model, kwargs_source, psf, lens=LENS, flip=False):
    """lenstronomy image (flux per pixel). flip=False: x along columns (array frame);
    flip=True: lenstronomy's usual RA-left frame, transform_pix2angle = diag(-pix, +pix)."""
    c = (N - 1) / 2 * PIX
    T = np.diag([-PIX, PIX]) if flip else np.diag([PIX, PIX])
    data = ImageData(image_data=np.zeros((N, N)), ra_at_xy_0=c if flip else -c, dec_at_xy_0=-c,
                     transform_pix2angle=T)
    if psf is None:
        kpsf = PSF(psf_type="NONE")
    else:
        kpsf = PSF(psf_type="PIXEL", kernel_point_source=psf, point_source_supersampling_factor=SS)
    e1, e2 = param_util.phi_q2_ellipticity(phi=lens.phi, q=lens.q)
    kl = [dict(theta_E=lens.rein, e1=e1, e2=e2, center_x=lens.x0, center_y=lens.y0),
          dict(gamma1=lens.g1, gamma2=lens.g2, ra_0=0, dec_0=0)]
    im = ImageModel(data, kpsf, lens_model_class=LensModel(["SIE", "SHEAR"]),
                    source_model_class=LightModel([source_model]),
                    kwargs_numerics=dict(supersampling_factor=SS, supersampling_convolution=psf is not None))
    return im.image(kwargs_lens=kl, kwargs_source=kwargs_source)


def _caustics_sersic(psf):
    import caustics

    from pipeline.lensing.operator import build_simulator

    ser = caustics.Sersic(name="s", Ie=1.0, use_lenstronomy_k=True, **SERSIC)
    sim = build_simulator(LENS, (N, N), PIX, NS, SPIX, SS, psf, source=ser)
    with torch.no_grad():
        return sim().double().numpy()


def _sersic_kwargs():
    e1, e2 = param_util.phi_q2_ellipticity(phi=SERSIC["phi"], q=SERSIC["q"])
    # caustics Re is along the major axis; lenstronomy R_sersic is the product-average radius
    return [dict(amp=1.0, R_sersic=SERSIC["Re"] * math.sqrt(SERSIC["q"]), n_sersic=SERSIC["n"], e1=e1, e2=e2,
                 center_x=SERSIC["x0"], center_y=SERSIC["y0"])]


@pytest.mark.parametrize("with_psf", [False, True])
def test_caustics_vs_lenstronomy_analytic_sersic(with_psf):
    psf = gaussian_psf(0.15, PIX / SS, 11) if with_psf else None
    img_c = _caustics_sersic(psf) * PIX ** 2          # mean SB -> flux per pixel
    img_l = _lenstronomy_model("SERSIC_ELLIPSE", _sersic_kwargs(), psf)
    assert _rel(img_c, img_l) <= 1e-4


def _pixelated_sersic():
    import caustics

    xs, ys = caustics.utils.meshgrid(SPIX, NS)
    ser = caustics.Sersic(name="s", Ie=1.0, use_lenstronomy_k=True, **SERSIC)
    with torch.no_grad():
        return ser.brightness(xs, ys).double().numpy()


def test_sparse_operator_vs_lenstronomy_pixelated():
    psf = gaussian_psf(0.15, PIX / SS, 11)
    S = _pixelated_sersic()
    prob = LensingProblem.from_lens(LENS, image_shape=(N, N), image_pixscale=PIX, source_npix=NS,
                                    source_pixscale=SPIX, supersample=SS, psf=psf, sigma=torch.ones(N, N),
                                    unit_factor=PIX ** 2)
    ours = prob.physical_forward(torch.tensor(S, dtype=torch.float32)[None])[0].double().numpy()
    ks = [dict(image=S, amp=1, center_x=0, center_y=0, phi_G=0, scale=SPIX)]
    img_l = _lenstronomy_model("INTERPOL", ks, psf)
    assert _rel(ours, img_l) <= 1e-3


def test_world_to_array_ra_flip_mapping():
    """RA-left frame (CD = diag(-p, p)): x -> -x, phi -> pi - phi, g2 -> -g2 (documented mapping)."""
    w = LensParams(x0=0.03, y0=-0.02, q=0.75, phi=0.6, rein=0.7, g1=0.03, g2=-0.02)
    a = world_to_array(w, np.diag([-PIX, PIX]), np.zeros(2))
    assert a.x0 == pytest.approx(-0.03) and a.y0 == pytest.approx(-0.02)
    assert a.phi == pytest.approx(math.pi - 0.6)
    assert a.g1 == pytest.approx(0.03) and a.g2 == pytest.approx(0.02)
    # a 90 degree rotation: positions rotate, phi shifts by -90 deg, the shear (spin 2) flips sign
    r = world_to_array(w, np.array([[0.0, -PIX], [PIX, 0.0]]), np.zeros(2))
    assert (r.x0, r.y0) == pytest.approx((-0.02, -0.03))
    assert r.phi == pytest.approx((0.6 - math.pi / 2) % math.pi)
    assert (r.g1, r.g2) == pytest.approx((-0.03, 0.02))


def test_lenstronomy_file_gives_same_problem(tmp_path):
    """A file written from lenstronomy's RA-left frame (CD in deg, LENSFRAM='WORLD') and the pipeline's own
    file of the same lens and source give the same InverseProblem."""
    psf = gaussian_psf(0.15, PIX / SS, 11)
    S_arr = _pixelated_sersic()          # the truth in the array frame (x along columns)
    S_ra = S_arr[:, ::-1].copy()         # the same source in lenstronomy's RA-left frame
    # lenstronomy's lens parameters in its (RA, Dec) frame: mirror of the array-frame lens
    lens_ra = LensParams(x0=-LENS.x0, y0=LENS.y0, q=LENS.q, phi=math.pi - LENS.phi, rein=LENS.rein,
                         g1=LENS.g1, g2=-LENS.g2)
    ks = [dict(image=S_ra, amp=1, center_x=0, center_y=0, phi_G=0, scale=SPIX)]
    model_l = _lenstronomy_model("INTERPOL", ks, psf, lens=lens_ra, flip=True)
    sigma = 0.02 * model_l.max()
    rng = np.random.default_rng(0)
    y = model_l + sigma * rng.standard_normal(model_l.shape)

    # --- the lenstronomy-made file: CD matrix in degrees, RA left, lens keywords in the world frame
    prim = fits.PrimaryHDU()
    h = prim.header
    e1, e2 = param_util.phi_q2_ellipticity(phi=lens_ra.phi, q=lens_ra.q)
    phi_l, q_l = param_util.ellipticity2phi_q(e1, e2)
    h.update({"LENSMOD": "SIE+SHEAR", "LENSFRAM": "WORLD", "LENS_X0": lens_ra.x0, "LENS_Y0": lens_ra.y0,
              "LENS_Q": q_l, "LENS_PHI": phi_l, "LENS_RE": lens_ra.rein, "SHEAR_G1": lens_ra.g1,
              "SHEAR_G2": lens_ra.g2, "Z_LENS": 0.5, "Z_SRC": 1.5})
    hdus = [prim]
    for name, arr in (("SCI", y), ("NOISE", np.full((N, N), sigma))):
        hd = fits.ImageHDU(arr.astype(np.float32), name=name)
        hd.header.update({"BUNIT": "electron/s", "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg",
                          "CUNIT2": "deg", "CD1_1": -PIX / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": PIX / 3600,
                          "CRPIX1": (N + 1) / 2, "CRPIX2": (N + 1) / 2, "CRVAL1": 150.0, "CRVAL2": 2.0})
        hdus.append(hd)
    p = fits.ImageHDU(psf.astype(np.float32), name="PSF")
    p.header["PSFSAMP"] = PIX / SS
    hdus.append(p)
    f_l = tmp_path / "lenstronomy.fits"
    fits.HDUList(hdus).writeto(f_l, checksum=True)

    # --- the pipeline's own file of the same scene (array frame)
    obs = Observation(sci=y.astype(np.float32), noise=np.full((N, N), sigma, np.float32), psf=psf.astype(np.float32),
                      psfsamp=PIX / SS, lens=LENS, pixscale=PIX, source_npix=NS, source_pixscale=SPIX,
                      truth=S_arr.astype(np.float32))
    f_o = tmp_path / "ours.fits"
    write_observation(f_o, obs)

    cfg = LensingConfig()
    p_l, y_l, m_l = load_observation(f_l, cfg)
    p_o, y_o, m_o = load_observation(f_o, cfg)
    assert m_l["frame"] == "WORLD" and m_o["frame"] == "ARRAY"
    assert m_l["lens"].x0 == pytest.approx(LENS.x0, abs=1e-9) and m_l["lens"].phi == pytest.approx(LENS.phi, abs=1e-6)
    assert m_l["lens"].g2 == pytest.approx(LENS.g2, abs=1e-9)
    x = torch.tensor(S_arr, dtype=torch.float32)[None, None]
    f1, f2 = p_l.forward(x)[0].double().numpy(), p_o.forward(x)[0].double().numpy()
    assert _rel(f1, f2) <= 1e-3
    assert _rel(f1, model_l) <= 1e-3           # and both reproduce lenstronomy's own noiseless image
    ll1, ll2 = float(p_l.log_likelihood(x, y_l)), float(p_o.log_likelihood(x, y_o))
    assert abs(ll1 - ll2) <= 1.0
    # equal NOISE / PSF / mask after unit conversion (both flux per pixel here)
    assert torch.allclose(p_l.sigma / m_l["unit_factor"], p_o.sigma / m_o["unit_factor"], rtol=1e-6)
    assert np.allclose(m_l["psf_used"], m_o["psf_used"], atol=1e-7)
    assert torch.equal(p_l.mask, p_o.mask)
    assert m_l["pixscale"] == pytest.approx(PIX, rel=1e-9)
