"""The steps of a calibration and of the report on hand-made records and summaries: sample counts,
the prior std, the summary file (merge, NaN), figure selection, and the HTML report's image links."""

import json
import logging

import numpy as np
import pytest

from pipeline.errors import InputFileError
from pipeline.evaluation.calibration import equalise_sample_counts, prior_std_for, write_summary
from pipeline.evaluation.records import figure_pairs
from pipeline.evaluation.report import write_report


def _rec(obs, n_s, seed=0, truth=None):
    rng = np.random.default_rng(seed)
    return {"obs": obs, "samples": rng.normal(size=(n_s, 3, 3)).astype(np.float32), "file": f"post/{obs}",
            "truth": truth if truth is not None else rng.normal(size=(3, 3)).astype(np.float32)}


def test_sample_counts_are_cut_to_the_smallest_and_sorted(caplog):
    recs = [_rec("obs-0002.fits", 5), _rec("obs-0001.fits", 3), _rec("obs-0003.fits", 4)]
    first = recs[0]["samples"].copy()
    with caplog.at_level(logging.WARNING):
        assert equalise_sample_counts("m", recs) == 3
    assert [r["obs"] for r in recs] == ["obs-0001.fits", "obs-0002.fits", "obs-0003.fits"]
    assert all(r["samples"].shape == (3, 3, 3) for r in recs)
    np.testing.assert_array_equal(recs[1]["samples"], first[:3])  # the first samples are kept
    assert "sample counts differ" in caplog.text


def test_one_sample_is_refused_naming_the_file():
    with pytest.raises(InputFileError, match=r"post/obs-0001.fits \[SAMPLES\]: needs at least 2 samples"):
        equalise_sample_counts("m", [_rec("obs-0000.fits", 4), _rec("obs-0001.fits", 1)])


def test_prior_std_from_the_prior_sets_distinct_truths():
    t = [np.full((3, 3), v, np.float32) for v in (0.0, 1.0, 2.0)]
    # the same observation under two methods counts once: truths 0, 1, 2 -> std 1 (ddof 1)
    by_method = {"a": [_rec("o0", 2, truth=t[0]), _rec("o1", 2, truth=t[1])],
                 "b": [_rec("o1", 2, truth=t[1]), _rec("o2", 2, truth=t[2])]}
    std, source = prior_std_for(by_method, "prior")
    np.testing.assert_allclose(std, np.ones((3, 3)), rtol=1e-12)
    assert source == "truths of the prior set"
    assert prior_std_for(by_method, "heldout") == (None, None)


def test_summary_merges_sets_writes_null_for_nan_and_names_a_broken_file(tmp_path):
    path = tmp_path / "summary.json"
    common = dict(truth_chi2={"n_obs": 0}, figures={"coverage": "c.png", "lenses": {}}, settings={"seed": 0})
    write_summary(path, "prior", results={"m": {"chi2_median": float("nan")}}, merge=False, **common)
    write_summary(path, "heldout", results={"m": {"chi2_median": 1.5}}, merge=True, **common)
    data = json.loads(path.read_text())
    assert list(data) == ["sets", "figures", "settings", "truth_chi2"]
    assert data["sets"] == {"prior": {"m": {"chi2_median": None}}, "heldout": {"m": {"chi2_median": 1.5}}}
    write_summary(path, "heldout", results={"m": {}}, merge=False, **common)
    assert set(json.loads(path.read_text())["sets"]) == {"heldout"}  # without merge the file is replaced
    path.write_text("{broken")
    with pytest.raises(InputFileError, match="summary.json: existing summary is not valid JSON"):
        write_summary(path, "prior", results={}, merge=True, **common)


def test_figure_pairs_take_the_first_observations_by_name():
    by_method = {"a": [_rec("obs-2", 2), _rec("obs-0", 2), _rec("obs-1", 2)], "b": [_rec("obs-5", 2)]}
    assert figure_pairs(by_method, 2) == {("a", "obs-0"), ("a", "obs-1"), ("b", "obs-5")}
    assert figure_pairs(by_method, 0) == set() and figure_pairs(by_method, -1) == set()


def test_html_report_in_another_directory_links_images_from_there(tmp_path):
    cal = tmp_path / "cal" / "prior"
    cal.mkdir(parents=True)
    (cal / "coverage_prior.png").write_bytes(b"\x89PNG fake")
    r = {"n_obs": 3, "n_samples": 4, "n_alpha_bins": 5, "tarp_max_dev": 0.1, "tarp_null_p95": 0.2}
    (cal / "summary.json").write_text(json.dumps(
        {"sets": {"prior": {"m": r}}, "figures": {"prior": {"coverage": "coverage_prior.png", "lenses": {}}}}))
    md, html = tmp_path / "out" / "report.md", tmp_path / "www" / "sub" / "report.html"
    write_report(tmp_path / "cal", md, title="T", html_path=html)
    assert "![coverage prior](../cal/prior/coverage_prior.png)" in md.read_text()
    page = html.read_text()
    assert "<img src='../../cal/prior/coverage_prior.png'" in page and "<title>T</title>" in page
    assert "<td>prior</td><td>m</td><td>3</td><td>4</td><td>0.100</td>" in page
