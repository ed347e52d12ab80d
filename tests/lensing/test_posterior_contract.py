"""What every posterior file `sample` writes carries (docs/posterior-files.md), for a simulated
observation and for a user-style file: MJy/sr with PHOTMJSR, a sky WCS (RA---TAN / DEC--TAN, CD matrix),
at half the trained pixel scale (rebinned 2x2), larger than the trained image (cropped), a MASK, and the
lens in a YAML file beside it. Sampled with the shipped prior and the cheap `fps` method, 4 samples."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from astropy.io import fits
from astropy.wcs import WCS

from pipeline.io.posterior import read_posterior
from pipeline.lensing.config import GeometryConfig, NoiseConfig, load_lensing_config
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams
from pipeline.lensing.sample import sample_observations
from pipeline.lensing.simulate import simulate_observation, write_observation

ROOT = Path(__file__).resolve().parents[2]
PRIOR = ROOT / "data" / "pretrained" / "prior"
DOC = ROOT / "docs" / "posterior-files.md"
LENS = LensParams(x0=0.02, y0=-0.03, q=0.8, phi=0.7, rein=0.7, g1=0.04, g2=-0.03)
PHOTMJSR = 0.37

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # ~20 s: the fixture samples


def _truth(n=32, pix=0.05):
    """An elliptical Gaussian of 60 electron/s [electron/(s arcsec2)] on the trained source grid."""
    c = (np.arange(n) - (n - 1) / 2) * pix
    xx, yy = np.meshgrid(c, c)
    g = np.exp(-((xx - 0.05) ** 2 / 0.18 ** 2 + (yy + 0.02) ** 2 / 0.1 ** 2) / 2)
    return (g * 60.0 / (g.sum() * pix * pix)).astype(np.float32)


def _user_file(path):
    """86 x 84 pixels at 0.05"/px: rebinned to 43 x 42 at 0.1"/px, then cropped around the centre to 32 x 32
    (rows 10..73, columns 10..73 of the file). SCI and ERR in MJy/sr; one 2x2 block masked."""
    geom = GeometryConfig(image_npix=86, image_pixscale=0.05, source_npix=32, source_pixscale=0.05, supersample=2,
                          psf_fwhm=0.15, psf_npix=11)
    obs = simulate_observation(_truth(), LENS, geom, NoiseConfig(sigma=0.13), np.random.default_rng(12))
    wcs = {"BUNIT": "MJy/sr", "PHOTMJSR": PHOTMJSR, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg",
           "CUNIT2": "deg", "CD1_1": -0.05 / 3600 * 0.8, "CD1_2": 0.05 / 3600 * 0.6, "CD2_1": 0.05 / 3600 * 0.6,
           "CD2_2": 0.05 / 3600 * 0.8, "CRPIX1": 30.5, "CRPIX2": 47.25, "CRVAL1": 53.1, "CRVAL2": -27.8}
    hdus = [fits.PrimaryHDU()]
    for name, arr in (("SCI", obs.sci), ("ERR", obs.noise)):
        h = fits.ImageHDU((arr[:, 1:85] * PHOTMJSR).astype(np.float32), name=name)  # same array centre
        h.header.update(wcs)
        hdus.append(h)
    mask = np.ones((86, 84), np.uint8)
    mask[40:42, 40:42] = 0  # one 2x2 block of the rebinned grid: rebinned pixel (20, 20) -> OBS (15, 15)
    hdus.append(fits.ImageHDU(mask, name="MASK"))
    psf = fits.ImageHDU(np.asarray(obs.psf, np.float32), name="PSF")
    psf.header["PSFSAMP"] = obs.psfsamp
    hdus.append(psf)
    fits.HDUList(hdus).writeto(path)
    lens = {"model": "SIE", "x0": LENS.x0, "y0": LENS.y0, "q": LENS.q, "phi": LENS.phi, "rein": LENS.rein,
            "g1": LENS.g1, "g2": LENS.g2}
    path.with_suffix(".lens.yaml").write_text(yaml.safe_dump({"lens": lens}))
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["device"] = "cpu"
    cfg["lensing"].setdefault("observation", {}).update({"rebin": "auto", "crop": "centre"})
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    obs = root / "obs"
    obs.mkdir()
    lcfg = load_lensing_config(config)
    write_observation(obs / "sim.fits", simulate_observation(_truth(), LENS, lcfg.geometry, NoiseConfig(sigma=0.26),
                                                             np.random.default_rng(11)))
    _user_file(obs / "user.fits")
    res = sample_observations(str(config), "fps", PRIOR, None, [str(obs)], root / "post", n=4, seed=3)
    return {"config": config, "lcfg": lcfg, "obs": obs, "res": {Path(r["obs"]).stem: r for r in res}}


def _hdul(written, name):
    return fits.open(written["res"][name]["out"])


@pytest.mark.parametrize("name", ["sim", "user"])
def test_model_and_residuals_in_the_data_unit(written, name):
    problem, y, meta = load_observation(written["obs"] / f"{name}.fits", written["lcfg"])
    with _hdul(written, name) as h:
        mean, obs, model, resid = (np.asarray(h[k].data, np.float64) for k in ("MEAN", "OBS", "MODEL", "RESID"))
        assert h["OBS"].header["BUNIT"] == "electron/s" and h["MODEL"].header["BUNIT"] == "electron/s"
        assert h[0].header["DATAUNIT"] == "electron/s"
    np.testing.assert_array_equal(obs, y.numpy())
    want = problem.physical_forward(torch.as_tensor(mean, dtype=torch.float32)[None])[0].numpy()
    np.testing.assert_allclose(model, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    used = meta["mask"]
    sigma = problem.sigma.numpy()
    np.testing.assert_allclose(resid[used], ((obs - model) / sigma)[used], rtol=1e-4, atol=1e-5)
    assert np.isnan(resid[~used]).all()
    if name == "user":
        assert not used[15, 15] and used.sum() == used.size - 1
    # the samples fit the data: residuals of the posterior mean are of order 1
    assert 0.3 < np.nanstd(resid) < 3.0


@pytest.mark.parametrize("name", ["sim", "user"])
def test_bunit_of_every_hdu(written, name):
    want = {"PRIMARY": "electron/(s arcsec2)", "SAMPLES": "electron/(s arcsec2)", "MEAN": "electron/(s arcsec2)",
            "STD": "electron/(s arcsec2)", "TRUTH": "electron/(s arcsec2)", "PARTICLES": "electron/(s arcsec2)",
            "OBS": "electron/s", "MODEL": "electron/s", "RESID": "", "WEIGHTS": "", "CHI2": ""}
    with _hdul(written, name) as h:
        assert {hdu.name: hdu.header.get("BUNIT") for hdu in h} == {hdu.name: want[hdu.name] for hdu in h}
        assert {"SAMPLES", "MEAN", "STD", "OBS", "MODEL", "RESID", "CHI2"} <= {hdu.name for hdu in h}


def test_lens_keywords_in_the_array_frame_of_obs_and_where_they_came_from(written):
    sim, user = (read_posterior(written["res"][k]["out"]) for k in ("sim", "user"))
    for d in (sim, user):
        assert d["lens"]["LENSMOD"] == "SIE+SHEAR" and d["lens"]["LENSFRAM"] == "ARRAY"
        assert (d["lens"]["LENS_Q"], d["lens"]["LENS_PHI"], d["lens"]["LENS_RE"]) == (LENS.q, LENS.phi, LENS.rein)
        assert (d["lens"]["SHEAR_G1"], d["lens"]["SHEAR_G2"]) == (LENS.g1, LENS.g2)
        assert (d["lens"]["Z_LENS"], d["lens"]["Z_SRC"]) == (0.5, 1.5) and "LENS_T" not in d["lens"]
    assert (sim["lens"]["LENS_X0"], sim["lens"]["LENS_Y0"]) == (LENS.x0, LENS.y0)
    assert sim["lens_file"] == "sim.fits" and user["lens_file"] == "user.lens.yaml"
    # the crop keeps file rows 10..73 of 86 (centre row 41.5 against the file's 42.5): the lens sits
    # 1 file pixel = 0.05" higher in OBS's frame; columns 10..73 of 84 keep the centre
    assert user["lens"]["LENS_X0"] == pytest.approx(LENS.x0, abs=1e-9)
    assert user["lens"]["LENS_Y0"] == pytest.approx(LENS.y0 + 0.05, abs=1e-9)


def test_sky_wcs_of_obs_maps_pixels_to_the_file_pixels_they_came_from(written):
    with fits.open(written["obs"] / "user.fits") as f:
        w_file = WCS(f["SCI"].header)
    with _hdul(written, "user") as h:
        for name in ("OBS", "MODEL", "RESID"):
            w = WCS(h[name].header)
            assert w.has_celestial and h[name].header["PIXSCALE"] == pytest.approx(0.1)
            rows, cols = np.mgrid[:32, :32]
            # OBS pixel (r, c) is the 2x2 file block from row 10 + 2r, column 10 + 2c: centre + 0.5
            ra, dec = w.pixel_to_world_values(cols, rows)
            ra0, dec0 = w_file.pixel_to_world_values(10.5 + 2 * cols, 10.5 + 2 * rows)
            sep = np.hypot((ra - ra0) * np.cos(np.radians(dec0)), dec - dec0) * 3600
            assert sep.max() < 1e-6, name  # arcsec
    with _hdul(written, "sim") as h:  # no sky WCS: the offset WCS centred on OBS
        hd = h["OBS"].header
        assert (hd["CTYPE1"], hd["CRPIX1"], hd["CRVAL1"]) == ("OFFSET-X", 16.5, 0.0)
        assert hd["CDELT1"] == pytest.approx(0.1, rel=1e-12)


def test_source_statistics_in_header_and_results(written):
    for name in ("sim", "user"):
        r, d = written["res"][name], read_posterior(written["res"][name]["out"])
        assert d["source_stats"] == r["source_stats"] and d["flux_unit"] == r["flux_unit"] == "electron / s"
        st = r["source_stats"]
        for v in st.values():
            assert v["lo"] <= v["mean"] <= v["hi"]
        assert st["flux"]["mean"] == pytest.approx(60.0, rel=0.25)  # the truth's 60 electron/s
        assert 2.0 < st["magnification"]["mean"] < 50.0
        # the truth's half-light radius on the same grid, within the samples' spread
        from pipeline.metrics.source_stats import half_light_radius
        assert st["r_half"]["mean"] == pytest.approx(half_light_radius(_truth(), 0.05)[0], rel=0.4)


# ----------------------------------------------------------------------------- the docs page
STRUCTURE = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT",
             "EXTNAME"}


def _doc_tables():
    """({HDU: present}, [(keywords, HDUs, present)]) from the rows of the page's "HDUs" and "Keywords"
    tables."""
    hdus, keys, section = {}, [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] in ("HDU", "keyword") or set(cells[0]) <= set("-"):
            continue
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0]) or [cells[0]]
        if section == "HDUs":
            hdus.update({n: cells[1] for n in names})
        elif section == "Keywords":
            keys.append((names, [c.strip() for c in cells[1].split(",")], cells[2]))
    assert len(hdus) >= 11 and len(keys) >= 30  # the page's tables were found
    return hdus, keys


@pytest.mark.parametrize("name", ["sim", "user"])
def test_docs_page_lists_exactly_what_the_file_carries(written, name):
    doc_hdus, doc_keys = _doc_tables()
    with _hdul(written, name) as h:
        present = [hdu.name for hdu in h]
        assert set(present) <= set(doc_hdus), set(present) - set(doc_hdus)
        assert {n for n, p in doc_hdus.items() if p == "always"} <= set(present)
        for hdu in h:
            documented, sky = set(STRUCTURE), False
            for names, where, when in doc_keys:
                if hdu.name in where or "all" in where:
                    if names == ["sky WCS"]:
                        sky = True
                        continue
                    documented |= set(names)
                    if when.startswith("always"):
                        missing = set(names) - set(hdu.header)
                        assert not missing, (hdu.name, missing)
            extra = set(hdu.header) - documented
            if sky and WCS(hdu.header).has_celestial:
                extra -= set(WCS(hdu.header).to_header())
            assert not extra, (hdu.name, extra)
