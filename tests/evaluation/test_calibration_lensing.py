"""calibrate on real lensing observation files (caustics operator, load_observation): exact Gaussian
posteriors under the file's own forward model give chi2_nu ~ 1 and nominal coverage, which checks the
units chain (physical-unit samples, flux-per-pixel SCI) end to end."""

import json

import numpy as np
import pytest
import yaml
from astropy.io import fits

pytest.importorskip("caustics")
from pipeline.evaluation.calibration import run_calibration  # noqa: E402
from pipeline.io.posterior import read_posterior, write_posterior  # noqa: E402
from pipeline.lensing.config import GeometryConfig, LensConfig, NoiseConfig  # noqa: E402
from pipeline.lensing.simulate import draw_lens, make_problem, simulate_observation, write_observation  # noqa: E402

GEOM = dict(image_npix=12, image_pixscale=0.15, source_npix=10, source_pixscale=0.12, supersample=1,
            psf_fwhm=0.15, psf_npix=5)


@pytest.mark.slow
def test_calibrate_lensing_files_exact_gaussian(tmp_path):
    rng = np.random.default_rng(7)
    geom = GeometryConfig(**GEOM)
    n = geom.source_npix
    yy, xx = (np.mgrid[:n, :n] - (n - 1) / 2) * geom.source_pixscale
    mu = 2.0 * np.exp(-(xx ** 2 + yy ** 2) / (2 * 0.25 ** 2)).ravel()  # mean source [SB units]
    r2 = (yy.ravel()[:, None] - yy.ravel()) ** 2 + (xx.ravel()[:, None] - xx.ravel()) ** 2
    C = 0.5 * np.exp(-r2 / (2 * 0.2 ** 2)) + 1e-3 * np.eye(n * n)
    Lc = np.linalg.cholesky(C)
    sigma = 0.004  # SCI units (flux per pixel): peak SNR of order 10-30 here
    obs_dir, post_dir = tmp_path / "obs", tmp_path / "post" / "exact"
    obs_dir.mkdir()
    n_obs, n_s = 12, 64
    ratios = []
    for i in range(n_obs):
        lens = draw_lens(LensConfig(), rng)
        prob = make_problem(lens, geom, sigma)
        truth = (mu + Lc @ rng.normal(size=n * n)).reshape(n, n)
        obs = simulate_observation(truth, lens, geom, NoiseConfig(sigma=sigma), rng, problem=prob)
        name = f"obs-{i:04d}.fits"
        write_observation(obs_dir / name, obs)
        M = prob.dense_matrix().numpy()  # physical source -> SCI (brightness scale 1, offset 0)
        y = obs.sci.astype(np.float64).ravel()
        Si = 1.0 / sigma ** 2
        cov = np.linalg.inv(np.linalg.inv(C) + Si * M.T @ M)
        mean = cov @ (np.linalg.solve(C, mu) + Si * M.T @ y)
        s = mean + rng.normal(size=(n_s, n * n)) @ np.linalg.cholesky(cov).T
        # lens samples as an exact sampler would give them: the truth is one more draw of N(m, sd^2)
        lens_true = np.array([lens.rein, lens.q, lens.g1])
        lens_sd = np.array([0.01, 0.02, 0.005])
        lens_mean = lens_true + lens_sd * rng.normal(size=3)
        write_posterior(post_dir / name, s.reshape(n_s, n, n), truth=truth, src_pixscale=geom.source_pixscale,
                        method="exact", obs_file=name, seconds=1.0,
                        lens_samples=lens_mean + lens_sd * rng.normal(size=(n_s, 3)), lens_names=["rein", "q", "g1"])
        ratios.append(np.trace(cov) / np.trace(C))
    prior_fits = tmp_path / "prior.fits"
    prior_draws = (mu + rng.normal(size=(2000, n * n)) @ Lc.T).reshape(-1, n, n).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(prior_draws, name="SAMPLES")]).writeto(prior_fits)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"lensing": {"geometry": GEOM}}))
    out = tmp_path / "cal"
    run_calibration([str(post_dir)], obs_dir, "prior", out, config=str(cfg), prior_samples=str(prior_fits),
                    n_bins=5, n_boot=100, n_null=50, lens_figures=1)
    r = json.loads((out / "summary.json").read_text())["sets"]["prior"]["exact"]
    # nu = 144 image pixels: chi2_nu of exact posterior samples has mean 1 and sd 0.12 per sample
    assert r["chi2_median"] == pytest.approx(1.0, abs=0.08)
    assert r["chi2_arc_median"] == pytest.approx(1.0, abs=0.2)
    # against the level an exact sampler reaches with 64 samples (45/65 and 61/65)
    assert r["coverage68_ref"] == pytest.approx(45 / 65) and r["coverage95_ref"] == pytest.approx(61 / 65)
    assert r["coverage68"] == pytest.approx(r["coverage68_ref"], abs=0.06)
    assert r["coverage95"] == pytest.approx(r["coverage95_ref"], abs=0.04)
    # the truths' own chi2 under the file's forward model: same law as the exact samples'
    assert r["truth_chi2_median"] == pytest.approx(1.0, abs=0.15)
    assert r["chi2_median"] == pytest.approx(r["truth_chi2_median"], abs=0.15)
    assert r["sharpness"] == pytest.approx(np.median(np.sqrt(ratios)), rel=0.1)
    assert r["prior_std_source"] == str(prior_fits)
    # the lens parameters against each observation's true lens keywords, at the exact sampler's levels
    lc = r["lens"]
    assert (lc["n_obs"], lc["n_samples"]) == (n_obs, n_s) and list(lc["parameters"]) == ["rein", "q", "g1"]
    for p in lc["parameters"].values():
        assert p["band"]["0.68"][1] == pytest.approx(45 / 65)
        assert p["band"]["0.68"][0] <= p["coverage"]["0.68"] <= p["band"]["0.68"][2]
        assert abs(p["bias"]) <= p["bias_band"]
    png = out / json.loads((out / "summary.json").read_text())["figures"]["prior"]["lenses"]["exact"][0]
    assert png.stat().st_size > 10_000
    # samples 30 % too bright (e.g. a brightness map applied twice) are caught by chi2
    bad_dir = tmp_path / "post" / "scaled"
    for f in sorted(post_dir.glob("*.fits")):
        d = read_posterior(f)
        write_posterior(bad_dir / f.name, 1.3 * d["samples"], truth=d["truth"], src_pixscale=d["src_pixscale"],
                        method="scaled", obs_file=d["obs_file"])
    run_calibration([str(bad_dir)], obs_dir, "prior", tmp_path / "cal2", config=str(cfg), n_bins=5, n_boot=20,
                    n_null=20, lens_figures=0)
    r2 = json.loads((tmp_path / "cal2" / "summary.json").read_text())["sets"]["prior"]["scaled"]
    assert r2["chi2_median"] > 2.0


@pytest.mark.slow
def test_sample_writes_prior_is_log_z(tmp_path, blob_fits):
    # prior_is computes log Z over all its prior-chain proposals; `sample` must write it to the FITS
    import torch
    from conftest import TINY_PRIOR

    from pipeline.cli import main
    from pipeline.diffusion.schedule import load_chain
    from pipeline.diffusion.network_prior import load_prior
    from pipeline.lensing.config import BrightnessConfig, load_lensing_config
    from pipeline.lensing.observation import load_observation
    from pipeline.lensing.sample import sample_observations
    from pipeline.samplers import make_sampler

    geom = {**GEOM, "source_npix": 16}  # the tiny prior's 16 x 16 images
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "prior": TINY_PRIOR, "chain": {"K": 5},
                                   "lensing": {"geometry": geom}, "posterior": {"particles": 3}}))
    run = tmp_path / "run"
    assert main(["train-prior", "--config", str(cfg), "--data", str(blob_fits), "--out", str(run)]) == 0
    rng = np.random.default_rng(3)
    g = GeometryConfig(**geom)
    lens = draw_lens(LensConfig(), rng)
    truth = 2.0 * np.exp(-((np.mgrid[:16, :16] - 7.5) ** 2).sum(0) / 8.0)
    obs = simulate_observation(truth, lens, g, NoiseConfig(sigma=0.01), rng, problem=make_problem(lens, g, 0.01))
    write_observation(tmp_path / "obs" / "o.fits", obs)
    res = sample_observations(str(cfg), "prior_is", run, None, [str(tmp_path / "obs" / "o.fits")],
                              tmp_path / "post", n=4, seed=5)
    d = read_posterior(res[0]["out"])
    assert d["logz_available"] and np.isfinite(d["logz"]["iw"]) and np.isfinite(d["logz"]["elbo"])
    assert d["logz"]["iw"] >= d["logz"]["elbo"]  # logmeanexp >= mean over the same proposals
    assert res[0]["logz"]["iw"] == d["logz"]["iw"]
    # the same number as the sampler's own estimate with the same generator (seed * 100003 + index)
    prior = load_prior(run)
    chain = load_chain(str(cfg), prior)
    problem, y, _ = load_observation(tmp_path / "obs" / "o.fits", load_lensing_config(str(cfg)),
                                     brightness=BrightnessConfig(scale=prior.scale, offset=prior.offset))
    smp = make_sampler("prior_is", prior, chain, particles=3, device="cpu").sample(
        problem, y, 4, generator=torch.Generator().manual_seed(5 * 100003))
    assert d["logz"]["iw"] == pytest.approx(smp.info["logz_iw"], rel=1e-9, abs=1e-9)
    assert d["logz"]["elbo"] == pytest.approx(smp.info["prior_elbo"], rel=1e-9, abs=1e-9)
