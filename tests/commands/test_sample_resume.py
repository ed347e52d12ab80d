"""`sample --resume` and `--shard`: a sample job stopped part-way (a time limit) resumes where it stopped,
and shards together write what one whole job writes, bit for bit (each observation keeps its own seed)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from astropy.io import fits

import pipeline.lensing.sample as lensing_sample
from pipeline.cli import main
from pipeline.commands.sample import parse_shard, partial_dir
from pipeline.errors import ConfigError

from tests.commands.test_lensing_commands import CONFIG  # the tiny problem: 12x12 pixels, 2-step prior


pytestmark = pytest.mark.slow  # trains a tiny prior and posterior first (about 10 s on 2 cores)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained prior and posterior and four prior-chain observations."""
    root = tmp_path_factory.mktemp("resume_run")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    assert main(["sources", "--config", str(config), "--out", str(root / "sources.fits")]) == 0
    assert main(["train-prior", "--config", str(config), "--data", str(root / "sources.fits"),
                 "--out", str(root / "prior")]) == 0
    assert main(["simulate-prior-set", "--config", str(config), "--checkpoint", str(root / "prior"), "--n", "4",
                 "--out", str(root / "obs")]) == 0
    assert main(["finetune-posterior", "--config", str(config), "--prior", str(root / "prior"),
                 "--run-dir", str(root / "ft"), "--out", str(root / "posterior")]) == 0
    return root


def _sample(run, out, *extra, method="rtb_amortized", n=3):
    return main(["sample", "--config", str(run / "config.yaml"), "--method", method, "--prior", str(run / "prior"),
                 "--posterior", str(run / "posterior"), "--obs", str(run / "obs"), "--n", str(n),
                 "--out", str(out), *map(str, extra)])


def _samples(directory) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.fits")):
        with fits.open(f) as h:
            out[f.name] = h["SAMPLES"].data.copy()
    return out


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name  # bit for bit


@pytest.fixture(scope="module")
def whole(run):
    assert _sample(run, run / "whole") == 0
    return _samples(run / "whole")


def _stop_after(monkeypatch, k):
    """Make the sampler stop (as a time limit would) after writing k posterior files."""
    real, written = lensing_sample.write_posterior, []

    def write_then_stop(path, *args, **kwargs):
        if len(written) == k:
            raise KeyboardInterrupt("time limit")
        real(path, *args, **kwargs)
        written.append(path)

    monkeypatch.setattr(lensing_sample, "write_posterior", write_then_stop)


def test_a_stopped_job_resumes_where_it_stopped_and_writes_what_a_whole_job_writes(run, whole, tmp_path,
                                                                                   monkeypatch, caplog):
    out = tmp_path / "rtb_amortized"
    _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _sample(run, out, "--resume")
    monkeypatch.undo()
    assert not out.exists()  # no partial output directory ...
    assert sorted(p.name for p in partial_dir(out).glob("*.fits")) == ["obs-0000.fits", "obs-0001.fits"]  # ... but
    with caplog.at_level("INFO"):
        assert _sample(run, out, "--resume") == 0
    assert "resuming: 2 of 4 observations already sampled" in caplog.text
    _assert_same(_samples(out), whole)
    assert not partial_dir(out).exists()


def test_a_changed_job_does_not_resume_from_another_jobs_files(run, tmp_path, monkeypatch):
    out = tmp_path / "rtb_amortized"
    _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _sample(run, out, "--resume")
    monkeypatch.undo()
    assert _sample(run, out, "--resume", n=4) == 0  # another sample count: every observation sampled again
    assert {name: s.shape[0] for name, s in _samples(out).items()} == {f"obs-000{i}.fits": 4 for i in range(4)}


def test_shards_together_equal_one_whole_job(run, whole, tmp_path):
    parts = {}
    for k in range(3):
        assert _sample(run, tmp_path / f"shard{k}", "--resume", "--shard", f"{k}/3") == 0
        parts.update(_samples(tmp_path / f"shard{k}"))
    _assert_same(dict(sorted(parts.items())), whole)


def test_shard_shares_are_contiguous_and_cover_every_observation():
    assert [sorted(parse_shard(f"{k}/3", 8)) for k in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert parse_shard(None, 8) is None
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad, 8)


def test_resume_needs_an_output_directory(run, tmp_path, capsys):
    assert main(["sample", "--config", str(run / "config.yaml"), "--method", "rtb_amortized", "--prior",
                 str(run / "prior"), "--posterior", str(run / "posterior"), "--obs", str(run / "obs"),
                 "--out-file", str(tmp_path / "x.fits"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err


def test_a_labelled_run_is_its_own_row_in_calibration(run, whole, tmp_path):
    """`sample --label` (a `baselines:` item) writes LABEL; calibrate groups its files under that name, beside
    the method's own run, and the samples are the method's (same seeds)."""
    import json

    assert _sample(run, tmp_path / "prev", "--label", "prev") == 0
    _assert_same(_samples(tmp_path / "prev"), whole)
    with fits.open(sorted((tmp_path / "prev").glob("*.fits"))[0]) as h:
        assert h[0].header["LABEL"] == "prev" and h[0].header["METHOD"] == "rtb_amortized"
    assert main(["calibrate", "--config", str(run / "config.yaml"), "--set", "prior", "--observations",
                 str(run / "obs"), "--posteriors", str(run / "whole"), str(tmp_path / "prev"), "--n-null", "50",
                 "--n-boot", "20", "--lens-figures", "0", "--out", str(tmp_path / "cal")]) == 0
    summary = json.loads((tmp_path / "cal" / "summary.json").read_text())
    rows = summary["sets"]["prior"]
    assert {"rtb_amortized", "prev"} <= set(rows), list(rows)
    assert rows["prev"]["n_obs"] == rows["rtb_amortized"]["n_obs"] == 4
    # the report compares the methods with it, and does not judge it
    assert rows["prev"]["baseline"] is True and rows["rtb_amortized"]["baseline"] is False


@pytest.mark.parametrize("label, words", [("a/b", "letters, digits and _"), ("dps", "a method's name")])
def test_a_bad_label_is_refused_in_one_line_before_any_sampling(run, tmp_path, capsys, label, words):
    assert _sample(run, tmp_path / "out", "--label", label) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "label" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
