"""pipeline.bench.coverage_by_snr: per-observation coverage grouped by peak SNR."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.coverage_by_snr import main
from pipeline.evaluation.groups import snr_groups


def _summary(c68, c95, arc):
    return {"sets": {"prior": {"rtb_amortized": {
        "coverage68_ref": 0.697, "coverage95_ref": 0.939,
        "per_obs": {"coverage68": c68, "coverage95": c95, "chi2_arc_median": arc}}}}}


def test_cli_writes_rows_and_names_a_bad_file(tmp_path, capsys):
    s, m = tmp_path / "summary.json", tmp_path / "manifest.json"
    s.write_text(json.dumps(_summary([0.2, 0.9], [0.8, 1.0], [1.0, 1.6])))
    m.write_text(json.dumps({"observations": [{"peak_snr": 80.0}, {"peak_snr": 3.0}]}))
    out = tmp_path / "rows.json"
    assert main([str(s), str(m), "--groups", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["groups"]
    assert [r["coverage68"] for r in rows] == [0.9, 0.2]  # faint first
    m.write_text(json.dumps({"observations": [{"peak_snr": 80.0}]}))
    assert main([str(s), str(m)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(m) in err[0] and "[observations]" in err[0]
    assert main([str(s), str(m), "--method", "dps"]) == 2
    assert "no method 'dps'" in capsys.readouterr().err
    # observations matched by file name when both files name them; bad values are one-line errors
    summ = _summary([0.2, 0.9], [0.8, 1.0], [1.0, float("nan")])
    summ["sets"]["prior"]["rtb_amortized"]["observations"] = ["obs-0001.fits", "obs-0000.fits"]
    s.write_text(json.dumps(summ))
    m.write_text(json.dumps({"observations": [{"file": "obs-0000.fits", "peak_snr": 3.0},
                                              {"file": "obs-0001.fits", "peak_snr": 80.0}]}))
    assert main([str(s), str(m), "--groups", "2", "--out", str(out)]) == 0
    assert [r["coverage68"] for r in json.loads(out.read_text())["groups"]] == [0.9, 0.2]
    m.write_text(json.dumps({"observations": [{"file": "obs-0000.fits", "peak_snr": None},
                                              {"file": "obs-0001.fits", "peak_snr": 80.0}]}))
    assert main([str(s), str(m), "--groups", "2"]) == 2
    assert "finite" in capsys.readouterr().err
    m.write_text(json.dumps({"observations": [{"file": "obs-0000.fits", "peak_snr": 3.0},
                                              {"file": "obs-0002.fits", "peak_snr": 80.0}]}))
    assert main([str(s), str(m), "--groups", "2"]) == 2
    assert "obs-0001.fits" in capsys.readouterr().err
    m.write_text(json.dumps({"observations": [{"file": "obs-0000.fits", "peak_snr": 3.0},
                                              {"file": "obs-0001.fits", "peak_snr": 80.0}]}))
    del summ["sets"]["prior"]["rtb_amortized"]["coverage68_ref"]
    s.write_text(json.dumps(summ))
    assert main([str(s), str(m), "--groups", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(s) in err[0]


def test_groups_sort_by_snr_and_average_within():
    per_obs = {"coverage68": [0.9, 0.1, 0.8, 0.3, 0.7], "coverage95": [1.0, 0.5, 0.9, 0.6, 0.95],
               "chi2_arc_median": [1.5, 1.0, 1.4, 1.1, 1.3]}
    snr = [50.0, 2.0, 40.0, 5.0, 30.0]
    rows = snr_groups(per_obs, snr, 2)
    assert [r["n_obs"] for r in rows] == [3, 2]
    assert rows[0]["snr_min"] == 2.0 and rows[0]["snr_max"] == 30.0
    assert rows[0]["coverage68"] == pytest.approx((0.1 + 0.3 + 0.7) / 3, abs=1e-12)
    assert rows[0]["chi2_arc_median"] == pytest.approx(1.1, abs=1e-12)
    assert rows[0]["truth_chi2_arc_median"] is None
    assert rows[1]["coverage95"] == pytest.approx(0.95, abs=1e-12)
    with pytest.raises(ValueError, match="groups"):
        snr_groups(per_obs, snr, 6)
    with pytest.raises(ValueError, match="peak SNRs"):
        snr_groups(per_obs, snr[:4], 2)
