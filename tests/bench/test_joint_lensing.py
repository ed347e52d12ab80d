"""The lens-inference cost benchmark: its weight statistics and its operator timing."""

import math

import pytest
import torch

from pipeline.bench.joint_lensing import log_z_hat_spread, operator_seconds, weight_summary
from pipeline.lensing.config import LensingConfig


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


def test_operator_timing_reports_both_ways():
    # the sampling half of main() (prior-drawn observations, the shipped posterior) is exercised by
    # tests/bench/test_last_step.py; here the operator timing, on one lens
    out = operator_seconds(LensingConfig(), 0.26, n_lenses=1, repeats=1, seed=0, batch=4)
    assert out["assembled_s"] > 0 and out["matrix_free_forward_s"] > 0 and out["matrix_free_forward_vjp_s"] > 0
    assert out["batched_bind_s"] > 0 and out["batched_forward_adjoint_s"] > 0 and out["batched_diag_AtA_s"] > 0
    assert out["batch"] == 4
    assert (out["lenses"], out["repeats"]) == (1, 1)
