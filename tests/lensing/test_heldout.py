"""Held-out observations rendered with a finer forward model than inference: sources re-drawn on a grid
f times finer, lensed with the image supersampled accordingly, TRUTH the block average; the kind and
the truth's chi2 under the inference operator recorded per file and per kind."""

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.lensing.config import GeometryConfig, NoiseConfig, SourcesConfig
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams
from pipeline.lensing.simulate import make_problem
from pipeline.lensing.sources import build_sources, read_sources, write_sources
from pipeline.metrics.chi2 import chi2_per_sample, forward_view

# image 16 x 0.1", source 16 x 0.05": the demo's scales on a smaller field
GEOM = GeometryConfig(image_npix=16, image_pixscale=0.1, source_npix=16, source_pixscale=0.05, supersample=2,
                      psf_fwhm=0.15, psf_npix=11)
LENS = LensParams(x0=0.02, y0=-0.01, q=0.75, phi=0.6, rein=0.5, g1=0.03, g2=-0.02)


def _gauss(n, pix, sigma, x0=0.04, y0=-0.03, amp=100.0):
    """A round Gaussian [surface brightness] point-sampled on an n x n grid of ``pix`` arcsec."""
    c = (np.arange(n) - (n - 1) / 2) * pix
    xx, yy = np.meshgrid(c, c)
    return amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _block(img, f):
    """Mean over f x f blocks (the test's own block average)."""
    n = img.shape[0] // f
    return np.asarray(img, np.float64).reshape(n, f, n, f).mean((1, 3))


def test_block_average_keeps_flux_and_surface_brightness():
    from pipeline.lensing.grids import block_average

    rng = np.random.default_rng(0)
    fine = rng.uniform(0, 10, size=(32, 32))
    coarse = block_average(fine, 2)
    assert coarse.shape == (16, 16)
    assert coarse[3, 5] == pytest.approx(fine[6:8, 10:12].mean(), rel=1e-12)
    # flux = surface brightness x pixel area: (p/2)^2 per fine pixel, p^2 per coarse pixel
    assert fine.sum() * 0.025 ** 2 == pytest.approx(coarse.sum() * 0.05 ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        block_average(fine[:31], 2)


@pytest.mark.parametrize("factor", [2, 3])
def test_fine_rendering_agrees_with_inference_operator_on_a_smooth_source(factor):
    """A source smooth at the source-pixel scale (Gaussian sigma 0.2" = 4 source px): the fine rendering
    and the inference operator on its block average give the same image to < 1.5 % (L2), and the fine
    one is the more accurate (closer to a 16x finer reference)."""
    from pipeline.lensing.heldout import fine_model

    sig = 0.2
    fine = _gauss(16 * factor, 0.05 / factor, sig)
    truth = _block(fine, factor)
    m_fine = fine_model(fine, LENS, GEOM, factor)
    prob = make_problem(LENS, GEOM, sigma=1.0)
    m_inf = prob.physical_forward(torch.as_tensor(truth, dtype=torch.float32)[None])[0].double().numpy()
    assert _rel(m_fine, m_inf) < 0.015
    assert m_fine.sum() == pytest.approx(m_inf.sum(), rel=0.01)
    ref = fine_model(_gauss(16 * 16, 0.05 / 16, sig), LENS, GEOM, 16)
    assert _rel(m_fine, ref) < 0.5 * _rel(m_inf, ref)


def test_fine_rendering_conserves_flux_without_lens():
    """No deflection (Einstein radius 1e-6", no shear): the image's total flux [flux per pixel summed]
    equals the source's (surface brightness x fine pixel area) to 1e-4; the PSF and pixel averaging
    move light around but keep it."""
    from pipeline.lensing.heldout import fine_model

    lens = LensParams(rein=1e-6, q=0.9)
    for factor in (2, 4):
        fine = _gauss(16 * factor, 0.05 / factor, 0.08)
        flux = fine.sum() * (0.05 / factor) ** 2
        assert fine_model(fine, lens, GEOM, factor).sum() == pytest.approx(flux, rel=1e-4)


def test_heldout_observation_is_not_the_inference_model_of_its_truth():
    """SCI minus noise is the fine model, which differs from the inference operator applied to TRUTH
    by more than the noise in the arc of a compact source; TRUTH is the block average."""
    from pipeline.lensing.heldout import fine_model, simulate_heldout_observation

    fine = _gauss(32, 0.025, 0.04, amp=3000.0)
    noise = NoiseConfig(sigma=0.05)
    obs = simulate_heldout_observation(fine, LENS, GEOM, 2, noise, np.random.default_rng(3))
    assert np.allclose(obs.truth, _block(fine, 2), rtol=1e-6)
    model = fine_model(fine, LENS, GEOM, 2)
    resid = (obs.sci - model) / obs.noise
    assert 0.8 < resid.std() < 1.2 and abs(resid.mean()) < 0.2       # 256 pixels of unit noise
    prob = make_problem(LENS, GEOM, sigma=noise.sigma)
    m_inf = prob.physical_forward(torch.as_tensor(obs.truth)[None])[0].double().numpy()
    assert np.abs(model - m_inf).max() > 3 * noise.sigma
    assert obs.header["FINEFAC"][0] == 2 and obs.header["SUPERSMP"][0] == 4
    with pytest.raises(ValueError, match="integer >= 2"):
        simulate_heldout_observation(fine, LENS, GEOM, 1, noise, np.random.default_rng(3))


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory):
    """A sources file with both kinds and 8 held-out observations from its TEST split (CI geometry)."""
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("heldout")
    cfg_src = SourcesConfig(seed=3, n_galsim=20, n_hst=20)
    res = build_sources(cfg_src, 16, 0.1)
    src = tmp / "sources.fits"
    write_sources(src, res, cfg_src, 16, 0.1, "0" * 16)
    cfg = tmp / "cfg.yaml"
    cfg.write_text("lensing:\n  geometry: {image_npix: 16, image_pixscale: 0.2, source_npix: 16, source_pixscale: 0.1,"
                   " supersample: 2, psf_fwhm: 0.3, psf_npix: 7}\n")
    out = tmp / "obs"
    assert main(["simulate", "--config", str(cfg), "--sources", str(src), "--split", "TEST", "--n", "8",
                 "--out", str(out)]) == 0
    return src, cfg, out


@pytest.mark.slow
def test_heldout_set_truths_are_block_averages_of_finer_renderings_per_kind(heldout_dir):
    from pipeline.lensing.config import load_lensing_config

    src, cfg_path, out = heldout_dir
    cfg = load_lensing_config(cfg_path)
    test, _ = read_sources(src, "TEST")
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["observations"]) == 8
    for e in man["observations"]:
        with fits.open(out / e["file"]) as f:
            truth, j = f["TRUTH"].data.astype(np.float64), f[0].header["SRCIDX"]
            sci = f["SCI"].data.astype(np.float64)
        # TRUTH is not the source grid's own image, and SCI is not the inference operator applied to
        # TRUTH plus noise: for every kind, far more than noise separates them
        assert _rel(truth, test[j]) > 0.02
        problem, y, meta = load_observation(out / e["file"], cfg)
        m_inf = problem.physical_forward(torch.as_tensor(truth, dtype=torch.float32)[None])[0].double().numpy()
        assert np.mean(((sci - m_inf) / problem.sigma.numpy()) ** 2) > 1.5

    from pipeline.lensing.heldout import fine_model
    from pipeline.lensing.sources import read_source_records, render_source_fine

    records = read_source_records(src, "TEST")
    assert man["fine_factor"] == 2
    kinds = {e["kind"] for e in man["observations"]}
    assert kinds == {"galsim", "hst"}
    for e in man["observations"]:
        with fits.open(out / e["file"], checksum=True) as f:
            h, truth = f[0].header, f["TRUTH"].data.astype(np.float64)
            sci, noise = f["SCI"].data.astype(np.float64), f["NOISE"].data.astype(np.float64)
        j = h["SRCIDX"]
        assert h["SRCKIND"] == e["kind"] == records[j]["KIND"] and h["FINEFAC"] == 2
        fine = render_source_fine(records[j], test[j], 0.1, 2)
        # TRUTH: the block average of the finer rendering; SCI: its fine model plus unit noise
        assert np.allclose(truth, _block(fine, 2), rtol=1e-5, atol=1e-6 * truth.max())
        lens = LensParams(**{k: v for k, v in e["lens"].items()})
        r = (sci - fine_model(fine, lens, cfg.geometry, 2)) / noise
        assert 0.75 < r.std() < 1.25 and abs(r.mean()) < 0.25        # 256 pixels of N(0, 1)
        assert truth.sum() * 0.1 ** 2 == pytest.approx(fine.sum() * 0.05 ** 2, rel=1e-5)   # flux kept
        if e["kind"] == "hst":
            assert h["HDFSCALE"] == 2.0
        # the recorded chi2 of the truth is the one calibration computes from the file
        problem, y, meta = load_observation(out / e["file"], cfg)
        c = chi2_per_sample(forward_view(problem, "physical"), torch.as_tensor(meta["truth"])[None], y)
        assert h["TRCHI2"] == pytest.approx(c["chi2_nu"][0], rel=1e-4, abs=1e-5)
        assert e["truth_chi2_nu"] == pytest.approx(c["chi2_nu"][0], rel=1e-6)
        assert h["TRNARC"] == int(c["n_arc"][0]) == e["truth_n_arc"]
        if h["TRNARC"] > 0:
            assert h["TRCHI2A"] == pytest.approx(c["chi2_arc_nu"][0], rel=1e-4, abs=1e-5)
        else:
            assert "TRCHI2A" not in h and e["truth_chi2_arc_nu"] is None
    # the per-kind summary: counts and medians of the entries; the deep-field truths, sharp below the
    # source pixel, are visibly misfit by the inference operator
    for kind, s in man["per_kind"].items():
        es = [e for e in man["observations"] if e["kind"] == kind]
        assert s["n"] == len(es)
        assert s["truth_chi2_nu_median"] == pytest.approx(np.median([e["truth_chi2_nu"] for e in es]))
    assert man["per_kind"]["hst"]["truth_chi2_nu_median"] > 1.5


@pytest.mark.slow
def test_simulate_command_refuses_a_factor_below_two(heldout_dir, tmp_path, capsys):
    from pipeline.cli import main

    src, cfg, _ = heldout_dir
    capsys.readouterr()
    assert main(["simulate", "--config", str(cfg), "--sources", str(src), "--split", "TEST", "--n", "2",
                 "--out", str(tmp_path / "o"), "--fine-factor", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--fine-factor" in err and ">= 2" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
