"""Report: ranking rule, acceptance checks, formatting and errors on hand-made summaries."""

import json

from pipeline.cli import main
from pipeline.commands.report import acceptance, logz_summary, tarp_ranking


def _r(dev, ci, chi=1.0, arc=1.0, p95=0.2):
    return {"tarp_max_dev": dev, "tarp_max_dev_ci": ci, "tarp_null_p95": p95, "chi2_median": chi,
            "chi2_arc_median": arc, "n_obs": 30, "n_samples": 16, "n_alpha_bins": 10, "logz": None}


def test_ranking_only_for_disjoint_intervals():
    tiers, sentence = tarp_ranking({"a": _r(0.1, [0.05, 0.2]), "b": _r(0.15, [0.1, 0.25]),
                                    "c": _r(0.5, [0.4, 0.6])})
    assert tiers == [["a", "b"], ["c"]]
    assert "{a, b} (not ranked among themselves) < c" in sentence
    tiers, sentence = tarp_ranking({"a": _r(0.1, [0.05, 0.3]), "b": _r(0.2, [0.1, 0.25])})
    assert tiers == [["a", "b"]] and "not ranked" in sentence
    tiers, _ = tarp_ranking({"a": _r(0.1, [0.05, 0.12]), "b": _r(0.2, [0.15, 0.25])})
    assert tiers == [["a"], ["b"]]


def test_acceptance_and_logz():
    assert acceptance(_r(0.1, [0, 0.2])) == {"tarp": True, "chi2": True}
    assert acceptance(_r(0.3, [0, 0.4], chi=1.3)) == {"tarp": False, "chi2": False}
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
    assert "| prior | m | 30 | 16 | 0.100 [0.000, 0.200] | 0.200 | yes |" in text
