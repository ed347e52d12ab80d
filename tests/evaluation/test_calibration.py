"""Calibration (:mod:`pipeline.evaluation.calibration`) and the calibrate command end to end on an exact
linear-Gaussian image problem (injected loader)."""

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.cli import main
from pipeline.evaluation.calibration import run_calibration
from pipeline.io.posterior import write_posterior
from pipeline.metrics.chi2 import data_snr
from pipeline.metrics.coverage import interval_coverage

from tests.evaluation.image_problem import ImageProblem

NS, NI = 6, 8  # source and image sizes (pixels)
MU = 0.3  # prior mean of every source pixel


def _world(tmp_path, n_obs=40, n_s=48, seed=0, peak_snr=False):
    rng = np.random.default_rng(seed)
    d, m = NS * NS, NI * NI
    yy, xx = np.mgrid[:NS, :NS]
    dist2 = (yy.ravel()[:, None] - yy.ravel()) ** 2 + (xx.ravel()[:, None] - xx.ravel()) ** 2
    C = 0.5 * np.exp(-dist2 / 4.0) + 0.05 * np.eye(d)  # smooth GP prior on the source, mean MU
    M = rng.normal(size=(m, d)) * (rng.uniform(size=(m, d)) < 0.2)
    sigma = np.full((NI, NI), 0.3)
    Si = 1 / sigma.ravel() ** 2
    cov = np.linalg.inv(np.linalg.inv(C) + M.T @ (Si[:, None] * M))
    Lp, Lc = np.linalg.cholesky(cov), np.linalg.cholesky(C)
    prior_term = np.linalg.solve(C, np.full(d, MU))  # C^-1 mu: the prior mean's pull on the posterior mean
    obs_dir = tmp_path / "obs"
    obs_dir.mkdir()
    problem = ImageProblem(M, sigma, NS, NI)
    post = {"exact": tmp_path / "post" / "exact", "narrow": tmp_path / "post" / "narrow"}
    for i in range(n_obs):
        truth = (Lc @ rng.normal(size=d)) + MU
        y = M @ truth + sigma.ravel() * rng.normal(size=m)
        name = f"obs-{i:04d}.fits"
        primary = fits.PrimaryHDU()
        if peak_snr:  # descending with i, so the groups are not in file order
            primary.header["PEAKSNR"] = float(100 - i)
        fits.HDUList([primary, fits.ImageHDU(y.reshape(NI, NI).astype(np.float32), name="SCI"),
                      fits.ImageHDU(truth.reshape(NS, NS).astype(np.float32), name="TRUTH")]).writeto(obs_dir / name)
        mean = cov @ (prior_term + M.T @ (Si * y))  # exact posterior mean of N(MU, C) given y
        z = rng.normal(size=(n_s, d))
        for method, width in (("exact", 1.0), ("narrow", 0.5)):
            s = (mean + width * z @ Lp.T).reshape(n_s, NS, NS)
            write_posterior(post[method] / name, s, src_pixscale=0.05, method=method, obs_file=name,
                            logz={"elbo": -10.0 - i, "elbo_se": 0.1, "iw": None} if method == "exact" else None,
                            seconds=0.5, provenance={"seed": i})

    def loader(path):
        from pipeline.io.fits import read_image_hdu
        return problem, torch.from_numpy(read_image_hdu(path, "SCI")), read_image_hdu(path, "TRUTH")

    return obs_dir, post, loader, C, cov


@pytest.mark.slow
def test_calibrate_exact_vs_narrow(tmp_path):
    obs_dir, post, loader, C, cov = _world(tmp_path)
    out = tmp_path / "cal"
    s = run_calibration([str(post["exact"]), str(post["narrow"] / "*.fits")], obs_dir, "prior", out,
                        loader=loader, n_bins=10, n_boot=200, n_null=150, lens_figures=1, seed=3)
    on_disk = json.loads((out / "summary.json").read_text())
    assert json.loads(json.dumps(s)) == on_disk  # the library returns what it wrote
    ex, nr = on_disk["sets"]["prior"]["exact"], on_disk["sets"]["prior"]["narrow"]
    for key in ("tarp_max_dev", "tarp_p_value", "tarp_null_p95", "coverage68", "coverage95", "coverage68_ref",
                "coverage95_ref", "coverage68_footprint", "coverage95_footprint", "coverage68_footprint_ref",
                "coverage95_footprint_ref", "chi2_median", "chi2_arc_median", "truth_chi2_median",
                "truth_chi2_arc_median", "sharpness", "mean_err", "logz", "n_obs", "n_samples", "seconds",
                "n_alpha_bins"):
        assert key in ex and key in nr
    # the bootstrap interval of a maximum is not a valid confidence interval: no longer reported
    assert "tarp_max_dev_ci" not in ex and "tarp_max_dev_ci" not in nr
    assert ex["n_obs"] == 40 and ex["n_samples"] == 48 and ex["n_alpha_bins"] == 10
    assert ex["seconds"] == pytest.approx(20.0)
    assert ex["logz"][0] == {"elbo": -10.0, "elbo_se": 0.1, "iw": None} and nr["logz"][0] is None
    # the level an exact sampler reaches with 48 samples (mid-rank rule): 33/49 and 47/49
    assert ex["coverage68_ref"] == pytest.approx(33 / 49) and ex["coverage95_ref"] == pytest.approx(47 / 49)
    assert ex["coverage68_footprint_ref"] == ex["coverage68_ref"] and nr["coverage95_ref"] == ex["coverage95_ref"]
    pc = ex["tarp"]["pixel_curve"]
    assert len(pc["ref"]) == len(pc["levels"]) and pc["ref"][pc["levels"].index(0.68)] == ex["coverage68_ref"]
    # exact posteriors: calibrated, chi2 ~ 1 (median of chi2_nu with nu=64 sits ~1% below its mean).
    # Coverage tolerances are ~3.2 sd of the coverage over 200 simulated sets of this world (sd 0.014
    # and 0.0063 over all pixels, 0.017 and 0.0079 in the footprint; means within 0.001 of the ref)
    assert ex["tarp_max_dev"] <= ex["tarp_null_p95"] and ex["tarp_p_value"] > 0.05
    assert ex["coverage68"] == pytest.approx(ex["coverage68_ref"], abs=0.045)
    assert ex["coverage95"] == pytest.approx(ex["coverage95_ref"], abs=0.02)
    assert ex["coverage68_footprint"] == pytest.approx(ex["coverage68_footprint_ref"], abs=0.055)
    assert ex["coverage95_footprint"] == pytest.approx(ex["coverage95_footprint_ref"], abs=0.025)
    assert ex["chi2_median"] == pytest.approx(1.0, abs=0.1)
    assert ex["chi2_arc_median"] == pytest.approx(1.0, abs=0.15)
    # the truths' own chi2 under the same operator: the reference the samples' chi2 is read against
    tc = on_disk["truth_chi2"]["prior"]
    assert tc["n_obs"] == 40 and tc["truth_chi2_median"] == ex["truth_chi2_median"] == nr["truth_chi2_median"]
    assert tc["truth_chi2_arc_median"] == ex["truth_chi2_arc_median"]
    assert ex["truth_chi2_median"] == pytest.approx(1.0, abs=0.1)
    assert ex["chi2_median"] == pytest.approx(ex["truth_chi2_median"], abs=0.05)
    # sharpness: RMS posterior std / RMS prior std (the prior std estimated from the 40 truths)
    assert ex["sharpness"] == pytest.approx(np.sqrt(np.trace(cov) / np.trace(C)), rel=0.2)
    assert nr["sharpness"] == pytest.approx(0.5 * ex["sharpness"], rel=0.05)
    # too narrow: under-covers, fails TARP relative to the same null
    assert nr["coverage68"] < 0.5 and nr["coverage95"] < 0.8
    assert nr["tarp_null_p95"] == ex["tarp_null_p95"]  # one shared null per set
    assert nr["tarp_max_dev"] > ex["tarp_max_dev"] and nr["tarp_max_dev"] >= nr["tarp_null_p95"]
    assert nr["tarp_p_value"] <= 0.05
    # coverage's standard error from the spread between observations, and z against the exact level: small
    # for the exact sampler, far below for the narrow one; neither run is a labelled baseline
    for r in (ex, nr):
        assert r["baseline"] is False
        assert all(r[f"coverage{c}{fp}_se"] > 0 for c in (68, 95) for fp in ("", "_footprint"))
    assert all(abs(ex[f"coverage{c}{fp}_z"]) < 3 for c in (68, 95) for fp in ("", "_footprint"))
    assert nr["coverage68_z"] < -10 and nr["coverage95_z"] < -5
    assert ex["coverage68_z"] == pytest.approx((ex["coverage68"] - ex["coverage68_ref"]) / ex["coverage68_se"])
    assert (out / "coverage_prior.png").stat().st_size > 10_000
    assert len(on_disk["figures"]["prior"]["lenses"]["exact"]) == 1
    assert (out / on_disk["figures"]["prior"]["lenses"]["exact"][0]).is_file()
    # a second set merges into the same summary
    run_calibration([str(post["exact"])], obs_dir, "heldout", out, loader=loader, n_bins=10, n_boot=50,
                    n_null=30, lens_figures=0, merge=True)
    both = json.loads((out / "summary.json").read_text())
    assert set(both["sets"]) == {"prior", "heldout"}
    assert both["sets"]["heldout"]["exact"]["sharpness"] is None  # no prior draws given for heldout


def test_calibrate_cli_errors(tmp_path, capsys):
    rc = main(["calibrate", "--posteriors", str(tmp_path / "none"), "--observations", str(tmp_path),
               "--set", "prior", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--posteriors" in err[0] and "none" in err[0]
    rc = main(["calibrate", "--posteriors", str(tmp_path), "--observations", str(tmp_path / "missing"),
               "--set", "prior", "--out", str(tmp_path / "out")])
    assert rc == 2 and "--observations" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_calibrate_then_report(tmp_path):
    obs_dir, post, loader, C, cov = _world(tmp_path, n_obs=20, n_s=24, seed=1)
    for set_name in ("prior", "heldout"):
        run_calibration([str(post["exact"]), str(post["narrow"])], obs_dir, set_name, tmp_path / "cal" / set_name,
                        loader=loader, n_bins=5, n_boot=50, n_null=40, lens_figures=1)
    rep = tmp_path / "results" / "report.md"
    rc = main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(rep),
               "--html", str(tmp_path / "results" / "report.html")])
    assert rc == 0
    text = rep.read_text()
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]  # the main table (other sections have rows too)
    table = [l for l in results.splitlines() if l.startswith("| prior") or l.startswith("| heldout")]
    assert len(table) == 4
    assert "20 observations, 24 posterior samples" in text and "5 fixed alpha bins" in text
    assert "conditional on the given lens model" in text
    imgs = [l[l.index("(") + 1:-1] for l in text.splitlines() if l.startswith("![")]
    assert len(imgs) == 2 + 4  # two coverage figures, one lens figure per method and set
    for rel in imgs:
        assert (rep.parent / rel).is_file()
    html = (tmp_path / "results" / "report.html").read_text()
    assert html.count("<img") == 6 and "<table>" in html


def test_no_truth_is_refused(tmp_path):
    from pipeline.errors import PipelineError

    obs_dir = tmp_path / "obs"
    obs_dir.mkdir()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((NI, NI), np.float32), name="SCI")]).writeto(
        obs_dir / "user.fits")
    write_posterior(tmp_path / "post" / "user.fits", np.zeros((4, NS, NS)), src_pixscale=0.05, method="rtb",
                    obs_file="user.fits")
    with pytest.raises(PipelineError, match="nothing to calibrate"):
        run_calibration([str(tmp_path / "post")], obs_dir, "heldout", tmp_path / "cal",
                        loader=lambda p: (None, None, None))
    assert not (tmp_path / "cal").exists()


def test_per_observation_fields_come_from_the_samples_not_the_files_moments(tmp_path):
    # a particle method's file: MEAN/STD are weighted moments of all its particles, here far from the
    # moments of the equally weighted SAMPLES (which are what coverage and TARP use)
    from pipeline.io.fits import read_image_hdu
    from pipeline.io.posterior import read_posterior

    obs_dir, post, loader, C, cov = _world(tmp_path, n_obs=6, n_s=8, seed=2)
    part_dir = tmp_path / "post" / "particles"
    samples, truths = [], []
    for f in sorted(post["exact"].glob("*.fits")):
        d = read_posterior(f)
        s = d["samples"]
        particles = np.concatenate([s, 2.0 * s + 1.0])
        weights = np.r_[np.full(len(s), 0.1), np.full(len(s), 1.0)]
        write_posterior(part_dir / f.name, s, particles=particles, weights=weights, src_pixscale=0.05,
                        method="particles", obs_file=f.name)
        p = read_posterior(part_dir / f.name)
        assert np.abs(p["mean"] - s.mean(0)).max() > 0.5 and np.abs(p["std"] / s.std(0) - 1).max() > 0.5
        samples.append(s.astype(np.float64))
        truths.append(read_image_hdu(obs_dir / f.name, "TRUTH").astype(np.float64))
    samples, truths = np.stack(samples), np.stack(truths)
    out = run_calibration([str(part_dir)], obs_dir, "prior", tmp_path / "cal", loader=loader, n_bins=5,
                          n_boot=20, n_null=20, lens_figures=0)
    r = out["sets"]["prior"]["particles"]
    err = np.sqrt(((samples.mean(1) - truths) ** 2).reshape(6, -1).mean(1))
    prior_std = truths.std(0, ddof=1)  # the prior set's default sharpness denominator: its truths
    sh = np.sqrt((samples.std(1, ddof=1) ** 2).reshape(6, -1).mean(1) / np.mean(prior_std ** 2))
    np.testing.assert_allclose(r["per_obs"]["mean_err"], err, rtol=1e-5)
    assert r["mean_err"] == pytest.approx(err.mean(), rel=1e-5)
    np.testing.assert_allclose(r["per_obs"]["sharpness"], sh, rtol=1e-5)
    assert r["sharpness"] == pytest.approx(np.median(sh), rel=1e-5)
    # each observation's own coverage; pooled (equal pixel counts) they give the set's
    for key, level in (("coverage68", 0.68), ("coverage95", 0.95)):
        own = [interval_coverage(samples[i:i + 1], truths[i:i + 1], levels=(level,))[level] for i in range(6)]
        np.testing.assert_allclose(r["per_obs"][key], own, atol=1e-12)
        assert np.mean(r["per_obs"][key]) == pytest.approx(r[key], abs=1e-12)


@pytest.mark.slow
def test_footprint_coverage_of_exact_samples_is_not_biased_low(tmp_path):
    # exact Gaussian posteriors N(m, 0.15^2) per pixel around blob-shaped means, 32 samples, 80
    # observations (no operator: coverage only). The footprint must not be chosen by the truth alone
    # (that gives ~0.61 at the 68 % level here instead of the exact sampler's 23/33 = 0.697)
    rng = np.random.default_rng(9)
    n_obs, n, N = 80, 32, 16
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    obs_dir, post_dir = tmp_path / "obs", tmp_path / "post" / "exact"
    obs_dir.mkdir()
    for i in range(n_obs):
        cx, cy = rng.normal(0, 2, 2)
        m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(1.5, 3.0) ** 2))
        truth = m + 0.15 * rng.normal(size=m.shape)
        name = f"obs-{i:04d}.fits"
        fits.HDUList([fits.PrimaryHDU()]).writeto(obs_dir / name)
        write_posterior(post_dir / name, m + 0.15 * rng.normal(size=(n, N, N)), truth=truth, src_pixscale=0.05,
                        method="exact", obs_file=name)
    s = run_calibration([str(post_dir)], obs_dir, "heldout", tmp_path / "cal", loader=lambda p: (None, None, None),
                        n_bins=5, n_boot=10, n_null=20, lens_figures=0)
    r = s["sets"]["heldout"]["exact"]
    # ~6,000 (observation, pixel) pairs: binomial sd ~0.006 (68 %) and ~0.003 (95 %); tolerances ~3.3 sd
    assert r["coverage68_footprint"] == pytest.approx(23 / 33, abs=0.02)
    assert r["coverage95_footprint"] == pytest.approx(31 / 33, abs=0.01)
    assert 4_000 < r["footprint_pixels"] < 9_000
    assert r["coverage68_footprint_ref"] == pytest.approx(23 / 33)
    assert r["coverage95_footprint_ref"] == pytest.approx(31 / 33)
    assert r["truth_chi2_median"] is None and s["truth_chi2"]["heldout"]["n_obs"] == 0  # no operator given


def test_a_methods_figures_do_not_depend_on_the_other_methods_evaluated(tmp_path):
    # each method draws its TARP reference points from its own seeded stream: adding another method that
    # sorts before it ("a_narrow" before "exact") leaves "exact"'s figures as they were
    obs_dir, post, loader, _, _ = _world(tmp_path, n_obs=10, n_s=8)
    other = tmp_path / "post" / "a_narrow"
    other.mkdir()
    for f in sorted(post["narrow"].glob("*.fits")):
        with fits.open(f) as h:
            h[0].header["METHOD"] = "a_narrow"
            h.writeto(other / f.name, checksum=True)
    kw = dict(loader=loader, n_bins=10, n_boot=20, n_null=50, lens_figures=0, seed=3)
    both = run_calibration([str(other), str(post["exact"])], obs_dir, "prior", tmp_path / "a", **kw)
    alone = run_calibration([str(post["exact"])], obs_dir, "prior", tmp_path / "b", **kw)
    a, b = both["sets"]["prior"]["exact"], alone["sets"]["prior"]["exact"]
    assert set(both["sets"]["prior"]) == {"a_narrow", "exact"}
    for key in ("tarp_max_dev", "tarp_p_value", "tarp_null_p95", "tarp", "coverage68", "coverage95"):
        assert a[key] == b[key], key


def test_snr_quartiles_come_from_the_data_in_the_summary_and_the_report(tmp_path):
    """Each method's summary splits the set into quartiles of the data's SNR (means of the per-observation
    coverages) and the report shows them. The observations' PEAKSNR (a property of the truth, here a
    decoy descending with the file index) is not what groups them: a grouping by the truth biases even
    exact samples (tests/evaluation/test_groups.py)."""
    obs_dir, post, loader, C, cov = _world(tmp_path, n_obs=20, n_s=24, seed=3, peak_snr=True)
    out = run_calibration([str(post["exact"]), str(post["narrow"])], obs_dir, "prior", tmp_path / "cal" / "prior",
                          loader=loader, n_bins=5, n_boot=20, n_null=20, lens_figures=0)
    snr = {}
    for f in sorted(obs_dir.glob("*.fits")):
        problem, y, _ = loader(f)
        snr[f.name] = data_snr(problem, y)
    for method in ("exact", "narrow"):
        r = out["sets"]["prior"][method]
        assert "per_snr" not in r
        groups = r["per_data_snr"]
        assert [g["n_obs"] for g in groups] == [5, 5, 5, 5]
        names = r["observations"]
        ordered = sorted(names, key=lambda n: snr[n])
        for g, members in zip(groups, [ordered[i:i + 5] for i in range(0, 20, 5)]):
            assert (g["snr_min"], g["snr_max"]) == pytest.approx((snr[members[0]], snr[members[-1]]), rel=1e-12)
            want = np.mean([r["per_obs"]["coverage68"][names.index(n)] for n in members])
            assert g["coverage68"] == pytest.approx(want, abs=1e-12)
    ex, na = out["sets"]["prior"]["exact"], out["sets"]["prior"]["narrow"]
    for g_ex, g_na in zip(ex["per_data_snr"], na["per_data_snr"]):
        assert g_na["coverage68"] < g_ex["coverage68"] - 0.1  # half-width samples cover far less
    rep = tmp_path / "report.md"
    assert main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(rep)]) == 0
    text = rep.read_text()
    section = text.split("## By signal-to-noise of the data", 1)[1].split("\n## ", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("| prior")]
    lo, hi = groups[0]["snr_min"], groups[0]["snr_max"]
    assert len(rows) == 8 and f"{lo:.1f}-{hi:.1f}" in rows[0]
    (tmp_path / "plain").mkdir()
    obs_plain, post_plain, loader_plain, _, _ = _world(tmp_path / "plain", n_obs=8, n_s=8, seed=4)
    no_operator = lambda path: (None, None, loader_plain(path)[2])  # noqa: E731 (truths only: no data SNR)
    plain = run_calibration([str(post_plain["exact"])], obs_plain, "prior", tmp_path / "plain" / "cal",
                            loader=no_operator, n_bins=5, n_boot=20, n_null=20, lens_figures=0)
    assert "per_data_snr" not in plain["sets"]["prior"]["exact"]
