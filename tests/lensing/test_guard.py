"""The guard on the amortized posterior's trained conditions (pipeline.lensing.guard): the shipped
checkpoint's record, one observation just outside each condition (made by the project's simulator or by
editing a header) refused or warned about per the policy ``posterior.guard``, an observation inside
judged inside, the OODWARN cards of the posterior file, and the inspect / sample commands."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.cli import main
from pipeline.errors import InputFileError
from pipeline.io.posterior import read_posterior, write_posterior
from pipeline.lensing.config import GeometryConfig, GuardConfig, LensingConfig, NoiseConfig
from pipeline.lensing.guard import (CONDITIONS, apply_policy, check_observation, measure_trained_conditions,
                                    read_trained_record)
from pipeline.lensing.amortized import MultiLensProblem
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams, gaussian_psf
from pipeline.lensing.simulate import make_problem, simulate_observation, write_observation

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "pretrained" / "posterior"
CONFIG = ROOT / "config" / "config.yaml"
SIGMA = 0.25725827636718757  # the shipped posterior's noise level (data/pretrained/README.md) [electron/s]
LENS = LensParams(x0=0.02, y0=-0.01, q=0.8, phi=0.6, rein=0.7, g1=0.03, g2=-0.02)
DEFAULT = LensingConfig()  # the geometry the shipped posterior was trained on (config/config.yaml's)


def _source(geom: GeometryConfig, peak=1500.0, width=0.12) -> np.ndarray:
    """A round Gaussian source [electron/(s arcsec2)] on the source grid."""
    c = (np.arange(geom.source_npix) - (geom.source_npix - 1) / 2) * geom.source_pixscale
    xx, yy = np.meshgrid(c, c)
    return (peak * np.exp(-((xx - 0.03) ** 2 + (yy + 0.02) ** 2) / (2 * width ** 2))).astype(np.float32)


def _simulate(path, geom=DEFAULT.geometry, lens=LENS, seed=3) -> Path:
    obs = simulate_observation(_source(geom), lens, geom, NoiseConfig(sigma=SIGMA), np.random.default_rng(seed))
    write_observation(path, obs, {"OBSID": ("guard", "id")})
    return path


def _edit(src, dst, fn) -> Path:
    with fits.open(src) as f:
        hl = fits.HDUList([h.copy() for h in f])
    fn(hl)
    hl.writeto(dst, overwrite=True)
    return dst


def _keys(**kv):
    def fn(hl):
        for k, v in kv.items():
            hl[0].header[k] = v
    return fn


def _scale(name, factor):
    def fn(hl):
        hl[name].data = (hl[name].data * factor).astype(np.float32)
    return fn


def _add(name, value):
    def fn(hl):
        hl[name].data = (hl[name].data + value).astype(np.float32)
    return fn


def _mask_tenth(hl):
    m = np.ones(hl["SCI"].data.shape, np.int16)
    m.reshape(-1)[::10] = 0
    hl.append(fits.ImageHDU(m, name="MASK"))


def _wide_psf(hl):
    hl["PSF"].data = gaussian_psf(0.3, float(hl["PSF"].header["PSFSAMP"]), 15).astype(np.float32)


@pytest.fixture(scope="module")
def record():
    return read_trained_record(SHIPPED)


@pytest.fixture(scope="module")
def inside(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("guard") / "inside.fits")


def _judge(path, record, cfg=DEFAULT, gcfg=None):
    problem, y, meta = load_observation(path, cfg, brightness=cfg.brightness)
    verdicts = check_observation(record, problem, y, meta, gcfg or GuardConfig())
    return {v.condition for v in verdicts if not v.inside}, verdicts


def test_shipped_checkpoint_records_what_it_was_trained_on(record):
    # config/config.yaml's geometry and lens ranges and its pinned noise level
    assert (record["image_npix"], record["image_pixscale"], record["source_npix"], record["source_pixscale"],
            record["supersample"], record["psf_fwhm"]) == (32, 0.1, 32, 0.05, 2, 0.15)
    assert record["noise_sigma"] == [SIGMA, SIGMA] and record["bunit"] == "electron/s"
    assert record["lens_model"] == "SIE" and record["rein"] == [0.5, 0.9] and record["q"] == [0.6, 0.95]
    assert record["center"] == 0.05 and record["shear_max"] == 0.15 and record["mask_fraction"] == [0.0, 0.0]
    for key in ("peak_snr", "image_flux", "source_flux"):
        lo, hi = record[key]
        assert 0 < lo < hi, key
    assert record["measured_on"]["lenses"] == 512


def test_an_observation_inside_every_condition_gets_no_warning(inside, record):
    outside, verdicts = _judge(inside, record)
    assert outside == set(), [v.reason for v in verdicts if not v.inside]
    assert {v.condition for v in verdicts} == set(CONDITIONS) - {"lens_slope"}  # slope: EPL records only
    assert apply_policy(inside, verdicts, GuardConfig()) == []


# condition, how the observation is made from the inside one, the record's changes, config changes
CASES = {
    "image_grid": (lambda p, t: _simulate(t, dataclasses.replace(DEFAULT.geometry, image_npix=34)), {}, {}),
    "pixel_scale": (lambda p, t: _simulate(t, dataclasses.replace(DEFAULT.geometry, image_pixscale=0.12)), {}, {}),
    "source_grid": (lambda p, t: p, {}, {"source_npix": 24}),
    "supersample": (lambda p, t: p, {}, {"supersample": 3}),
    "psf": (lambda p, t: _edit(p, t, _wide_psf), {}, {}),
    "noise": (lambda p, t: _edit(p, t, _scale("NOISE", 1.3)), {}, {}),
    "lens_model": (lambda p, t: _edit(p, t, _keys(LENSMOD="EPL", LENS_T=1.0)), {}, {}),
    "lens_rein": (lambda p, t: _edit(p, t, _keys(LENS_RE=2.5)), {}, {}),
    "lens_rein_just": (lambda p, t: _edit(p, t, _keys(LENS_RE=0.95)), {}, {}),
    "lens_q": (lambda p, t: _edit(p, t, _keys(LENS_Q=0.3)), {}, {}),
    "lens_phi": (lambda p, t: _edit(p, t, _keys(LENS_PHI=2.0)), {"phi": [0.0, 1.0]}, {}),
    "lens_center": (lambda p, t: _edit(p, t, _keys(LENS_X0=2.0)), {}, {}),  # outside the 1.6" field
    "lens_center_just": (lambda p, t: _edit(p, t, _keys(LENS_Y0=-0.08)), {}, {}),
    "lens_slope": (lambda p, t: _edit(p, t, _keys(LENSMOD="EPL", LENS_T=1.3)),
                   {"lens_model": "EPL", "t": [0.9, 1.1]}, {}),
    "lens_shear": (lambda p, t: _edit(p, t, _keys(SHEAR_G1=0.9)), {}, {}),
    "mask": (lambda p, t: _edit(p, t, _mask_tenth), {}, {}),
    # ranges measured on the training pool: narrowed here so the case does not depend on how bright the
    # shipped posterior's training sources were (the inside observation: peak SNR 49, image flux 1,834)
    "peak_snr": (lambda p, t: _edit(p, t, _scale("SCI", 20.0)), {"peak_snr": [1.0, 100.0]}, {}),
    "flux": (lambda p, t: _edit(p, t, _add("SCI", 3.0)), {"image_flux": [10.0, 3000.0]}, {}),
}
ERROR_BY_DEFAULT = {"image_grid", "pixel_scale", "source_grid"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_observation_outside_a_condition_is_refused_or_warned_per_the_policy(case, inside, record, tmp_path):
    condition = case.removesuffix("_just")
    make, rec_changes, geom_changes = CASES[case]
    path = make(inside, tmp_path / f"{case}.fits")
    cfg = LensingConfig(geometry=dataclasses.replace(DEFAULT.geometry, **geom_changes))
    rec = {**record, **rec_changes}
    outside, verdicts = _judge(path, rec, cfg)
    assert condition in outside
    keyword = CONDITIONS[condition][0]
    if condition in ERROR_BY_DEFAULT:
        with pytest.raises(InputFileError) as err:
            apply_policy(path, verdicts, GuardConfig())
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and keyword in msg and condition in msg
        # the policy decides: as a warning it is sampled, with the reason
        lenient = GuardConfig(**{condition: "warn"})
        assert any(w.startswith(f"{condition}: ") for w in apply_policy(path, verdicts, lenient))
    else:
        warnings = apply_policy(path, verdicts, GuardConfig())
        assert any(w.startswith(f"{condition}: ") for w in warnings)
        with pytest.raises(InputFileError, match=keyword.split(" ")[0]):
            apply_policy(path, verdicts, GuardConfig(**{condition: "error"}))


def test_position_angles_are_periodic_in_pi(inside, record, tmp_path):
    rec = {**record, "phi": [0.0, 1.0]}
    path = _edit(inside, tmp_path / "phi.fits", _keys(LENS_PHI=math.pi + 0.5))
    assert "lens_phi" not in _judge(path, rec)[0]


def test_posterior_file_carries_one_oodwarn_card_per_condition(tmp_path):
    reasons = ["lens_rein: Einstein radius 2.5\" outside the trained [0.5, 0.9]",
               "lens_shear: shear |gamma| = 0.9 above the trained maximum 0.15 " + "x" * 80]
    kw = dict(src_pixscale=0.05, method="rtb_amortized")
    write_posterior(tmp_path / "warned.fits", np.zeros((2, 4, 4), np.float32), ood_warnings=reasons, **kw)
    write_posterior(tmp_path / "clean.fits", np.zeros((2, 4, 4), np.float32), **kw)
    assert read_posterior(tmp_path / "warned.fits")["ood_warnings"] == reasons
    assert read_posterior(tmp_path / "clean.fits")["ood_warnings"] == []
    with fits.open(tmp_path / "clean.fits") as f:
        assert "OODWARN" not in f[0].header


def test_the_record_measures_the_pool(tmp_path):
    geom = GeometryConfig(image_npix=12, image_pixscale=0.2, source_npix=12, source_pixscale=0.1, supersample=1,
                          psf_fwhm=0.3, psf_npix=5)
    cfg = LensingConfig(geometry=geom)
    pool = MultiLensProblem([make_problem(LENS, geom, sigma=0.5),
                             make_problem(dataclasses.replace(LENS, rein=0.5), geom, sigma=0.5)])

    class Prior:  # network units = physical units
        @staticmethod
        def to_physical(x):
            return x

    truths = torch.zeros(3, 1, 12, 12)
    truths[:, 0, 5:7, 5:7] = torch.tensor([100.0, 200.0, 400.0])[:, None, None]
    rec = measure_trained_conditions(cfg, 0.5, pool, truths, Prior)
    # source flux: surface brightness x 4 pixels x 0.01 arcsec2
    assert rec["source_flux"] == pytest.approx([4.0, 16.0])
    # every (lens, truth) pair's noiseless image: the faintest truth through the weaker lens, the brightest
    # through the stronger one
    models = torch.cat([p.forward(truths) for p in pool.problems])
    flux, peak = models.sum((-2, -1)), models.amax((-2, -1)) / 0.5
    assert rec["image_flux"] == pytest.approx([float(flux.min()), float(flux.max())], rel=1e-6)
    assert rec["peak_snr"] == pytest.approx([float(peak.min()), float(peak.max())], rel=1e-6)
    assert rec["noise_sigma"] == [0.5, 0.5] and rec["image_npix"] == 12 and rec["rein"] == [0.5, 0.9]
    assert rec["measured_on"] == {"lenses": 2, "truths": 3, "from": "pool"}


def _cli(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_inspect_prints_the_verdict_against_the_configured_posterior(inside, tmp_path, capsys):
    path = _edit(inside, tmp_path / "big.fits", _keys(LENS_RE=2.5))
    rc, out, err = _cli(capsys, "inspect", path, "--config", CONFIG, "--json")
    assert rc == 0, err
    guard = json.loads(out)["guard"]
    assert guard["posterior"] == str(SHIPPED)
    assert guard["conditions"]["lens_rein"] == {"inside": False, "policy": "warn", "keyword": "LENS_RE",
                                                "reason": "Einstein radius 2.5\" outside the trained [0.5, 0.9]"}
    assert all(v["inside"] for k, v in guard["conditions"].items() if k != "lens_rein")
    rc, out, _ = _cli(capsys, "inspect", inside, "--posterior", SHIPPED)
    assert rc == 0 and re.search(r"lens_rein +inside", out) and "OUTSIDE" not in out
    rc, out, _ = _cli(capsys, "inspect", inside)
    assert rc == 0 and "no posterior" in out


@pytest.mark.slow
def test_sample_refuses_or_warns_with_the_shipped_checkpoint(inside, tmp_path, capsys):
    base = ["sample", "--config", CONFIG, "--method", "rtb_amortized", "--prior", ROOT / "data/pretrained/prior",
            "--posterior", SHIPPED, "--n", 2]
    big = _edit(inside, tmp_path / "big.fits", _keys(LENS_RE=2.5, LENS_Q=0.3))
    rc, _, err = _cli(capsys, *base, "--obs", big, "--out-file", tmp_path / "big_post.fits")
    assert rc == 0, err
    warned = read_posterior(tmp_path / "big_post.fits")["ood_warnings"]
    assert [w.split(":")[0] for w in warned] == ["lens_rein", "lens_q"]
    rc, _, err = _cli(capsys, *base, "--obs", inside, "--out-file", tmp_path / "inside_post.fits")
    assert rc == 0 and read_posterior(tmp_path / "inside_post.fits")["ood_warnings"] == []
    # another grid: refused before sampling, one line naming the file and keyword, no output at all
    grid = _simulate(tmp_path / "grid.fits", dataclasses.replace(DEFAULT.geometry, image_npix=34))
    rc, _, err = _cli(capsys, *base, "--obs", inside, grid, "--out", tmp_path / "refused")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(grid) in err and "SCI.NAXIS1" in err
    assert not (tmp_path / "refused").exists()


def test_a_surface_brightness_file_is_judged_in_flux_per_pixel(inside, record, tmp_path):
    def to_sb(hl):
        for name in ("SCI", "NOISE"):
            hl[name].data = (hl[name].data / 0.01).astype(np.float32)  # per 0.01 arcsec2 pixel
            hl[name].header["BUNIT"] = "electron/(s arcsec2)"

    sb = _edit(inside, tmp_path / "sb.fits", to_sb)
    assert _judge(sb, record)[0] == set()
    noisy = _edit(sb, tmp_path / "sb_noisy.fits", _scale("NOISE", 1.3))
    assert "noise" in _judge(noisy, record)[0]


def test_an_export_without_a_record_is_judged_on_its_lensing_entry(inside, tmp_path):
    from pipeline.lensing.guard import trained_record

    old = {"lensing": {"noise_sigma": SIGMA, "geometry": dataclasses.asdict(DEFAULT.geometry),
                       "lens_ranges": dataclasses.asdict(DEFAULT.lens), "n_lenses": 512, "n_truths": 4096}}
    rec = trained_record(old, tmp_path)
    outside, verdicts = _judge(_edit(inside, tmp_path / "big.fits", _keys(LENS_RE=2.5)), rec)
    assert outside == {"lens_rein"}
    assert {v.condition for v in verdicts} == set(CONDITIONS) - {"lens_slope", "peak_snr", "flux"}  # not recorded
    with pytest.raises(InputFileError, match="trained_on") as err:
        trained_record({"kind": "rtb_posterior"}, tmp_path)
    assert "\n" not in str(err.value) and "hparams.json" in str(err.value)
