"""The train-prior and sample-prior commands end to end (tiny sizes), and their --help."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from astropy.io import fits

from pipeline.cli import main
from pipeline.diffusion.sampling import sample_prior
from pipeline.diffusion.network_prior import load_prior


def test_help_lists_commands_and_options():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    assert "train-prior" in out.stdout and "sample-prior" in out.stdout


@pytest.mark.parametrize("cmd,opts", [("train-prior", ["--config", "--data", "--out", "--steps"]),
                                      ("sample-prior", ["--checkpoint", "--n", "--out", "--K", "--seed", "--png"])])
def test_command_help(cmd, opts, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(o in text for o in opts)


def test_train_then_sample_writes_fits_in_physical_units(tmp_path, blob_fits, tiny_config, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(offset=0.25)
    assert main(["train-prior", "--config", str(cfg), "--data", str(blob_fits), "--out", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["completed"] and summary["step"] == 6
    assert (run / "done").is_file() and (run / "final" / "ema.pt").is_file()
    # a second call on a finished run does nothing and succeeds
    assert main(["train-prior", "--config", str(cfg), "--data", str(blob_fits), "--out", str(run)]) == 0

    out, png = tmp_path / "samples.fits", tmp_path / "samples.png"
    assert main(["sample-prior", "--checkpoint", str(run), "--config", str(cfg), "--n", "5", "--out", str(out),
                 "--seed", "3", "--png", str(png), "--batch-size", "2"]) == 0
    with fits.open(out, checksum=True) as hdul:
        hdr = hdul[0].header
        samples = hdul["SAMPLES"].data.astype(np.float32)
    assert samples.shape == (5, 16, 16)
    assert hdr["CHAIN_K"] == 5 and hdr["SEED"] == 3 and hdr["CHAINVAR"] == "small" and hdr["CKSTEP"] == 6
    assert hdr["SCALE"] == 0.5 and hdr["OFFSET"] == 0.25 and hdr["CFGHASH"] == json.loads((run / "done").read_text())["config_hash"]
    assert png.is_file() and png.stat().st_size > 1000
    # same numbers as sampling the loaded prior directly with the same seed, mapped to physical units
    prior = load_prior(run)
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    x = sample_prior(prior, prior.schedule.chain(5), 5, generator=g, batch_size=2)
    np.testing.assert_allclose(samples, (0.5 * x + 0.25)[:, 0].numpy(), rtol=0, atol=1e-6)

    out2 = tmp_path / "k3.fits"
    assert main(["sample-prior", "--checkpoint", str(run / "step-000003"), "--n", "2", "--out", str(out2),
                 "--K", "3", "--variance", "large"]) == 0
    with fits.open(out2) as hdul:
        assert hdul[0].header["CHAIN_K"] == 3 and hdul[0].header["CHAINVAR"] == "large"
        assert hdul["SAMPLES"].data.shape == (2, 16, 16)


def test_sample_prior_rejects_bad_K(tmp_path, blob_fits, tiny_config, capsys):
    run = tmp_path / "run"
    assert main(["train-prior", "--config", str(tiny_config(steps=1)), "--data", str(blob_fits),
                 "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "x.fits"
    assert main(["sample-prior", "--checkpoint", str(run), "--n", "2", "--out", str(out), "--K", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "K" in err and not out.exists()
