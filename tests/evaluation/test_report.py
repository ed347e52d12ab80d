"""Report: TARP sentence, acceptance checks, formatting, the results page and errors on hand-made
summaries."""

import json

from pipeline.cli import main
import pytest

from pipeline.evaluation.acceptance import acceptance, coverage_threshold, heldout_acceptance, paired_difference
from pipeline.evaluation.report import coverage_cell, logz_summary, tarp_sentence


def _r(dev, ci, chi=1.0, arc=1.0, p95=0.2):
    return {"tarp_max_dev": dev, "tarp_max_dev_ci": ci, "tarp_null_p95": p95, "chi2_median": chi,
            "chi2_arc_median": arc, "n_obs": 30, "n_samples": 16, "n_alpha_bins": 10, "logz": None}


def test_tarp_sentence_never_ranks_methods():
    # overlapping or disjoint bootstrap intervals of a maximum are no comparison: the report only says
    # which methods are inside their exact-sampler null
    sentence = tarp_sentence({"a": _r(0.1, None), "b": _r(0.15, None), "c": _r(0.5, None)})
    assert "inside the exact-sampler null's 95th percentile: `a`, `b`" in sentence
    assert "outside it: `c`" in sentence and "not ranked" in sentence
    assert "<" not in sentence


def test_coverage_cell_shows_the_exact_sampler_level():
    r = {"coverage68": 0.761, "coverage68_ref": 23 / 33, "coverage68_footprint": 0.7}
    assert coverage_cell(r, "coverage68") == "0.761 (0.697)"
    # the footprint falls back to the all-pixel reference (same n, same rank rule)
    assert coverage_cell(r, "coverage68_footprint") == "0.700 (0.697)"
    assert coverage_cell({"coverage95": 0.9}, "coverage95") == "0.900"


def test_acceptance_and_logz():
    assert acceptance(_r(0.1, [0, 0.2])) == {"tarp": True, "chi2": True, "coverage": None}
    assert acceptance(_r(0.3, [0, 0.4], chi=1.3)) == {"tarp": False, "chi2": False, "coverage": None}
    # coverage within Student's t (99 %, n_obs - 1 = 29 degrees of freedom: 2.756) standard errors
    cov = {"coverage68_ref": 0.7, "coverage95_ref": 0.94, "coverage68_se": 0.01, "coverage95_se": 0.01}
    ok = {**_r(0.1, None), **cov, "coverage68": 0.7 + 0.0275, "coverage95": 0.94 - 0.0275}
    assert acceptance(ok)["coverage"] is True
    assert acceptance({**ok, "coverage95": 0.94 - 0.0276})["coverage"] is False
    # a zero se (every observation covered alike: samples all equal, or absurdly wide) fails off the level
    assert acceptance({**ok, "coverage68": 1.0, "coverage68_se": 0.0})["coverage"] is False
    assert acceptance({**ok, "coverage68": 0.7, "coverage68_se": 0.0})["coverage"] is True
    assert acceptance({**ok, "coverage68_se": None})["coverage"] is None
    assert coverage_threshold(64) == pytest.approx(2.656, abs=1e-3)
    assert coverage_threshold(16) == pytest.approx(2.947, abs=1e-3)
    assert acceptance(_r(0.1, [0, 0.2], arc=None))["chi2"] is False
    assert logz_summary(None) == "n/a" and logz_summary([None, None]) == "n/a"
    assert logz_summary([{"elbo": -3.0}, {"elbo": -1.0}, None]) == "-2.0 (2/3)"


def test_report_errors(tmp_path, capsys):
    assert main(["report", "--calibration", str(tmp_path / "nope"), "--out", str(tmp_path / "r.md")]) == 2
    assert "--calibration" in capsys.readouterr().err
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "summary.json").write_text("{not json")
    assert main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.json" in err[0]
    (tmp_path / "cal" / "summary.json").write_text(json.dumps({"sets": {"prior": {"m": _r(0.1, [0.0, 0.2])}}}))
    assert main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "r.md"),
                 "--figures", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err and not (tmp_path / "r.md").exists()
    assert main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "| prior | m | 30 | 16 | 0.100 | n/a | 0.200 | yes |" in text
    assert "[0.000, 0.200]" not in text  # no bootstrap interval of the maximum


def test_results_page_names_its_origin_and_copies_assets(tmp_path):
    cal = tmp_path / "results" / "calibration"
    (cal / "prior").mkdir(parents=True)
    png = cal / "prior" / "coverage_prior.png"
    png.write_bytes(b"\x89PNG fake")
    r = {**_r(0.1, None), "coverage68": 0.7, "coverage68_ref": 23 / 33, "truth_chi2_median": 1.02,
         "truth_chi2_arc_median": 1.05, "tarp_p_value": 0.4}
    (cal / "prior" / "summary.json").write_text(json.dumps(
        {"sets": {"prior": {"m": r}}, "figures": {"prior": {"coverage": "coverage_prior.png", "lenses": {}}}}))
    page = tmp_path / "docs" / "results" / "lensing.md"
    assert main(["report", "--calibration", str(cal), "--out", str(page), "--results-page",
                 "--command", "make demo"]) == 0
    text = page.read_text()
    assert "Made by `make demo` at commit" in text
    assert "`lensing/summary_prior.json`" in text and (page.parent / "lensing" / "summary_prior.json").is_file()
    assert "](lensing/coverage_prior.png)" in text and (page.parent / "lensing" / "coverage_prior.png").is_file()
    assert "0.700 (0.697)" in text and "**1.020** over the image, **1.050** in the arc" in text
    assert "results/calibration" not in text.split("generated")[1]  # links point at the copies
    # the worked example of the exact-sampler level uses the summaries' own number of samples (16 here)
    assert "for 16 samples 11/17 = 0.647 and 17/17 = 1.000" in text and "23/33" not in text


def test_heldout_acceptance_bands_scale_with_the_truths_chi2_and_rms_beats_baselines():
    r = {**_r(0.1, None, chi=1.5, arc=2.0), "truth_chi2_median": 1.2, "truth_chi2_arc_median": 1.9,
         "mean_err": 10.0}
    # 1.5 <= max(1.3, 1.1 x 1.2 = 1.32)? no
    assert heldout_acceptance(r, {})["chi2"] is False
    r["truth_chi2_median"] = 1.4  # max(1.3, 1.54); arc: max(1.3, 2.09)
    a = heldout_acceptance(r, {})
    assert a == {"chi2": True, "tarp": True, "rms": None}
    assert heldout_acceptance({**r, "chi2_median": 1.2, "truth_chi2_median": None}, {})["chi2"] is True
    assert heldout_acceptance({**r, "chi2_median": 0.7}, {})["chi2"] is False
    assert heldout_acceptance(r, {"v1": {"mean_err": 12.0}})["rms"] is True
    assert heldout_acceptance(r, {"v1": {"mean_err": 12.0}, "v0": {"mean_err": 9.0}})["rms"] is False
    a = {"observations": ["o1", "o2", "o3"], "per_obs": {"mean_err": [1.0, 2.0, 4.0]}}
    b = {"observations": ["o3", "o1", "o9"], "per_obs": {"mean_err": [5.0, 3.0, 0.0]}}
    mean, se, n = paired_difference(a, b)  # o1: 1 - 3, o3: 4 - 5
    assert (mean, n) == (-1.5, 2) and se == pytest.approx(0.5)
    assert paired_difference(a, {"observations": ["o1"], "per_obs": {"mean_err": [1.0]}}) is None


def test_report_has_heldout_acceptance_without_judging_baselines(tmp_path):
    base = {**_r(0.1, None), "truth_chi2_median": 1.0, "truth_chi2_arc_median": 1.0}
    cov = {"coverage68": 0.705, "coverage68_ref": 0.7, "coverage68_se": 0.01, "coverage68_z": 0.5,
           "coverage95": 0.97, "coverage95_ref": 0.94, "coverage95_se": 0.01, "coverage95_z": 3.0}
    sets = {"prior": {"m": {**base, **cov}, "v1": {**base, "baseline": True}},
            "heldout": {"m": {**base, "mean_err": 5.0, "observations": ["a", "b"], "per_obs": {"mean_err": [4, 6]}},
                        "v1": {**base, "mean_err": 6.0, "baseline": True, "observations": ["a", "b"],
                               "per_obs": {"mean_err": [5, 7]}}}}
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "summary.json").write_text(json.dumps({"sets": sets}))
    assert main(["report", "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    prior = text.split("## Acceptance on the prior-drawn set")[1].split("##")[0]
    assert "2.76 standard errors of the exact-sampler level: **no** (z = 0.50 / 3.00" in prior
    assert "`v1`:" not in prior  # baselines are compared with, not judged
    held = text.split("## Acceptance on the held-out set")[1].split("##")[0]
    assert "`m`:" in held and "`v1`:" not in held
    assert "below the baselines' (v1 6.000; paired difference -1 +- 0 over 2): **yes**" in held
