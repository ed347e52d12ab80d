"""Simulated observation files, the reader's validation (one-line errors naming file and field), frames,
YAML lens models, PSF resampling on read, and the simulate / inspect commands."""

import json
import math

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.errors import InputFileError
from pipeline.lensing.config import GeometryConfig, LensConfig, LensingConfig, NoiseConfig
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams, gaussian_psf
from pipeline.lensing.simulate import (draw_lens, make_problem, simulate_observation, typical_noise_sigma,
                                       write_observation)
from small_observation import edit_fits

GEOM = GeometryConfig(image_npix=16, image_pixscale=0.1, source_npix=16, source_pixscale=0.1, supersample=2,
                      psf_npix=7)
CFG = LensingConfig(geometry=GEOM)
LENS = LensParams(x0=0.02, y0=-0.01, q=0.75, phi=0.6, rein=0.5, g1=0.03, g2=-0.02)


def _source(seed=0, n=16, pix=0.1):
    rng = np.random.default_rng(seed)
    c = (np.arange(n) - (n - 1) / 2) * pix
    xx, yy = np.meshgrid(c, c)
    x0, y0 = rng.uniform(-0.1, 0.1, 2)
    return (200 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 0.15 ** 2))).astype(np.float32)


@pytest.fixture
def obs_file(tmp_path):
    rng = np.random.default_rng(1)
    obs = simulate_observation(_source(), LENS, GEOM, NoiseConfig(sigma=0.1), rng)
    path = tmp_path / "obs.fits"
    write_observation(path, obs, {"OBSID": ("obs", "id")})
    return path, obs


def test_round_trip_and_chi2(obs_file):
    path, obs = obs_file
    prob, y, meta = load_observation(path, CFG)
    assert meta["frame"] == "ARRAY" and meta["lens"] == LENS
    assert meta["unit_factor"] == pytest.approx(0.01) and not meta["surface_brightness"]
    assert y.shape == (16, 16) and y.dtype == torch.float32
    truth = torch.as_tensor(meta["truth"])[None, None]
    chi2 = float(prob.residual_chi2(truth, y)) / prob.n_data
    assert 0.7 < chi2 < 1.35           # 256 pixels: chi2/m = 1 +- 0.09
    assert meta["peak_snr_truth"] == pytest.approx(float(obs.header["PEAKSNR"][0]), rel=1e-4)
    with fits.open(path, checksum=True) as f:
        assert [h.name for h in f] == ["PRIMARY", "SCI", "NOISE", "PSF", "TRUTH"]
        h = f[0].header
        for key in ("LENSMOD", "LENS_X0", "LENS_Y0", "LENS_Q", "LENS_PHI", "LENS_RE", "SHEAR_G1", "SHEAR_G2",
                    "Z_LENS", "Z_SRC", "SRCNPIX", "SRCPIXSC", "PIXSCALE", "BUNIT"):
            assert key in h
        assert f["SCI"].header["CRPIX1"] == 8.5 and f["SCI"].header["CUNIT1"] == "arcsec"
        assert f["PSF"].header["PSFSAMP"] == pytest.approx(0.05)
        assert f["SCI"].header.get("CHECKSUM")


def test_surface_brightness_bunit_is_converted_to_flux_per_pixel(obs_file, tmp_path):
    """A file in electron/(s arcsec2) reads as the same data as its electron/s twin: SCI and NOISE are
    multiplied by the pixel area (0.01 arcsec2), so y, sigma and the log-likelihood agree."""
    path, _ = obs_file

    def to_sb(hl):
        for name in ("SCI", "NOISE"):
            hl[name].data = hl[name].data / 0.01
            hl[name].header["BUNIT"] = "electron/(s arcsec2)"

    sb = edit_fits(path, tmp_path / "sb.fits", to_sb)
    p1, y1, m1 = load_observation(path, CFG)
    p2, y2, m2 = load_observation(sb, CFG)
    assert m2["surface_brightness"] and not m1["surface_brightness"]
    assert m2["unit_conversion"] == pytest.approx(0.01, rel=1e-12) and m1["unit_conversion"] == 1.0
    assert m1["unit_factor"] == m2["unit_factor"] == pytest.approx(0.01)
    assert torch.allclose(y2, y1, rtol=1e-6, atol=0) and torch.allclose(p2.sigma, p1.sigma, rtol=1e-6, atol=0)
    x = torch.as_tensor(m1["truth"])[None, None]
    assert float(p2.log_likelihood(x, y2)) == pytest.approx(float(p1.log_likelihood(x, y1)), abs=1e-3)


@pytest.mark.parametrize("case,field,msg", [
    ("no_noise", "NOISE", "required image HDU NOISE missing"),
    ("noise_shape", "NOISE", "shape"),
    ("noise_zero", "NOISE", "NOISE must be > 0"),
    ("psf_even", "PSF", "odd"),
    ("psf_norm", "PSF", "normalised"),
    ("psf_negative", "PSF", "negative"),
    ("nan_error", "SCI", "NaN"),
    ("no_lens", "LENSMOD", "no lens model"),
    ("bad_model", "LENSMOD", "unsupported lens model"),
    ("bad_q", "LENS_Q", "axis ratio"),
    ("bad_frame", "LENSFRAM", "unsupported lens frame"),
    ("skewed", "SCI.CD1_1", "not square"),
    ("no_scale", "SCI.PIXSCALE", "pixel scale missing"),
    ("mask_shape", "MASK", "shape"),
    ("sci_3d", "SCI", "2-D"),
])
def test_validation_errors_one_line(obs_file, tmp_path, case, field, msg):
    path, _ = obs_file
    cfg = CFG
    def fn(hl):
        if case == "no_noise":
            del hl["NOISE"]
        elif case == "noise_shape":
            hl["NOISE"].data = hl["NOISE"].data[:8]
        elif case == "noise_zero":
            hl["NOISE"].data[3, 3] = 0.0
        elif case == "psf_even":
            hl["PSF"].data = np.ones((4, 4), np.float32) / 16
        elif case == "psf_norm":
            hl["PSF"].data = hl["PSF"].data * 1.2
        elif case == "psf_negative":
            d = hl["PSF"].data.copy()
            d[0, 0] = -0.05
            d[3, 3] += 0.05
            hl["PSF"].data = d
        elif case == "nan_error":
            hl["SCI"].data[2, 5] = np.nan
        elif case == "no_lens":
            del hl[0].header["LENSMOD"]
        elif case == "bad_model":
            hl[0].header["LENSMOD"] = "NFW+SHEAR"
        elif case == "bad_q":
            hl[0].header["LENS_Q"] = 1.5
        elif case == "bad_frame":
            hl[0].header["LENSFRAM"] = "GALACTIC"
        elif case == "skewed":
            for k in ("CDELT1", "CDELT2"):
                del hl["SCI"].header[k]
            hl["SCI"].header.update({"CD1_1": 0.1, "CD1_2": 0.03, "CD2_1": 0.0, "CD2_2": 0.1})
        elif case == "no_scale":
            for hh in (hl[0].header, hl["SCI"].header):
                for k in ("CDELT1", "CDELT2", "PIXSCALE"):
                    if k in hh:
                        del hh[k]
        elif case == "mask_shape":
            hl.append(fits.ImageHDU(np.ones((4, 4), np.uint8), name="MASK"))
        elif case == "sci_3d":
            hl["SCI"].data = hl["SCI"].data[None]
    if case == "nan_error":
        cfg = LensingConfig(geometry=GEOM)
        cfg.observation.nan_policy = "error"
    bad = edit_fits(path, tmp_path / f"{case}.fits", fn)
    with pytest.raises(InputFileError) as e:
        load_observation(bad, cfg)
    text = str(e.value)
    assert "\n" not in text and str(bad) in text and f"[{field}]" in text and msg in text


def test_nan_pixels_masked_with_warning_and_user_mask(obs_file, tmp_path, caplog):
    path, _ = obs_file

    def fn(hl):
        hl["SCI"].data[2, 5] = np.nan
        m = np.ones((16, 16), np.uint8)
        m[0, :] = 0
        hl.append(fits.ImageHDU(m, name="MASK"))

    f = edit_fits(path, tmp_path / "nan.fits", fn)
    prob, y, meta = load_observation(f, CFG)
    assert not bool(prob.mask[2, 5]) and not prob.mask[0].any()
    assert prob.n_data == 256 - 16 - 1 and float(y[2, 5]) == 0.0
    assert any("NaN" in w for w in meta["warnings"])
    assert meta["mask_fraction"] == pytest.approx(17 / 256)
    x = torch.as_tensor(meta["truth"])[None, None]
    assert torch.isfinite(prob.log_likelihood(x, y)).all()

    def bad_type(hl):
        hl["MASK"].header["MASKTYPE"] = "BAD"

    g = edit_fits(f, tmp_path / "badmask.fits", bad_type)    # now 1 = ignored: only row 0 is used
    prob2, _, _ = load_observation(g, CFG)
    assert prob2.n_data == 16


def test_lens_light_hdu_is_subtracted(obs_file, tmp_path):
    path, _ = obs_file
    yy, xx = np.mgrid[:16, :16]
    light = (5.0 * np.exp(-((xx - 7.5) ** 2 + (yy - 7.5) ** 2) / 8.0)).astype(np.float32)

    def add(hl):
        hl["SCI"].data = hl["SCI"].data + light
        hl.append(fits.ImageHDU(light, name="LENSLIGHT"))

    f = edit_fits(path, tmp_path / "light.fits", add)
    p1, y1, m1 = load_observation(path, CFG)
    p2, y2, m2 = load_observation(f, CFG)
    assert m2["lens_light_subtracted"] and not m1["lens_light_subtracted"]
    assert torch.allclose(y1, y2, atol=1e-5)

    def bad(hl):
        hl["LENSLIGHT"].data = hl["LENSLIGHT"].data[:4]

    g = edit_fits(f, tmp_path / "badlight.fits", bad)
    with pytest.raises(InputFileError, match=r"\[LENSLIGHT\].*shape"):
        load_observation(g, CFG)


def test_lens_from_yaml_beside_file(obs_file, tmp_path):
    path, _ = obs_file

    def strip(hl):
        for k in list(hl[0].header):
            if k.startswith(("LENS", "SHEAR", "Z_")):
                del hl[0].header[k]

    f = edit_fits(path, tmp_path / "nolens.fits", strip)
    (tmp_path / "nolens.lens.yaml").write_text(
        "lens: {model: SIE+SHEAR, x0: 0.02, y0: -0.01, q: 0.75, phi: 0.6, rein: 0.5, g1: 0.03, g2: -0.02}\n")
    p_yaml, y, meta = load_observation(f, CFG)
    p_hdr, _, _ = load_observation(path, CFG)
    assert meta["lens_source"].endswith("nolens.lens.yaml")
    x = torch.as_tensor(meta["truth"])[None, None]
    assert torch.allclose(p_yaml.forward(x), p_hdr.forward(x))
    (tmp_path / "nolens.lens.yaml").write_text("lens: {model: SIE, x0: 0.0, y0: 0.0, q: 0.8, phi: 0.1}\n")
    with pytest.raises(InputFileError, match=r"nolens\.lens\.yaml \[LENS_RE\]"):
        load_observation(f, CFG)


def test_flipped_world_frame_file_gives_same_likelihood(obs_file, tmp_path):
    """The same observation stored mirrored (columns reversed) with CD1_1 < 0: its world frame is the
    original array frame, so the original lens values are its WORLD keywords. The reader maps them to the
    mirrored array frame (x0 -> -x0, phi -> pi - phi, g2 -> -g2) and the likelihood of the mirrored truth
    equals the original one."""
    path, _ = obs_file

    def flip(hl):
        hl[0].header["LENSFRAM"] = "WORLD"
        for name in ("SCI", "NOISE"):
            hl[name].data = hl[name].data[:, ::-1].copy()
            hh = hl[name].header
            for k in ("CDELT1", "CDELT2"):
                del hh[k]
            hh.update({"CD1_1": -0.1, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 0.1})
        hl["PSF"].data = hl["PSF"].data[:, ::-1].copy()

    f = edit_fits(path, tmp_path / "flip.fits", flip)
    p1, y1, m1 = load_observation(path, CFG)
    p2, y2, m2 = load_observation(f, CFG)
    lens2 = m2["lens"]
    assert (lens2.x0, lens2.y0) == pytest.approx((-LENS.x0, LENS.y0))
    assert lens2.phi == pytest.approx(math.pi - LENS.phi) and (lens2.g1, lens2.g2) == pytest.approx((LENS.g1, -LENS.g2))
    x = torch.as_tensor(m1["truth"])[None, None]
    x_flip = torch.flip(x, dims=[-1])
    assert torch.allclose(p2.forward(x_flip), torch.flip(p1.forward(x), dims=[-1]), rtol=1e-4, atol=1e-4)
    assert float(p2.log_likelihood(x_flip, y2)) == pytest.approx(float(p1.log_likelihood(x, y1)), abs=1e-2)
    # a keyword set given in the wrong frame is caught by the likelihood: the unflipped truth fits badly
    assert float(p2.log_likelihood(x, y2)) < float(p1.log_likelihood(x, y1)) - 100


def test_psf_at_image_scale_is_resampled(obs_file, tmp_path):
    """A file whose PSF is sampled at the image pixel scale (0.1") is brought to 0.05" by the one rule; for
    a Nyquist-sampled Gaussian the model agrees with the one made from the exact supersampled PSF."""
    path, _ = obs_file
    wide = 0.3

    def psf_exact(hl):
        hl["PSF"].data = gaussian_psf(wide, 0.05, 25).astype(np.float32)
        hl["PSF"].header["PSFSAMP"] = 0.05

    def psf_coarse(hl):
        hl["PSF"].data = gaussian_psf(wide, 0.1, 13).astype(np.float32)
        hl["PSF"].header["PSFSAMP"] = 0.1

    fe = edit_fits(path, tmp_path / "pe.fits", psf_exact)
    fc = edit_fits(path, tmp_path / "pc.fits", psf_coarse)
    pe, _, me = load_observation(fe, CFG)
    pc, _, mc = load_observation(fc, CFG)
    assert me["psf_fwhm"] == pytest.approx(wide, rel=0.01) and mc["psf_fwhm"] == pytest.approx(wide, rel=0.01)
    x = torch.as_tensor(me["truth"])[None, None]
    a, b = pc.forward(x), pe.forward(x)
    assert float((a - b).norm() / b.norm()) < 5e-3


def test_noise_independent_of_truth_and_snr_level():
    rng = np.random.default_rng(0)
    sources = np.stack([_source(i) * (1 + i % 3) for i in range(12)])
    lens_cfg = LensConfig(rein=(0.4, 0.6))
    sigma = typical_noise_sigma(sources, GEOM, lens_cfg, target_peak_snr=25.0)
    noise = NoiseConfig(sigma=sigma)
    snrs = []
    for s in sources:
        obs = simulate_observation(s, draw_lens(lens_cfg, rng), GEOM, noise, rng)
        assert np.all(obs.noise == np.float32(sigma))        # the same map whatever the truth
        snrs.append(obs.header["PEAKSNR"][0])
    assert 12 < np.median(snrs) < 50
    # the Poisson option (realism sets) writes its truth-dependent variance into NOISE
    obs = simulate_observation(sources[0], LENS, GEOM, NoiseConfig(sigma=sigma, poisson=True, exposure_time=10.0), rng)
    prob = make_problem(LENS, GEOM, sigma=1.0)
    model = prob.physical_forward(torch.as_tensor(sources[0])[None])[0].numpy()
    assert np.allclose(obs.noise ** 2, sigma ** 2 + np.clip(model, 0, None) / 10.0, rtol=1e-4)


def test_draw_lens_ranges():
    cfg = LensConfig(model="EPL", shear_sigma=0.05, shear_max=0.08)
    rng = np.random.default_rng(0)
    ls = [draw_lens(cfg, rng) for _ in range(300)]
    assert all(0.5 <= l.rein <= 0.9 and 0.6 <= l.q <= 0.95 and 0.9 <= l.t <= 1.1 for l in ls)
    g = np.array([math.hypot(l.g1, l.g2) for l in ls])
    assert g.max() <= 0.08 + 1e-12 and 0.03 < np.median(g) < 0.08


class _Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def _run(capsys, *args):
    """The CLI in-process (saves the interpreter start-up of a subprocess per call)."""
    from pipeline.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return _Result(rc, cap.out, cap.err)


def test_simulate_and_inspect_commands(tmp_path, capsys):
    from pipeline.lensing.sources import write_sources
    from pipeline.lensing.config import SourcesConfig

    splits = {"TRAIN": np.stack([_source(i) for i in range(6)]), "VALID": np.zeros((0, 16, 16), np.float32),
              "TEST": np.stack([_source(10 + i) for i in range(3)])}
    res = {"splits": splits, "kinds": {k: ["user"] * len(v) for k, v in splits.items()},
           "counts": {"user": {k: len(v) for k, v in splits.items()}}}
    src = tmp_path / "src.fits"
    write_sources(src, res, SourcesConfig(), 16, 0.1, "0" * 16)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lensing:\n  geometry: {image_npix: 16, source_npix: 16, source_pixscale: 0.1, psf_npix: 7}\n"
                   "  lens: {rein: [0.4, 0.6]}\n")
    out = tmp_path / "obs"
    r = _run(capsys, "simulate", "--config", cfg, "--sources", src, "--split", "TEST", "--n", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["noise_sigma"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "obs-0000.fits", "obs-0001.fits", "obs-0002.fits", "obs-0003.fits"]
    man = json.loads((out / "manifest.json").read_text())
    with fits.open(out / "obs-0002.fits") as f:
        h = f[0].header
        assert h["SPLIT"] == "TEST" and h["LENS_RE"] == pytest.approx(man["observations"][2]["lens"]["rein"])
        # user sources have no generation parameters: rendered constant over each source pixel, whose
        # block average is the source itself
        assert np.array_equal(f["TRUTH"].data, splits["TEST"][h["SRCIDX"]])
        assert h["SRCKIND"] == "user" == man["observations"][2]["kind"] and h["FINEFAC"] == 2
        assert h["TRCHI2"] == pytest.approx(man["observations"][2]["truth_chi2_nu"], abs=1e-5)
    assert man["per_kind"]["user"]["n"] == 4 and summary["per_kind"] == man["per_kind"]
    r = _run(capsys, "inspect", out / "obs-0001.fits", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["image_shape"] == [16, 16] and s["lens"]["model"] == "SIE+SHEAR" and s["mask_fraction"] == 0
    # a 7-pixel PSF truncates the Gaussian at 2.3 sigma: its moment FWHM is 2-3 % low
    assert s["psf"]["fwhm_arcsec"] == pytest.approx(0.15, rel=0.03) and s["peak_snr_truth_model"] > 0
    r = _run(capsys, "inspect", out / "obs-0001.fits", "--config", cfg)
    assert r.returncode == 0 and "SIE+SHEAR" in r.stdout and "peak SNR" in r.stdout
    # errors: one line, exit 2, no partial output directory
    r = _run(capsys, "inspect", tmp_path / "missing.fits")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing.fits" in r.stderr
    bad_out = tmp_path / "bad"
    r = _run(capsys, "simulate", "--config", cfg, "--sources", src, "--split", "VALID", "--n", 2, "--out", bad_out)
    assert r.returncode == 2 and "VALID" in r.stderr and not bad_out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]
