"""Real-looking files through `sample` with the shipped prior and posterior on the default config:

* a lenstronomy-made observation in MJy/sr (PHOTMJSR), with an ERR HDU and a sky WCS rotated by
  CROTA2, against the same pixels written in the project's own units (electron/s, NOISE, array frame);
* a 0.05"/px observation rebinned to the trained 0.1"/px, against the same lens and source simulated
  directly at 0.1"/px.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits

from pipeline.cli import main
from pipeline.io.posterior import read_posterior
from pipeline.lensing.config import GeometryConfig, NoiseConfig, load_lensing_config
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams, gaussian_psf
from pipeline.lensing.simulate import simulate_observation, write_observation
from small_observation import world_lens

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "config.yaml"
PRIOR, POSTERIOR = ROOT / "data" / "pretrained" / "prior", ROOT / "data" / "pretrained" / "posterior"
SIGMA = 0.257        # electron/s: the demo's fixed noise level (NOISEREF of its simulated observations)
N, PIX, SS = 32, 0.1, 2
ARCSEC2_PER_SR = (180 * 3600 / math.pi) ** 2
LENS = LensParams(x0=0.02, y0=-0.03, q=0.8, phi=0.7, rein=0.7, g1=0.04, g2=-0.03)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _chi2(obs, out, config=CONFIG, n=16):
    rc = main(["sample", "--config", str(config), "--method", "rtb_amortized", "--prior", str(PRIOR),
               "--posterior", str(POSTERIOR), "--obs", str(obs), "--out-file", str(out), "--n", str(n)])
    assert rc == 0
    return float(read_posterior(out)["chi2_median"])


def _lenstronomy_image(J, lens_w: LensParams, psf):
    """lenstronomy's noiseless image [electron/s per pixel] on the grid whose pixel->angle matrix is J
    [arcsec/pixel], centre pixel at (0, 0); a Sersic source in the same (world) frame."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import param_util

    ra0, dec0 = -J @ np.array([(N - 1) / 2, (N - 1) / 2])
    data = ImageData(image_data=np.zeros((N, N)), ra_at_xy_0=ra0, dec_at_xy_0=dec0, transform_pix2angle=J)
    kpsf = PSF(psf_type="PIXEL", kernel_point_source=psf, point_source_supersampling_factor=SS)
    e1, e2 = param_util.phi_q2_ellipticity(phi=lens_w.phi, q=lens_w.q)
    kl = [dict(theta_E=lens_w.rein, e1=e1, e2=e2, center_x=lens_w.x0, center_y=lens_w.y0),
          dict(gamma1=lens_w.g1, gamma2=lens_w.g2, ra_0=0, dec_0=0)]
    se1, se2 = param_util.phi_q2_ellipticity(phi=0.4, q=0.7)
    ks = [dict(amp=100.0, R_sersic=0.12, n_sersic=1.5, e1=se1, e2=se2, center_x=0.04, center_y=-0.02)]
    im = ImageModel(data, kpsf, lens_model_class=LensModel(["SIE", "SHEAR"]),
                    source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                    kwargs_numerics=dict(supersampling_factor=SS, supersampling_convolution=True))
    return im.image(kwargs_lens=kl, kwargs_source=ks)


def test_lenstronomy_mjy_sr_file_matches_project_units(tmp_path):
    pytest.importorskip("lenstronomy")
    rho, photmjsr = math.radians(30.0), 0.37          # PHOTMJSR: MJy/sr per DN/s (gain 1 electron/DN)
    J = np.array([[-PIX * math.cos(rho), -PIX * math.sin(rho)], [-PIX * math.sin(rho), PIX * math.cos(rho)]])
    lens_w = world_lens(LENS, J / PIX)
    psf = gaussian_psf(0.15, PIX / SS, 11)
    rng = np.random.default_rng(7)
    y = _lenstronomy_image(J, lens_w, psf) + SIGMA * rng.standard_normal((N, N))
    psf_hdu = fits.ImageHDU(psf.astype(np.float32), name="PSF")
    psf_hdu.header["PSFSAMP"] = PIX / SS

    # the JWST-like file: MJy/sr, ERR, sky WCS with CDELT + CROTA2, lens in its world frame
    prim = fits.PrimaryHDU()
    prim.header.update({"LENSMOD": "SIE+SHEAR", "LENSFRAM": "WORLD", "LENS_X0": lens_w.x0, "LENS_Y0": lens_w.y0,
                        "LENS_Q": lens_w.q, "LENS_PHI": lens_w.phi, "LENS_RE": lens_w.rein,
                        "SHEAR_G1": lens_w.g1, "SHEAR_G2": lens_w.g2})
    wcs = {"BUNIT": "MJy/sr", "PHOTMJSR": photmjsr, "PIXAR_SR": PIX ** 2 / ARCSEC2_PER_SR,
           "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
           "CDELT1": -PIX / 3600, "CDELT2": PIX / 3600, "CROTA2": 30.0, "CRPIX1": (N + 1) / 2,
           "CRPIX2": (N + 1) / 2, "CRVAL1": 53.1, "CRVAL2": -27.8}
    hdus = [prim]
    for name, arr in (("SCI", y * photmjsr), ("ERR", np.full((N, N), SIGMA * photmjsr))):
        h = fits.ImageHDU(arr.astype(np.float32), name=name)
        h.header.update(wcs)
        hdus.append(h)
    jwst = tmp_path / "jwst.fits"
    fits.HDUList(hdus + [psf_hdu.copy()]).writeto(jwst)

    # the same pixels in the project's units: electron/s, NOISE, PIXSCALE, lens in the array frame
    prim = fits.PrimaryHDU()
    prim.header.update({"LENSMOD": "SIE+SHEAR", "LENS_X0": LENS.x0, "LENS_Y0": LENS.y0, "LENS_Q": LENS.q,
                        "LENS_PHI": LENS.phi, "LENS_RE": LENS.rein, "SHEAR_G1": LENS.g1, "SHEAR_G2": LENS.g2})
    hdus = [prim]
    for name, arr in (("SCI", y), ("NOISE", np.full((N, N), SIGMA))):
        h = fits.ImageHDU(arr.astype(np.float32), name=name)
        h.header.update({"BUNIT": "electron/s", "PIXSCALE": PIX})
        hdus.append(h)
    ours = tmp_path / "ours.fits"
    fits.HDUList(hdus + [psf_hdu.copy()]).writeto(ours)

    cfg = load_lensing_config(CONFIG)
    p1, y1, m1 = load_observation(jwst, cfg)
    p0, y0, m0 = load_observation(ours, cfg)
    assert m1["noise_hdu"] == "ERR" and m1["surface_brightness"]
    np.testing.assert_allclose(y1.numpy(), y0.numpy(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(p1.sigma.numpy(), p0.sigma.numpy(), rtol=1e-5, atol=0)
    a = m1["lens"]
    assert (a.x0, a.y0, a.phi, a.g1, a.g2) == pytest.approx((LENS.x0, LENS.y0, LENS.phi, LENS.g1, LENS.g2), abs=1e-9)
    c1, c0 = _chi2(jwst, tmp_path / "jwst_post.fits"), _chi2(ours, tmp_path / "ours_post.fits")
    assert abs(c1 - c0) <= 0.02, (c1, c0)
    assert read_posterior(tmp_path / "jwst_post.fits")["ood_warnings"] == read_posterior(
        tmp_path / "ours_post.fits")["ood_warnings"]


def _source(n=32, pix=0.05):
    """A smooth two-component galaxy [electron/(s arcsec2)] of ~60 electron/s on the trained source grid."""
    c = (np.arange(n) - (n - 1) / 2) * pix
    xx, yy = np.meshgrid(c, c)
    a = np.exp(-(((xx - 0.05) / 0.18) ** 2 + ((yy + 0.02) / 0.1) ** 2) / 2)
    b = 0.6 * np.exp(-((xx + 0.1) ** 2 + (yy - 0.08) ** 2) / (2 * 0.06 ** 2))
    s = a + b
    return (s * 60.0 / (s.sum() * pix * pix)).astype(np.float32)


def test_half_pixel_scale_observation_rebinned_to_trained_scale(tmp_path):
    """The same lens and source at 0.05"/px (64x64, noise sigma/2 per pixel so 2x2 sums have sigma)
    rebinned to 0.1"/px gives a median chi2_nu within 0.1 of the direct 0.1"/px observation."""
    cfg = load_lensing_config(CONFIG)
    fine_geom = GeometryConfig(image_npix=64, image_pixscale=0.05, source_npix=32, source_pixscale=0.05,
                               supersample=2, psf_fwhm=0.15, psf_npix=11)
    truth = _source()
    coarse = simulate_observation(truth, LENS, cfg.geometry, NoiseConfig(sigma=SIGMA), np.random.default_rng(11))
    fine = simulate_observation(truth, LENS, fine_geom, NoiseConfig(sigma=SIGMA / 2), np.random.default_rng(12))
    f_coarse, f_fine = tmp_path / "coarse.fits", tmp_path / "fine.fits"
    write_observation(f_coarse, coarse)
    write_observation(f_fine, fine)
    data = yaml.safe_load(CONFIG.read_text())
    data["lensing"].setdefault("observation", {})["rebin"] = "auto"
    rebin_cfg = tmp_path / "config.yaml"
    rebin_cfg.write_text(yaml.safe_dump(data))
    _, y, meta = load_observation(f_fine, load_lensing_config(rebin_cfg))
    assert meta["rebin"] == 2 and meta["image_shape"] == (32, 32) and meta["pixscale"] == pytest.approx(0.1)
    assert float(y.sum()) == pytest.approx(float(fine.sci.sum()), rel=1e-5)          # flux conserved
    c_fine = _chi2(f_fine, tmp_path / "fine_post.fits", config=rebin_cfg)
    c_coarse = _chi2(f_coarse, tmp_path / "coarse_post.fits")
    assert abs(c_fine - c_coarse) <= 0.1, (c_fine, c_coarse)
    # the rebinned observation passes the shipped posterior's guard: not refused, and no condition warned
    assert read_posterior(tmp_path / "fine_post.fits")["ood_warnings"] == []
