"""Provenance on results pages (:mod:`pipeline.evaluation.results_page`): calibrate stamps its summary with
the commit and machine it ran on, and a page rendered elsewhere names them."""

import json
from pathlib import Path

import pytest

import pipeline.commands.calibrate as calibrate_cmd
from pipeline.cli import main
from pipeline.errors import InputFileError
from pipeline.evaluation import results_page
from pipeline.evaluation.results_page import calibration_origin, stamp_provenance


def _summary(path, set_name="prior"):
    r = {"tarp_max_dev": 0.1, "tarp_null_p95": 0.2, "chi2_median": 1.0, "chi2_arc_median": 1.0, "n_obs": 4,
         "n_samples": 8, "n_alpha_bins": 10, "logz": None, "coverage68": 0.7, "sharpness": None}
    data = {"sets": {set_name: {"m": r}}, "figures": {}, "settings": {set_name: {"seed": 0, "n_null": 40}},
            "truth_chi2": {set_name: {"median": 1.0}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def test_stamp_provenance_adds_commit_and_machine_and_keeps_the_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(results_page, "git_commit", lambda repo_dir=".": "abc1234")
    monkeypatch.setattr(results_page, "machine_description", lambda: "Test CPU, 2 cores, Linux, Python 3.11")
    f = tmp_path / "cal" / "prior" / "summary.json"
    before = _summary(f)
    stamp_provenance(f, "prior")
    after = json.loads(f.read_text())
    rec = after["settings"]["prior"].pop("provenance")
    assert after == before  # every figure and setting as it was
    assert rec["command"] == "calibrate" and rec["commit"] == "abc1234"
    assert rec["machine"] == "Test CPU, 2 cores, Linux, Python 3.11" and len(rec["date"]) == 10


def test_stamp_provenance_refuses_a_missing_summary(tmp_path):
    with pytest.raises(InputFileError, match="summary.json"):
        stamp_provenance(tmp_path / "summary.json", "prior")


def test_the_calibrate_command_stamps_its_summary(tmp_path, monkeypatch):
    out = tmp_path / "cal" / "heldout"

    def fake_run_calibration(posteriors, observations, set_name, out_dir, **kw):
        _summary(Path(out_dir) / "summary.json", set_name)

    monkeypatch.setattr(calibrate_cmd, "run_calibration", fake_run_calibration)
    assert main(["calibrate", "--posteriors", "p", "--observations", "o", "--set", "heldout",
                 "--out", str(out)]) == 0
    rec = json.loads((out / "summary.json").read_text())["settings"]["heldout"]["provenance"]
    assert rec["command"] == "calibrate" and rec["commit"] and "cores" in rec["machine"]


def test_calibration_origin_names_other_commits_and_unrecorded_sets():
    here = ("abc1234", "CPU A, 2 cores")
    rec = {"command": "calibrate", "commit": "def5678", "machine": "GPU box, 16 cores", "date": "2026-12-01"}
    same = {"command": "calibrate", "commit": here[0], "machine": here[1], "date": "2026-12-02"}
    assert calibration_origin({"prior": {"provenance": same}}, *here) == ""
    text = calibration_origin({"prior": {"provenance": rec}, "heldout": {"provenance": rec}}, *here)
    assert text == ("The calibration summaries were computed for sets heldout, prior by `calibrate` at commit "
                    "`def5678` on GPU box, 16 cores, on 2026-12-01.")
    text = calibration_origin({"prior": {"provenance": same}, "heldout": {"seed": 0}}, *here)
    assert text == "The summary of set heldout records no commit or machine of its own."


def test_results_page_names_where_its_summaries_were_computed(tmp_path, monkeypatch):
    cal = tmp_path / "results" / "calibration"
    _summary(cal / "prior" / "summary.json")
    monkeypatch.setattr(results_page, "git_commit", lambda repo_dir=".": "def5678")
    stamp_provenance(cal / "prior" / "summary.json", "prior")  # calibrate at def5678
    monkeypatch.setattr(results_page, "git_commit", lambda repo_dir=".": "abc1234")  # the page at abc1234
    page = tmp_path / "docs" / "results" / "lensing.md"
    assert main(["report", "--calibration", str(cal), "--out", str(page), "--results-page",
                 "--command", "make demo"]) == 0
    text = page.read_text()
    assert "Made by `make demo` at commit `abc1234`" in text
    assert "computed for set prior by `calibrate` at commit `def5678` on " in text
    assert json.loads((page.parent / "lensing" / "summary_prior.json").read_text())["settings"]["prior"][
        "provenance"]["commit"] == "def5678"


def test_results_page_names_the_command_that_recomputes_it(tmp_path):
    cal = tmp_path / "results" / "calibration"
    _summary(cal / "prior" / "summary.json")
    page = tmp_path / "docs" / "results" / "calibration64.md"
    command = "snakemake --cores 2 --configfile config/calibration64.yaml"
    assert main(["report", "--calibration", str(cal), "--out", str(page), "--results-page",
                 "--command", command]) == 0
    text = page.read_text()
    assert f"Every figure below is recomputed by `{command}`." in text
    assert "make demo" not in text
