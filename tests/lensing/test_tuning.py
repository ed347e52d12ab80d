"""A guidance scale tuned once (`tune`) and frozen for every set (`sample --tuning`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import InputFileError
from pipeline.io.posterior import read_posterior
from pipeline.lensing.tuning import read_tuning_record

ROOT = Path(__file__).resolve().parents[2]
PRIOR = ROOT / "data" / "pretrained" / "prior"


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


def test_read_tuning_record_refuses_bad_records_in_one_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"method": "dps", "scale": 0.02}))
    assert read_tuning_record(path, "dps")["scale"] == 0.02
    for text, method, field in ((json.dumps({"method": "dps_cla", "scale": 1.0}), "dps", "method"),
                                (json.dumps({"method": "dps", "scale": -1}), "dps", "scale"),
                                (json.dumps({"method": "dps"}), "dps", "scale"),
                                ("{not json", "dps", None)):
        path.write_text(text)
        with pytest.raises(InputFileError) as err:
            read_tuning_record(path, method)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg and (field is None or f"[{field}]" in msg)


@pytest.mark.slow
def test_sample_uses_the_frozen_record_instead_of_tuning(tmp_path):
    """`sample --tuning` takes the record's scale and stores the record in the posterior file's provenance
    (no search is run); a record of another method is refused in one line, writing nothing."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["lensing"]["noise"]["sigma"] = 0.05
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    obs = tmp_path / "obs"
    assert _run("simulate-prior-set", "--config", config, "--checkpoint", PRIOR, "--n", 1, "--out", obs,
                cwd=ROOT).returncode == 0
    record = {"method": "dps", "scale": 0.0123, "objective": "chi2", "grid": [0.0123], "values": [-1.0]}
    (tmp_path / "dps.json").write_text(json.dumps(record))
    out = tmp_path / "post"
    res = _run("-v", "sample", "--config", config, "--method", "dps", "--prior", PRIOR, "--obs", obs, "--n", 2,
               "--tuning", tmp_path / "dps.json", "--out", out, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "tune dps" not in res.stderr  # no search ran
    post = read_posterior(next(out.glob("*.fits")))
    assert post["provenance"]["tuning"] == record and post["provenance"]["options"]["scale"] == 0.0123
    (tmp_path / "cla.json").write_text(json.dumps({**record, "method": "dps_cla"}))
    res = _run("sample", "--config", config, "--method", "dps", "--prior", PRIOR, "--obs", obs, "--n", 2,
               "--tuning", tmp_path / "cla.json", "--out", tmp_path / "post2", cwd=ROOT)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1 and "[method]" in res.stderr
    assert not (tmp_path / "post2").exists()
