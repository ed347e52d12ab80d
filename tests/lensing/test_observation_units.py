"""Units of observation files: BUNIT aliases, surface brightness, photometric keywords, refusals.

Each case writes the project's own file (electron/s) again in another unit, with the arrays divided
by the conversion factor worked out by hand, and checks that the loader reads back the same data.
"""

import math

import numpy as np
import pytest
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.lensing.config import LensingConfig
from pipeline.lensing.observation import load_observation

from small_observation import GEOM, edit_fits, write_small_observation

ARCSEC2_PER_SR = (180 * 3600 / math.pi) ** 2
PIX_AREA = 0.1 * 0.1        # arcsec2


@pytest.fixture
def obs_file(tmp_path):
    return write_small_observation(tmp_path / "obs.fits")


def _rewrite(src, dst, bunit, factor, sci_keys=None, prim_keys=None, noise_name="NOISE"):
    """``src`` with SCI and NOISE divided by ``factor`` (data unit per file unit) and labelled ``bunit``."""
    with fits.open(src) as f:
        hl = fits.HDUList([h.copy() for h in f])
    for name in ("SCI", "NOISE"):
        hl[name].data = (hl[name].data.astype(np.float64) / factor).astype(np.float64)
        hl[name].header["BUNIT"] = bunit
    hl[0].header["BUNIT"] = bunit
    hl["SCI"].header.update(sci_keys or {})
    hl[0].header.update(prim_keys or {})
    if noise_name != "NOISE":
        hl["NOISE"].name = noise_name
    hl.writeto(dst, overwrite=True)
    return dst


# (BUNIT, SCI keywords, config gain, data unit [electron/s] per file unit, worked out by hand)
CASES = [
    ("electron/s", {}, 1.0, 1.0),
    ("ELECTRONS/S", {}, 1.0, 1.0),                                    # HST drizzled
    ("ELECTRONS", {"EXPTIME": 500.0}, 1.0, 1 / 500.0),                # HST, total electrons over EXPTIME [s]
    ("COUNTS/S", {}, 2.5, 2.5),                                       # count rate x gain [electron/count]
    ("electron/(s arcsec2)", {}, 1.0, PIX_AREA),                      # surface brightness x 0.01 arcsec2
    ("electron/(s sr)", {}, 1.0, PIX_AREA / ARCSEC2_PER_SR),          # per sr: x pixel area in sr
    ("MJy/sr", {"PHOTMJSR": 0.5, "PIXAR_SR": PIX_AREA / ARCSEC2_PER_SR}, 1.0, 1 / 0.5),  # JWST: 1/PHOTMJSR DN/s
    ("MJy/sr", {"PHOTMJSR": 0.5}, 3.0, 3.0 / 0.5),                    # ... x gain electron/DN
    ("Jy", {"PHOTFNU": 1e-7}, 1.0, 1e7),                              # f_nu per pixel / PHOTFNU [Jy s/e]
    ("erg/s/cm2/Angstrom", {"PHOTFLAM": 1e-19}, 1.0, 1e19),           # f_lambda / PHOTFLAM
]


@pytest.mark.parametrize("bunit,keys,gain,factor", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_units_converted_to_electron_per_second(obs_file, tmp_path, bunit, keys, gain, factor):
    cfg = LensingConfig(geometry=GEOM)
    cfg.observation.gain = gain
    other = _rewrite(obs_file, tmp_path / "other.fits", bunit, factor, keys)
    p0, y0, _ = load_observation(obs_file, LensingConfig(geometry=GEOM))
    p1, y1, m1 = load_observation(other, cfg)
    assert m1["unit_conversion"] == pytest.approx(factor, rel=1e-10)
    assert np.allclose(y1.numpy(), y0.numpy(), rtol=1e-5, atol=0)
    assert np.allclose(p1.sigma.numpy(), p0.sigma.numpy(), rtol=1e-5, atol=0)
    assert m1["unit_factor"] == pytest.approx(PIX_AREA)


def test_photometric_keyword_from_primary_header(obs_file, tmp_path):
    other = _rewrite(obs_file, tmp_path / "jwst.fits", "MJy/sr", 1 / 0.25, prim_keys={"PHOTMJSR": 0.25})
    _, y0, _ = load_observation(obs_file, LensingConfig(geometry=GEOM))
    _, y1, m1 = load_observation(other, LensingConfig(geometry=GEOM))
    assert m1["unit_conversion"] == pytest.approx(4.0) and np.allclose(y1.numpy(), y0.numpy(), rtol=1e-5)


@pytest.mark.parametrize("bunit,keys,field,msg", [
    ("mag/arcsec2", {}, "SCI.BUNIT", "logarithmic unit"),
    ("mag", {}, "SCI.BUNIT", "logarithmic unit"),
    ("furlongs", {}, "SCI.BUNIT", "unknown unit 'furlongs'"),
    ("km/s", {}, "SCI.BUNIT", "cannot be converted"),
    ("MJy/sr", {}, "SCI.PHOTMJSR", "PHOTMJSR"),
    ("erg/s/cm2/Angstrom", {}, "SCI.PHOTFLAM", "PHOTFLAM"),
    ("ELECTRONS", {}, "SCI.EXPTIME", "EXPTIME"),
    ("MJy/sr", {"PHOTMJSR": -1.0}, "SCI.PHOTMJSR", "> 0"),
    ("MJy/sr", {"PHOTMJSR": 1.0, "PIXAR_SR": 4 * PIX_AREA / ARCSEC2_PER_SR}, "SCI.PIXAR_SR", "disagrees"),
])
def test_unit_refusals_one_line(obs_file, tmp_path, bunit, keys, field, msg):
    bad = _rewrite(obs_file, tmp_path / "bad.fits", bunit, 1.0, keys)
    with pytest.raises(InputFileError) as e:
        load_observation(bad, LensingConfig(geometry=GEOM))
    text = str(e.value)
    assert "\n" not in text and str(bad) in text and f"[{field}]" in text and msg in text



def test_sci_on_another_scale_than_noise_is_refused(obs_file, tmp_path):
    def scale(hl):
        hl["SCI"].data = hl["SCI"].data * 1e6

    bad = edit_fits(obs_file, tmp_path / "x1e6.fits", scale)
    with pytest.raises(InputFileError) as e:
        load_observation(bad, LensingConfig(geometry=GEOM))
    assert "[SCI]" in str(e.value) and "different units or scales" in str(e.value)
    cfg = LensingConfig(geometry=GEOM)
    cfg.observation.max_noise_ratio = 1e9          # the check can be relaxed
    load_observation(bad, cfg)


def test_a_bright_image_far_above_its_noise_is_accepted(obs_file, tmp_path):
    """SCI scatter 3,000 times the noise (a bright, deep exposure; the tiny CI observations reach 2,000)
    is not a unit mix-up."""
    def bright(hl):
        hl["SCI"].data = hl["SCI"].data * 3e3 / (1.4826 * np.median(np.abs(hl["SCI"].data - np.median(hl["SCI"].data)))
                                                 / np.median(hl["NOISE"].data))

    load_observation(edit_fits(obs_file, tmp_path / "bright.fits", bright), LensingConfig(geometry=GEOM))


@pytest.mark.parametrize("fill,msg", [(0.0, "SCI is all zero"), (np.nan, "SCI has no finite pixel")])
def test_all_zero_or_all_nan_sci_refused_naming_sci(obs_file, tmp_path, fill, msg):
    def blank(hl):
        hl["SCI"].data = np.full_like(hl["SCI"].data, fill)

    bad = edit_fits(obs_file, tmp_path / "blank.fits", blank)
    with pytest.raises(InputFileError) as e:
        load_observation(bad, LensingConfig(geometry=GEOM))
    text = str(e.value)
    assert "[SCI]" in text and msg in text and "[MASK]" not in text


def test_lens_light_converted_from_its_own_unit(obs_file, tmp_path):
    """LENSLIGHT in MJy/sr (PHOTMJSR = 0.5 in SCI) is converted before it is subtracted from an
    electron/s SCI: adding 2 electron/s to SCI and 1 MJy/sr of lens light gives back the same y."""
    def add(hl):
        hl["SCI"].data = hl["SCI"].data + 2.0
        hl["SCI"].header["PHOTMJSR"] = 0.5
        ll = fits.ImageHDU(np.ones((16, 16), np.float32), name="LENSLIGHT")
        ll.header["BUNIT"] = "MJy/sr"
        hl.append(ll)

    _, y0, _ = load_observation(obs_file, LensingConfig(geometry=GEOM))
    _, y1, m1 = load_observation(edit_fits(obs_file, tmp_path / "ll.fits", add), LensingConfig(geometry=GEOM))
    assert m1["lens_light_subtracted"]
    assert np.allclose(y1.numpy(), y0.numpy(), rtol=0, atol=1e-5)
