"""Posterior FITS round trip, weighted moments, WCS, log Z flags and corrupted files."""


import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.io.posterior import read_posterior, write_posterior


def _arrays(rng, n=6, ny=8, nx=10):
    return rng.normal(size=(n, ny, nx)).astype(np.float32)


def test_round_trip_equal_weights(tmp_path):
    rng = np.random.default_rng(0)
    s = _arrays(rng)
    truth = rng.normal(size=(8, 10)).astype(np.float32)
    obs = rng.normal(size=(12, 12)).astype(np.float32)
    prov = {"version": "0.1.0", "seed": 7, "config_hash": "abc123", "checkpoint": "results/x" * 12}
    p = write_posterior(tmp_path / "sub" / "post.fits", torch.from_numpy(s), truth=truth, obs=obs,
                        logz={"elbo": -123.5, "elbo_se": 0.25, "iw": -120.0}, chi2=[0.9, 1.0, 1.1, 1.2, 2.0, np.nan],
                        src_pixscale=0.05, obs_pixscale=0.1, method="rtb", provenance=prov, seconds=3.5,
                        obs_file="/a/b/obs-0001.fits", bunit="arb")
    d = read_posterior(p)
    np.testing.assert_array_equal(d["samples"], s)
    assert d["samples"].dtype == np.float32 and d["samples"].dtype.byteorder in ("=", "|", "<")
    np.testing.assert_allclose(d["mean"], s.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d["std"], s.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d["truth"], truth)
    np.testing.assert_array_equal(d["obs"], obs)
    assert d["particles"] is None and d["weights"] is None
    assert d["method"] == "rtb" and d["n_samples"] == 6
    assert d["logz"] == {"elbo": -123.5, "elbo_se": 0.25, "iw": -120.0} and d["logz_available"]
    assert d["chi2_median"] == pytest.approx(1.1)  # median of the finite values
    assert d["seconds"] == 3.5 and d["obs_file"] == "obs-0001.fits"
    assert d["provenance"] == prov and d["units"] == "physical" and d["obs_pixscale"] == 0.1
    assert d["header"]["PIPEVER"] == "0.1.0" and d["header"]["SEED"] == 7 and d["header"]["CFGHASH"] == "abc123"
    sh = d["samples_header"]
    assert sh["CRPIX1"] == 5.5 and sh["CRPIX2"] == 4.5 and sh["CDELT1"] == 0.05 and sh["CUNIT1"] == "arcsec"
    assert sh["CTYPE3"] == "SAMPLE"
    with fits.open(p) as hdul:
        assert hdul["OBS"].header["PIXSCALE"] == 0.1 and hdul["OBS"].header["CRPIX1"] == 6.5
    assert not list(tmp_path.joinpath("sub").glob(".*"))  # no temporaries or lock files left


def test_particles_weighted_moments_and_missing_logz(tmp_path):
    rng = np.random.default_rng(1)
    parts = _arrays(rng, n=5)
    w = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    s = parts[rng.choice(5, size=7, p=w / w.sum())]
    p = write_posterior(tmp_path / "p.fits", s, particles=parts, weights=w, logz={"elbo": None, "iw": None},
                        src_pixscale=0.05, method="fps_smc", provenance={})
    d = read_posterior(p)
    wn = w / w.sum()
    mean = np.einsum("i,ijk->jk", wn, parts.astype(np.float64))
    std = np.sqrt(np.einsum("i,ijk->jk", wn, (parts - mean) ** 2))
    np.testing.assert_allclose(d["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["std"], std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["weights"], wn, rtol=1e-12)
    assert d["logz"] == {"elbo": None, "elbo_se": None, "iw": None} and not d["logz_available"]
    assert d["chi2_median"] is None and d["seconds"] is None
    p2 = write_posterior(tmp_path / "n.fits", s, src_pixscale=0.05, method="rtb", units="network")
    assert read_posterior(p2)["units"] == "network"


def test_bad_inputs_and_corruption(tmp_path):
    rng = np.random.default_rng(2)
    s = _arrays(rng)
    with pytest.raises(ValueError, match="src_pixscale"):
        write_posterior(tmp_path / "x.fits", s, src_pixscale=0, method="m")
    with pytest.raises(ValueError, match="units"):
        write_posterior(tmp_path / "x.fits", s, src_pixscale=0.1, method="m", units="adu")
    with pytest.raises(ValueError, match="truth"):
        write_posterior(tmp_path / "x.fits", s, truth=np.zeros((3, 3)), src_pixscale=0.1, method="m")
    assert not (tmp_path / "x.fits").exists()
    with pytest.raises(InputFileError, match="not found"):
        read_posterior(tmp_path / "missing.fits")
    p = write_posterior(tmp_path / "ok.fits", s, src_pixscale=0.1, method="m")
    raw = bytearray(p.read_bytes())
    # flip bytes inside the SAMPLES data block: the DATASUM no longer matches
    raw[2880 * 2 + 100: 2880 * 2 + 104] = b"\x7f\x00\x12\x34"
    bad = tmp_path / "bad.fits"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match="bad.fits"):
        read_posterior(bad)
    trunc = tmp_path / "trunc.fits"
    trunc.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(InputFileError, match="trunc.fits"):
        read_posterior(trunc)
    fits.HDUList([fits.PrimaryHDU(np.zeros((2, 2)))]).writeto(tmp_path / "other.fits")
    with pytest.raises(InputFileError, match="SAMPLES"):
        read_posterior(tmp_path / "other.fits")


def test_image_products_lens_statistics_and_method_cards_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    s = _arrays(rng)
    obs, model = rng.normal(size=(2, 12, 12)).astype(np.float32)
    resid = np.where(np.arange(144).reshape(12, 12) % 7 == 0, np.nan, obs - model).astype(np.float32)
    sky = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
                       "CRPIX1": 3.0, "CRPIX2": 4.0, "CRVAL1": 10.0, "CRVAL2": 20.0, "CDELT1": -1e-5,
                       "CDELT2": 1e-5})
    lens = {"LENSMOD": ("SIE+SHEAR", ""), "LENSFRAM": ("ARRAY", ""), "LENS_X0": (0.1, ""), "LENS_RE": (0.7, ""),
            "LENSFILE": ("o.lens.yaml", "")}
    stats = {"flux": {"mean": 60.0, "lo": 55.0, "hi": 65.0}, "magnification": {"mean": 9.0, "lo": 8.0, "hi": 10.0},
             "r_half": {"mean": 0.2, "lo": None, "hi": 0.25}}
    p = write_posterior(tmp_path / "p.fits", s, obs=obs, model=model, resid=resid, src_pixscale=0.05,
                        obs_pixscale=0.1, method="inversion", bunit="electron/(s arcsec2)", data_unit="electron/s",
                        image_wcs=sky, lens_cards=lens, source_stats=stats, flux_unit="electron / s",
                        extra_header={"REGLAMB": (0.3, "regularisation strength"), "INVITER": 4})
    d = read_posterior(p)
    np.testing.assert_array_equal(d["model"], model)
    np.testing.assert_array_equal(d["resid"], resid)  # NaN on masked pixels survives
    assert d["data_unit"] == "electron/s" and d["bunit"] == "electron/(s arcsec2)"
    assert d["lens"] == {"LENSMOD": "SIE+SHEAR", "LENSFRAM": "ARRAY", "LENS_X0": 0.1, "LENS_RE": 0.7,
                         "LENSFILE": "o.lens.yaml"} and d["lens_file"] == "o.lens.yaml"
    assert d["source_stats"]["flux"] == stats["flux"] and d["flux_unit"] == "electron / s"
    assert d["source_stats"]["r_half"] == {"mean": 0.2, "lo": None, "hi": 0.25}
    assert d["header"]["REGLAMB"] == 0.3 and d["header"]["INVITER"] == 4
    with fits.open(p) as h:
        assert [h[k].header["BUNIT"] for k in ("OBS", "MODEL", "RESID", "SAMPLES")] == [
            "electron/s", "electron/s", "", "electron/(s arcsec2)"]
        assert all(h[k].header["CTYPE1"] == "RA---TAN" and h[k].header["CRPIX2"] == 4.0 for k in ("OBS", "RESID"))
    assert read_posterior(write_posterior(tmp_path / "q.fits", s, src_pixscale=0.05, method="x"))["lens"] is None


@pytest.mark.parametrize("extra, msg", [({"toolong12": 1}, "1-8 upper-case"), ({"lower": 1}, "1-8 upper-case"),
                                        ({"METHOD": "x"}, "already a posterior keyword"),
                                        ({"OODWARN": "x"}, "already a posterior keyword")])
def test_method_cards_must_be_fits_keywords_of_their_own(tmp_path, extra, msg):
    with pytest.raises(ValueError, match=msg):
        write_posterior(tmp_path / "p.fits", _arrays(np.random.default_rng(4)), src_pixscale=0.05, method="m",
                        extra_header=extra)
