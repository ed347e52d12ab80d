"""The lens-inference cost benchmark: its weight statistics, and one small run on the shipped checkpoints."""

import json
import math

import pytest
import torch

from pipeline.bench.joint_lensing import log_z_hat_spread, main, weight_summary


def test_log_z_hat_variance_of_gaussian_log_weights():
    # log w ~ N(0, s^2): Var(log Z^_1) = s^2, and with N weights the variance shrinks about as
    # (e^{s^2} - 1) / N once N is large; equal weights give ESS fraction 1
    gen = torch.Generator().manual_seed(0)
    lw = 0.5 * torch.randn(65536, generator=gen, dtype=torch.float64)
    v = log_z_hat_spread(lw)
    assert v["1"] == pytest.approx(0.25, rel=0.03)
    assert v["256"] == pytest.approx((math.exp(0.25) - 1) / 256, rel=0.35)
    s = weight_summary(torch.zeros(64, dtype=torch.float64))
    assert s["ess_fraction"] == pytest.approx(1.0) and s["log_w_std"] == 0.0


@pytest.mark.slow
def test_small_run_on_the_shipped_checkpoints(tmp_path):
    out = main([str(tmp_path / "r.json"), "--n-obs", "1", "--trajectories", "16", "--lenses", "1",
                "--repeats", "1"])
    assert json.loads((tmp_path / "r.json").read_text()) == out
    row = out["observations"][0]
    assert set(row["theta"]) == {"x0", "y0", "rein", "q", "phi", "g1", "g2"}
    assert row["log_w_std"] > 0 and 0 < row["ess_fraction"] <= 1 and set(row["var_log_z_hat"]) == {"1", "4"}
    assert out["operator"]["assembled_s"] > 0 and out["operator"]["matrix_free_forward_vjp_s"] > 0
