"""The sampler-cost benchmark: variants parsed with one-line errors, seconds per sample and ratios measured
per variant, and a missing noise level named in one line."""

import json

import pytest
import yaml

from pipeline.bench import sampler_cost

V1 = "data/pretrained/v1/config.yaml:data/pretrained/v1/prior:data/pretrained/v1/posterior"


def test_parse_variant_and_its_errors():
    assert sampler_cost.parse_variant("c.yaml:p:q") == ("c.yaml", "p", "q", "rtb_amortized")
    assert sampler_cost.parse_variant("c.yaml:p:q:rtb_amortized_gn") == ("c.yaml", "p", "q", "rtb_amortized_gn")
    for bad, word in (("c.yaml:p", "expected"), ("c.yaml::q", "expected"), ("c.yaml:p:q:dps", "METHOD")):
        with pytest.raises(ValueError, match=word):
            sampler_cost.parse_variant(bad)


def test_cli_times_each_variant_and_writes_its_ratios(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert sampler_cost.main([V1, V1, "--n-obs", "1", "--samples", "2", "--rounds", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    rows = rec["variants"]
    assert [r["variant"] for r in rows] == [V1, V1] and rows[0]["ratio_to_first"] == 1.0
    assert rec["samples"] == 2 and rows[0]["K"] == 20
    assert all(0 < r["seconds_per_sample"]["min"] <= r["seconds_per_sample"]["median"]
               <= r["seconds_per_sample"]["max"] for r in rows)
    assert "x1.00 the first" in capsys.readouterr().out


def test_cli_names_a_bad_variant_or_a_missing_noise_level_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        sampler_cost.main(["config/config.yaml:data/pretrained/prior"])
    assert err.value.code == 2 and "CONFIG:PRIOR:POSTERIOR" in capsys.readouterr().err
    cfg = yaml.safe_load(open("data/pretrained/v1/config.yaml"))
    cfg["lensing"]["noise"]["sigma"] = None  # the v1 posterior is a trainer checkpoint: it records no noise
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert sampler_cost.main([f"{path}:data/pretrained/v1/prior:data/pretrained/v1/posterior", "--n-obs", "1",
                              "--samples", "2", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lensing.noise_sigma" in err and len(err.strip().splitlines()) == 1
