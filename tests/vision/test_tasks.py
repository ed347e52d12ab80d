"""The vision benchmark's trained artefacts, tasks and methods (pipeline.vision.tasks / .methods) on the
smallest run the config allows: 2 prior steps, 2 autoencoder steps, 1 RTB step, 1 observation, pixel
and latent space. Checks what is built and recorded; the numbers' quality is the slow end-to-end test's."""

import argparse
import json
import math

import pytest
import yaml

from pipeline.vision import bench
from pipeline.vision.tasks import recorded_train_seconds


def _args(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def test_recorded_train_seconds_reads_the_last_record(tmp_path):
    assert recorded_train_seconds(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"elapsed_s": 3.5}\n{"step": 4}\nnot json\n')
    assert recorded_train_seconds(tmp_path) == 3.5


def test_smallest_run_scores_every_method_on_pixel_and_latent_tasks(tmp_path):
    cfg_file = tmp_path / "v.yaml"
    prior = {"steps": 2, "batch_size": 4}
    cfg_file.write_text(yaml.safe_dump({"device": "cpu", "vision": {
        "datasets": ["mnist"], "tasks": ["random_inpaint"], "latent_datasets": ["mnist"],
        "latent_tasks": ["random_inpaint"], "methods": ["rtb_amortized", "dps", "fps"], "standin_train": 64,
        "n_obs": 1, "n_samples": 2, "chain": {"K": 2}, "prior": prior, "latent_prior": prior, "ae_steps": 2,
        "ae_base_channels": 4, "rtb": {"objective": {"group_size": 2}, "optim": {"batch_size": 2},
                                       "run": {"steps": 1}},
        "dps_tune": False, "figure_samples": 1}}))
    out = tmp_path / "out"
    assert bench.run(_args("--config", str(cfg_file), "--out", str(out))) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    # fps is linear-only: it runs on the pixel task, not through the (nonlinear) decoder
    assert sorted((r["space"], r["method"]) for r in rows) == [
        ("latent", "dps"), ("latent", "rtb_amortized"), ("pixel", "dps"), ("pixel", "fps"), ("pixel", "rtb_amortized")]
    for r in rows:
        assert r["nfe"] >= 2 and r["seconds_per_sample"] > 0
        assert math.isfinite(r["psnr"]) and -1.0 <= r["ssim"] <= 1.0
