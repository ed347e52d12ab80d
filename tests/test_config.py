"""Bad config values and bad checkpoints: one-line errors naming the field/file, no partial output."""

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import from_mapping, load_section
from pipeline.diffusion.prior_config import PriorConfig
from pipeline.errors import ConfigError


@pytest.mark.parametrize("key,value,words", [
    ("steps", "many", "expected int"),
    ("steps", 0, ">= 1"),
    ("lr", -0.1, "> 0"),
    ("ema_decay", 1.5, "<= 1"),
    ("batch_size", 2.5, "expected int"),
    ("augment", "mirror", "must be one of"),
    ("unet", "huge", "must be one of"),
    ("channel_mults", [1, "x"], "expected int"),
    ("beta_start", 0.5, "beta_end"),
    ("image_size", 30, "divisible"),
    ("stepz", 3, "unknown field"),
])
def test_bad_prior_config_names_file_and_field(tmp_path, key, value, words):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"prior": {key: value}}))
    with pytest.raises(ConfigError) as err:
        load_section(path, "prior", PriorConfig)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and words in msg
    field = {"beta_start": "prior.beta_start", "stepz": "prior.stepz"}.get(key, f"prior.{key}")
    assert field in msg


def test_defaults_are_valid():
    cfg = from_mapping(PriorConfig, {}, "x")
    assert cfg.unet == "small" and cfg.T == 1000 and cfg.data_hdu == "TRAIN"


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, blob_fits, capsys, tiny_config):
    cfg = tiny_config(lr="fast")
    out = tmp_path / "run"
    assert main(["train-prior", "--config", str(cfg), "--data", str(blob_fits), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prior.lr" in err and str(cfg) in err
    assert not out.exists()


def test_cli_missing_data_exits_2_and_writes_nothing(tmp_path, capsys, tiny_config):
    out = tmp_path / "run"
    assert main(["train-prior", "--config", str(tiny_config()), "--data", str(tmp_path / "no.fits"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no.fits" in err and "not found" in err
    assert not out.exists()


def test_cli_wrong_hdu_names_file_and_hdu(tmp_path, blob_fits, capsys, tiny_config):
    out = tmp_path / "run"
    assert main(["train-prior", "--config", str(tiny_config(data_hdu="SOURCES")), "--data", str(blob_fits),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SOURCES" in err and str(blob_fits) in err
    assert not out.exists()


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["train-prior", "--config", str(tmp_path / "none.yaml"), "--data", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.yaml" in err


def test_missing_and_truncated_checkpoint_give_one_line_and_no_output(tmp_path, blob_fits, capsys, tiny_config):
    out = tmp_path / "s.fits"
    assert main(["sample-prior", "--checkpoint", str(tmp_path / "nope"), "--n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "not found" in err
    assert not out.exists()
    run = tmp_path / "run"
    assert main(["train-prior", "--config", str(tiny_config(steps=3)), "--data", str(blob_fits),
                 "--out", str(run)]) == 0
    capsys.readouterr()
    for f in (run / "final" / "ema.pt", run / "step-000003" / "ema.pt"):  # truncate every copy
        data = f.read_bytes()
        f.write_bytes(data[:100])
    assert main(["sample-prior", "--checkpoint", str(run / "final"), "--n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "final" in err and "truncated" in err
    assert not out.exists()
    assert main(["sample-prior", "--checkpoint", str(run), "--n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err
    assert not out.exists() and not list(tmp_path.glob(".s.fits*"))


def test_fits_helpers_native_float32_and_one_line_errors(tmp_path, blob_fits, monkeypatch):
    import numpy as np
    import torch
    from astropy.io import fits

    from pipeline.errors import InputFileError
    from pipeline.io.fits import read_image_hdu, write_fits_atomic

    arr = read_image_hdu(blob_fits, "train")  # HDU names are case-insensitive in FITS
    assert arr.dtype == np.float32 and arr.dtype.isnative and arr.shape == (64, 16, 16)
    assert torch.from_numpy(arr).shape == (64, 16, 16)  # refused for big-endian arrays
    with pytest.raises(InputFileError) as err:
        read_image_hdu(blob_fits, "PSF")
    assert "PSF" in str(err.value) and str(blob_fits) in str(err.value) and "\n" not in str(err.value)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(blob_fits.read_bytes()[:5000])
    with pytest.raises(InputFileError) as err:
        read_image_hdu(cut, "TRAIN")
    assert str(cut) in str(err.value) and "truncated" in str(err.value) and "\n" not in str(err.value)

    def failing_writeto(self, name, **kw):
        with open(name, "wb") as fh:
            fh.write(b"SIMPLE  =    partial")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", failing_writeto)
    target = tmp_path / "out" / "x.fits"
    with pytest.raises(OSError):
        write_fits_atomic(target, [fits.PrimaryHDU()])
    assert list((tmp_path / "out").iterdir()) == []
