"""Instrument conventions of observation files: ERR / IVM / WHT in place of NOISE, DQ masks,
orientation from CROTA2, numeric keywords given text, and large cutouts cropped or refused fast."""

import math
import time

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.lensing.config import LensingConfig
from pipeline.lensing.observation import load_observation

from small_observation import GEOM, LENS, edit_fits, world_lens, write_small_observation


@pytest.fixture
def obs_file(tmp_path):
    return write_small_observation(tmp_path / "obs.fits")



def _load(path, **obs_keys):
    cfg = LensingConfig(geometry=GEOM)
    for k, v in obs_keys.items():
        setattr(cfg.observation, k, v)
    return load_observation(path, cfg)


def _refused(path, field, msg, **obs_keys):
    with pytest.raises(InputFileError) as e:
        _load(path, **obs_keys)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and f"[{field}]" in text and msg in text, text


def test_err_hdu_is_one_sigma(obs_file, tmp_path):
    def to_err(hl):
        hl["NOISE"].name = "ERR"

    p0, y0, _ = _load(obs_file)
    p1, y1, m1 = _load(edit_fits(obs_file, tmp_path / "err.fits", to_err))
    assert m1["noise_hdu"] == "ERR" and torch.equal(y1, y0) and torch.equal(p1.sigma, p0.sigma)


@pytest.mark.parametrize("name,keys,obs_keys", [("IVM", {}, {}), ("WHT", {"WHTTYPE": "IVM"}, {}),
                                                 ("WHT", {}, {"wht": "ivm"})])
def test_inverse_variance_hdus(obs_file, tmp_path, name, keys, obs_keys):
    """IVM, and WHT labelled (or configured) as inverse variance: sigma = 1/sqrt; zero weight = masked."""
    def to_ivm(hl):
        ivm = 1.0 / hl["NOISE"].data.astype(np.float64) ** 2
        ivm[2, 3] = 0.0
        hdu = fits.ImageHDU(ivm, name=name)
        hdu.header.update(keys)
        del hl["NOISE"]
        hl.append(hdu)

    p0, y0, m0 = _load(obs_file)
    p1, y1, m1 = _load(edit_fits(obs_file, tmp_path / "ivm.fits", to_ivm), **obs_keys)
    assert m1["noise_hdu"] == name and not m1["warnings"]
    used = m1["mask"]
    assert not used[2, 3] and used.sum() == m0["mask"].sum() - 1
    assert torch.allclose(p1.sigma[torch.as_tensor(used)], p0.sigma[torch.as_tensor(used)], rtol=1e-6)


def test_unlabelled_wht_refused(obs_file, tmp_path):
    def to_wht(hl):
        hl["NOISE"].name = "WHT"         # an exposure-time map as drizzle writes it by default

    _refused(edit_fits(obs_file, tmp_path / "wht.fits", to_wht), "WHT.WHTTYPE", "exposure-time map")


def test_dq_nonzero_is_bad_and_combines_with_mask(obs_file, tmp_path):
    def add_dq(hl):
        dq = np.zeros((16, 16), np.int32)
        dq[1, 1], dq[4, 7] = 4, 1024
        m = np.ones((16, 16), np.uint8)
        m[9, 9] = 0
        hl.append(fits.ImageHDU(dq, name="DQ"))
        hl.append(fits.ImageHDU(m, name="MASK"))

    _, _, m = _load(edit_fits(obs_file, tmp_path / "dq.fits", add_dq))
    assert not m["mask"][1, 1] and not m["mask"][4, 7] and not m["mask"][9, 9] and m["mask"].sum() == 256 - 3


def test_crota2_orientation(obs_file, tmp_path):
    """A sky WCS with CDELT and CROTA2 = 30 deg (RA left): the lens given in that world frame reads as
    the array-frame lens of the file, so both give the same problem."""
    rho, p = math.radians(30.0), 0.1
    # FITS CROTA2 convention: CD = [[CDELT1 cos, -CDELT2 sin], [CDELT1 sin, CDELT2 cos]]
    J = np.array([[-p * math.cos(rho), -p * math.sin(rho)], [-p * math.sin(rho), p * math.cos(rho)]])
    w = world_lens(LENS, J / p)

    def to_sky(hl):
        h = hl["SCI"].header
        h.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
                  "CDELT1": -p / 3600, "CDELT2": p / 3600, "CROTA2": 30.0, "CRVAL1": 150.0, "CRVAL2": 2.0})
        for hh in (h, hl[0].header):
            hh.remove("PIXSCALE", ignore_missing=True)
        hl[0].header.update({"LENSFRAM": "WORLD", "LENS_X0": w.x0, "LENS_Y0": w.y0, "LENS_PHI": w.phi,
                             "SHEAR_G1": w.g1, "SHEAR_G2": w.g2})

    p0, y0, m0 = _load(obs_file)
    p1, y1, m1 = _load(edit_fits(obs_file, tmp_path / "rot.fits", to_sky))
    a = m1["lens"]
    assert (a.x0, a.y0, a.phi, a.g1, a.g2) == pytest.approx((LENS.x0, LENS.y0, LENS.phi, LENS.g1, LENS.g2), abs=1e-9)
    assert m1["pixscale"] == pytest.approx(p, rel=1e-12)
    x = torch.as_tensor(m0["truth"])[None, None]
    assert torch.allclose(p1.forward(x), p0.forward(x), rtol=1e-5, atol=1e-6)


# every numeric keyword the reader takes: (HDU, keyword, what else the file needs for it to be read)
NUMERIC = [
    ("SCI", "PIXSCALE", "no_wcs"), ("PRIMARY", "PIXSCALE", "no_wcs"), ("PSF", "PSFSAMP", None),
    ("SCI", "EXPTIME", "ELECTRONS"), ("SCI", "PHOTMJSR", "MJy/sr"), ("SCI", "PHOTFNU", "Jy"),
    ("SCI", "PHOTFLAM", "erg/s/cm2/Angstrom"), ("SCI", "PIXAR_SR", None), ("SCI", "PIXAR_A2", None),
    ("SCI", "CDELT1", None), ("SCI", "CDELT2", None), ("SCI", "CD1_1", None), ("SCI", "PC1_2", None),
    ("SCI", "CRPIX1", None), ("SCI", "CRVAL2", None), ("SCI", "CROTA2", None),
    ("PRIMARY", "SRCNPIX", None), ("PRIMARY", "SRCPIXSC", None),
    ("PRIMARY", "LENS_X0", None), ("PRIMARY", "LENS_Y0", None), ("PRIMARY", "LENS_Q", None),
    ("PRIMARY", "LENS_PHI", None), ("PRIMARY", "LENS_RE", None), ("PRIMARY", "SHEAR_G1", None),
    ("PRIMARY", "SHEAR_G2", None), ("PRIMARY", "Z_LENS", None), ("PRIMARY", "Z_SRC", None),
]


@pytest.mark.parametrize("hdu,key,needs", NUMERIC, ids=[f"{h}.{k}" for h, k, _ in NUMERIC])
def test_numeric_keyword_given_text_one_line(obs_file, tmp_path, hdu, key, needs):
    def spoil(hl):
        if needs == "no_wcs":
            hl["SCI"].header.remove("CDELT1")
            hl["SCI"].header.remove("CDELT2")
        elif needs:
            for name in ("SCI", "NOISE"):
                hl[name].header["BUNIT"] = needs
        hl[0 if hdu == "PRIMARY" else hdu].header[key] = "0.1 arcsec"

    bad = edit_fits(obs_file, tmp_path / f"{key}.fits", spoil)
    field = key if key.startswith(("LENS_", "SHEAR_", "Z_")) else f"{hdu}.{key}"
    _refused(bad, field, "not a number: '0.1 arcsec'")


def test_wrong_pixscale_caught_by_pixel_area(obs_file, tmp_path):
    def wrong(hl):
        for k in ("CDELT1", "CDELT2"):
            hl["SCI"].header.remove(k)
        hl["SCI"].header["PIXSCALE"] = hl[0].header["PIXSCALE"] = 0.05
        hl["SCI"].header["PIXAR_A2"] = 0.01

    _refused(edit_fits(obs_file, tmp_path / "pix.fits", wrong), "SCI.PIXAR_A2", "disagrees with the pixel scale")


def _big_cutout(src, dst, n=512):
    """``src``'s 16x16 scene in the middle of an n x n cutout of pure noise (same pixels, same lens)."""
    rng = np.random.default_rng(3)

    def grow(hl):
        for name in ("SCI", "NOISE"):
            small = hl[name].data
            big = np.full((n, n), 0.1, np.float32) if name == "NOISE" else \
                (0.1 * rng.standard_normal((n, n))).astype(np.float32)
            o = (n - 16) // 2
            big[o:o + 16, o:o + 16] = small
            hl[name] = fits.ImageHDU(big, hl[name].header, name=name)
            hl[name].header["CRPIX1"] = hl[name].header["CRPIX2"] = (n + 1) / 2
        del hl["TRUTH"]

    return edit_fits(src, dst, grow)


def test_512_cutout_cropped_or_refused_within_5_s(obs_file, tmp_path):
    big = _big_cutout(obs_file, tmp_path / "big.fits")
    _load(obs_file)                                    # imports and caches warm
    t0 = time.perf_counter()
    _refused(big, "SCI", "max_image_npix")
    t_refuse = time.perf_counter() - t0
    t0 = time.perf_counter()
    p1, y1, m1 = _load(big, crop="centre")
    t_crop = time.perf_counter() - t0
    assert t_refuse < 5.0 and t_crop < 5.0
    p0, y0, m0 = _load(obs_file)
    assert m1["image_shape"] == (16, 16) and m1["file_shape"] == (512, 512)
    assert torch.equal(y1, y0) and m1["lens"] == m0["lens"]


def test_crop_around_lens_centre_moves_the_lens_to_the_new_centre(obs_file, tmp_path):
    big = _big_cutout(obs_file, tmp_path / "big.fits", n=64)

    def move(hl):                                    # put the lens 1.05" right, 0.3" down of the centre
        hl[0].header["LENS_X0"], hl[0].header["LENS_Y0"] = 1.05, -0.3

    f = edit_fits(big, tmp_path / "moved.fits", move)
    _, _, m = _load(f, crop="lens")
    # the 16x16 window is centred on the pixel nearest the lens: the lens lands within half a pixel of the centre
    assert m["image_shape"] == (16, 16)
    assert abs(m["lens"].x0) <= 0.05 + 1e-9 and abs(m["lens"].y0) <= 0.05 + 1e-9
    sx, sy = m["crop_shift"]
    assert m["lens"].x0 == pytest.approx(1.05 - sx) and m["lens"].y0 == pytest.approx(-0.3 - sy)
