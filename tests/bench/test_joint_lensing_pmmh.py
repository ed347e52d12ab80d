"""The pseudo-marginal lens reference (:mod:`pipeline.bench.joint_lensing_pmmh`)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.bench.joint_lensing_mh import metropolis
from pipeline.bench.joint_lensing_pmmh import chain_summary, reduced_lens_config
from pipeline.lensing.config import LensConfig
from pipeline.lensing.lens_prior import LensPrior


def test_reduced_lens_config_frees_only_what_is_asked():
    cfg = LensConfig()
    r = LensPrior(reduced_lens_config(cfg, ["rein", "q", "phi"]))
    assert r.names == ["rein", "q", "phi"] and not r.has_shear
    assert LensPrior(reduced_lens_config(cfg, ["rein", "g1", "g2"])).names == ["rein", "g1", "g2"]
    fixed = r.to_lens(torch.tensor([0.7, 0.8, 1.0]))
    assert (fixed.x0, fixed.y0, fixed.g1, fixed.g2) == (0.0, 0.0, 0.0, 0.0)
    one = LensPrior(reduced_lens_config(cfg, ["rein"])).to_lens(torch.tensor([0.7]))
    assert one.q == pytest.approx(sum(cfg.q) / 2) and one.phi == pytest.approx(sum(cfg.phi) / 2)
    for bad in (["g1"], ["x0"], ["mass"], []):
        with pytest.raises(ValueError):
            reduced_lens_config(cfg, bad)


class _Noisy:
    """A flat evidence whose first estimate (the start's) is 50 nats too high, and every later one exact."""

    def __init__(self, prior):
        self.prior, self.calls = prior, 0

    def log_evidence(self, theta, rows):
        self.calls += 1
        return torch.full((theta.shape[0],), 50.0 if self.calls == 1 else 0.0, dtype=torch.float64)


def test_the_chain_keeps_the_current_states_estimate():
    """Pseudo-marginal MH reuses the current state's Z^: started with an estimate 50 nats too high, the chain
    (whose proposals all score e^50 lower) never moves in 200 iterations; re-estimating the current state would
    let it move at once."""
    prior = LensPrior(reduced_lens_config(LensConfig(), ["rein"]))
    start = torch.tensor([[0.7]], dtype=torch.float64)
    mh = metropolis(_Noisy(prior), torch.arange(1), start.clone(), torch.full((1, 1), 0.01, dtype=torch.float64),
                    n_iter=200, burn=0, seed=0)
    assert mh["acceptance"] == [0.0] and torch.equal(mh["theta"][:, 0, 0], torch.full((200,), 0.7, dtype=torch.float64))


def test_chain_summary_reads_an_ar1_chain():
    """An AR(1) chain with coefficient 0.5 has integrated autocorrelation time (1 + 0.5) / (1 - 0.5) = 3: the
    summary gives 3 within 15 % on 20,000 iterations, and ESS = n / tau."""
    g = torch.Generator().manual_seed(0)
    n, x = 20000, torch.zeros(20000, dtype=torch.float64)
    e = torch.randn(n, generator=g, dtype=torch.float64)
    for i in range(1, n):
        x[i] = 0.5 * x[i - 1] + e[i]
    s = chain_summary(x[:, None], ["rein"])["rein"]
    assert s["tau_int"] == pytest.approx(3.0, rel=0.15)
    assert s["ess"] == pytest.approx(n / s["tau_int"]) and s["sd"] == pytest.approx(math.sqrt(1 / 0.75), rel=0.05)
    assert chain_summary(torch.ones(10, 1, dtype=torch.float64), ["q"])["q"]["ess"] == 0.0
