"""The chain-cost benchmark: variants parsed with one-line errors, times and ratios measured per variant."""

import json

import pytest

from pipeline.bench import chain_cost

PRIOR = "data/pretrained/prior"


def test_parse_variant_and_its_errors():
    assert chain_cost.parse_variant("p:20:quadratic") == ("p", 20, "quadratic", "small")
    assert chain_cost.parse_variant("a/b:40:uniform:large") == ("a/b", 40, "uniform", "large")
    for bad, word in (("p:20", "expected"), ("p:x:uniform", "K must be"), ("p:1:uniform", "K must be"),
                      ("p:20:karras", "spacing"), ("p:20:uniform:huge", "variance")):
        with pytest.raises(ValueError, match=word):
            chain_cost.parse_variant(bad)


def test_cli_times_each_variant_and_writes_its_ratios(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert chain_cost.main([f"{PRIOR}:4:uniform", f"{PRIOR}:16:quadratic", "--n", "2", "--rounds", "3",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["variants"]
    assert [r["variant"] for r in rows] == [f"{PRIOR}:4:uniform", f"{PRIOR}:16:quadratic"]
    assert rows[0]["ratio_to_first"] == 1.0
    assert all(r["seconds_per_draw"]["min"] <= r["seconds_per_draw"]["median"] <= r["seconds_per_draw"]["max"]
               for r in rows)
    assert "x1.00 the first" in capsys.readouterr().out


def test_cli_names_a_bad_variant_or_checkpoint_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        chain_cost.main([f"{PRIOR}:20"])
    assert err.value.code == 2 and "CHECKPOINT:K:SPACING" in capsys.readouterr().err
    assert chain_cost.main([f"{tmp_path}/missing:20:uniform", "--n", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and len(err.strip().splitlines()) == 1


def test_a_variant_given_twice_is_timed_twice():
    rows = chain_cost.time_variants([f"{PRIOR}:4:uniform", f"{PRIOR}:4:uniform"], n=1, rounds=2)
    assert len(rows) == 2 and rows[0]["variant"] == rows[1]["variant"]
