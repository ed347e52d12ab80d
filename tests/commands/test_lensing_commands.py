"""The lensing commands chained on a tiny problem (12x12 pixels, a 2-step prior, a 1-step posterior), in
process: sources -> train-prior -> install-prior -> simulate-prior-set -> finetune-posterior -> sample /
tune / check-posterior. Each test checks what its command writes; the numbers' accuracy is checked by
the slow end-to-end tests and the workflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from astropy.io import fits

from pipeline.cli import main
from pipeline.io.posterior import read_posterior

CONFIG = {
    "device": "cpu",
    "lensing": {
        "geometry": {"image_npix": 12, "image_pixscale": 0.2, "source_npix": 12, "source_pixscale": 0.1,
                     "supersample": 1, "psf_fwhm": 0.3, "psf_npix": 5},
        "sources": {"seed": 0, "n_galsim": 10, "n_hst": 0, "split": [0.6, 0.2, 0.2]},
        "noise": {"sigma": 0.05},
    },
    "prior": {"unet": "tiny", "base_channels": 8, "steps": 2, "batch_size": 4, "checkpoint_every": 2,
              "log_every": 1, "warmup_steps": 1, "scale": 0.5},
    "chain": {"K": 4},
    "rtb": {"policy": {"head_preset": "tiny"},
            "objective": {"amortized": True, "logz": "vargrad", "group_size": 2},
            "optim": {"batch_size": 4},
            "run": {"steps": 1, "checkpoint_every": 1, "log_every": 1, "seed": 5}},
    "posterior": {"n_lenses": 2, "n_truths": 4, "batch_size": 4, "particles": 2,
                  "guidance_scales": {"dps": [0.003, 0.01]}},
}


def _cli(capsys, *args) -> dict:
    """Run one command in process; returns its last stdout line parsed as JSON."""
    assert main([str(a) for a in args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained prior, a prior-chain observation set and a fine-tuned posterior, built once."""
    root = tmp_path_factory.mktemp("lensing_run")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    assert main(["sources", "--config", str(config), "--out", str(root / "sources.fits")]) == 0
    assert main(["train-prior", "--config", str(config), "--data", str(root / "sources.fits"),
                 "--out", str(root / "prior")]) == 0
    assert main(["simulate-prior-set", "--config", str(config), "--checkpoint", str(root / "prior"), "--n", "2",
                 "--out", str(root / "obs")]) == 0
    assert main(["finetune-posterior", "--config", str(config), "--prior", str(root / "prior"),
                 "--run-dir", str(root / "ft"), "--out", str(root / "posterior")]) == 0
    return root


def test_sources_writes_the_configured_splits(run):
    with fits.open(run / "sources.fits") as hdul:
        shapes = {name: hdul[name].data.shape for name in ("TRAIN", "VALID", "TEST")}
    assert sum(s[0] for s in shapes.values()) == 10
    assert all(s[1:] == (12, 12) for s in shapes.values()) and shapes["TRAIN"][0] >= 4


def test_simulate_prior_set_writes_one_file_per_observation(run):
    files = sorted((run / "obs").glob("obs-*.fits"))
    assert len(files) == 2 and (run / "obs" / "manifest.json").is_file()
    with fits.open(files[0]) as hdul:
        assert hdul[0].header["TRUTHSRC"] == "prior-chain" and hdul[0].header["PRIORK"] == 4


def test_install_prior_copies_a_matching_prior_and_refuses_another_recipe(run, tmp_path, capsys):
    out = _cli(capsys, "install-prior", "--checkpoint", run / "prior" / "final", "--config", run / "config.yaml",
               "--out", tmp_path / "installed")
    assert out["installed"] == str(tmp_path / "installed" / "final")
    for f in (run / "prior" / "final").iterdir():
        if f.is_file():
            assert (tmp_path / "installed" / "final" / f.name).read_bytes() == f.read_bytes(), f.name
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**CONFIG, "prior": {**CONFIG["prior"], "lr": 1e-3}}))
    assert main(["install-prior", "--checkpoint", str(run / "prior" / "final"), "--config", str(other),
                 "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err and "prior" in err
    assert not (tmp_path / "refused").exists()


def test_sample_writes_one_posterior_file_per_observation(run, tmp_path, capsys):
    out = _cli(capsys, "sample", "--config", run / "config.yaml", "--method", "rtb_amortized",
               "--prior", run / "prior", "--posterior", run / "posterior", "--obs", run / "obs", "--n", 3,
               "--out", tmp_path / "samples")
    assert out == {"method": "rtb_amortized", "n_obs": 2, "seconds": out["seconds"]}
    files = sorted((tmp_path / "samples").glob("*.fits"))
    assert [f.name for f in files] == [f.name for f in sorted((run / "obs").glob("obs-*.fits"))]
    post = read_posterior(files[0])
    assert post["samples"].shape == (3, 12, 12) and np.isfinite(post["samples"]).all()


def test_tune_freezes_a_scale_from_the_grid(run, tmp_path, capsys):
    out = _cli(capsys, "tune", "--config", run / "config.yaml", "--method", "dps", "--prior", run / "prior",
               "--obs", run / "obs", "--out", tmp_path / "dps.json")
    record = json.loads((tmp_path / "dps.json").read_text())
    assert record["method"] == "dps" and record["scale"] in (0.003, 0.01) and out["scale"] == record["scale"]


def test_check_posterior_prints_fit_statistics(run, capsys):
    rec = _cli(capsys, "check-posterior", "--config", run / "config.yaml", "--prior", run / "prior",
               "--posterior", run / "posterior", "--n-obs", 2, "--samples", 2)
    assert rec["n_obs"] == 2 and rec["n_samples"] == 2 and rec["noise_sigma"] == 0.05
    assert len(rec["per_observation"]["chi2_nu"]) == 2 == len(rec["per_observation"]["truth_chi2_nu"])
    # the truths are drawn from the noise model the check assumes: their chi2_nu is ~1 (144 pixels each)
    assert 0.6 < rec["truth_chi2_nu_median"] < 1.5
    assert rec["chi2_nu_median"] > 0 and np.isfinite(rec["elbo_median"])


def test_check_posterior_step_options_are_consistent(run, capsys):
    """The step variance switched off takes the step mean shift with it (the record says so); asking for
    the shift without a step variance is one line naming the conflict, before anything is loaded."""
    rec = _cli(capsys, "check-posterior", "--config", run / "config.yaml", "--prior", run / "prior",
               "--posterior", run / "posterior", "--n-obs", 1, "--samples", 2, "--step-variance-tau2", "off")
    assert rec["step_variance_tau2"] is None and rec["step_mean_shift"] is False
    rc = main([str(a) for a in ("check-posterior", "--config", run / "config.yaml", "--prior", run / "prior",
                                "--posterior", run / "posterior", "--step-variance-tau2", "off",
                                "--step-mean-shift", "on")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "step mean shift needs a step variance" in err[0]


def test_finetune_records_the_trained_conditions(run):
    from pipeline.io.checkpoint import load_checkpoint

    rec = load_checkpoint(run / "posterior", names=[]).hparams["trained_on"]
    assert (rec["image_npix"], rec["image_pixscale"], rec["source_npix"], rec["psf_fwhm"]) == (12, 0.2, 12, 0.3)
    assert rec["noise_sigma"] == [0.05, 0.05] and rec["rein"] == [0.5, 0.9] and rec["shear_max"] == 0.15
    assert rec["measured_on"] == {"lenses": 2, "truths": 4, "from": "pool"}
    assert 0 < rec["peak_snr"][0] <= rec["peak_snr"][1] and 0 < rec["source_flux"][0] <= rec["source_flux"][1]


def test_a_run_with_no_step_left_keeps_the_record_it_resumed(run, tmp_path):
    """A finished checkpoint (as the shipped one) seeds a run with nothing left to train: the export keeps
    the checkpoint's trained conditions instead of measuring a pool the network never saw."""
    import hashlib
    import shutil

    from pipeline.io.checkpoint import load_checkpoint

    step = load_checkpoint(run / "ft", names=[]).path
    shipped = tmp_path / step.name
    shutil.copytree(step, shipped)
    hp = json.loads((shipped / "hparams.json").read_text())
    hp["trained_on"] = {**load_checkpoint(run / "posterior", names=[]).hparams["trained_on"], "rein": [0.3, 0.4]}
    (shipped / "hparams.json").write_text(json.dumps(hp, indent=2, sort_keys=True))
    man = json.loads((shipped / "manifest.json").read_text())
    data = (shipped / "hparams.json").read_bytes()
    man["files"]["hparams.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (shipped / "manifest.json").write_text(json.dumps(man))
    assert main(["finetune-posterior", "--config", str(run / "config.yaml"), "--prior", str(run / "prior"),
                 "--run-dir", str(tmp_path / "ft"), "--out", str(tmp_path / "export"),
                 "--init-from", str(shipped)]) == 0
    assert load_checkpoint(tmp_path / "export", names=[]).hparams["trained_on"] == hp["trained_on"]
