"""Tempered SMC for the lens parameters: posterior moments, evidence, the period of phi, and a start for refine."""

import math

import numpy as np
import pytest
import torch

from pipeline.lensing.config import LensConfig
from pipeline.lensing.lens_head import importance_check
from pipeline.lensing.lens_head_mvn import CorrelatedLensHead
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.lens_smc import pool_runs, smc_start, tempered_smc


def _gaussian_log_likelihood(prior, means, sd, corr, wrap_phi=False):
    """Unnormalised log N over the prior's columns with a mean per observation (rows of ``means``); phi's
    offset taken modulo pi when ``wrap_phi``. Returns (log_likelihood, covariance)."""
    cov = corr * sd[:, None] * sd[None, :]
    prec = torch.linalg.inv(cov)
    j = prior.names.index("phi") if wrap_phi else None

    def log_likelihood(theta, rows):
        d = theta - means[rows]
        if j is not None:
            d[:, j] = torch.remainder(d[:, j] + math.pi / 2, math.pi) - math.pi / 2
        return -0.5 * ((d @ prec) * d).sum(-1)
    return log_likelihood, cov


def _q_shear_problem():
    """Two observations whose posteriors have correlation 0.9 between q and g1, 0.1 in q apart."""
    prior = LensPrior(LensConfig(rein=(0.7, 0.7), phi=(0.3, 0.3), center=0.0))
    assert prior.names == ["q", "g1", "g2"]
    means = torch.tensor([[0.9, 0.05, -0.04], [0.8, -0.03, 0.02]], dtype=torch.float64)
    sd = torch.tensor([0.004, 0.002, 0.002], dtype=torch.float64)
    corr = torch.eye(3, dtype=torch.float64)
    corr[0, 1] = corr[1, 0] = 0.9
    return prior, means, sd, *_gaussian_log_likelihood(prior, means, sd, corr)


def test_smc_reaches_each_posterior_and_its_evidence():
    """Particles at beta = 1 carry each observation's means (within 0.25 sd), sds within 15 % and the
    correlation within 0.05; log Z matches the evidence computed independently (the Gaussian integral times
    the prior averaged over the likelihood's normal, 1e5 draws) within 0.5 nats: over 12 seeds SMC's log Z
    had sd 0.14 at 1,024 particles (0.2-0.3 at 256) and a mean within 0.04 of the reference."""
    prior, means, sd, log_likelihood, cov = _q_shear_problem()
    head = CorrelatedLensHead(prior, 5, components=2, hidden=16)
    out = tempered_smc(head, log_likelihood, 2, n=1024, moves=5, seed=0)
    assert np.all(out["beta"].numpy() == 1.0) and 3 < out["stages"] < 60
    assert int(out["evaluations"].max()) == 1024 * (1 + 5 * out["stages"])
    gauss = 0.5 * 3 * math.log(2 * math.pi) + 0.5 * float(torch.logdet(cov))
    for b in range(2):
        s = out["theta"][b]
        assert bool(((s.mean(0) - means[b]).abs() < 0.25 * sd).all()), (b, s.mean(0), means[b])
        ratio = s.std(0) / sd
        assert bool(((ratio > 0.85) & (ratio < 1.15)).all()), (b, ratio)
        assert abs(float(torch.corrcoef(s[:, :2].T)[0, 1]) - 0.9) < 0.05
        draws = means[b] + torch.randn(100000, 3, generator=torch.Generator().manual_seed(b),
                                       dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        log_z = gauss + float(torch.logsumexp(prior.log_prob(draws), 0)) - math.log(len(draws))
        assert abs(float(out["log_z"][b]) - log_z) < 0.5, (b, float(out["log_z"][b]), log_z)


def test_smc_start_gives_refine_a_start_that_passes_the_importance_check():
    prior, means, sd, log_likelihood, _ = _q_shear_problem()
    torch.manual_seed(0)
    head = CorrelatedLensHead(prior, 5, components=2, hidden=16)
    untrained = head.raw(torch.zeros(2, 5, dtype=torch.float64)).detach()
    raw, out = smc_start(head, log_likelihood, 2, n=256, moves=5, seed=0)
    assert raw.shape == untrained.shape and out["theta"].shape == (2, 256, 3)
    before = importance_check(head, untrained, log_likelihood, n=512, seed=1)["ess_fraction"]
    after = importance_check(head, raw, log_likelihood, n=512, seed=1)["ess_fraction"]
    assert np.all(before < 0.05) and np.all(after > 0.5), (before, after)


def test_smc_follows_phi_across_the_ends_of_its_period_and_survives_nan_likelihoods():
    """phi's posterior straddles 0 = pi (mean 0.02, sd 0.03, correlation 0.8 with q); the likelihood is NaN
    (counted as -inf) for q above 0.93, far in the prior's tail of the posterior but reached early on."""
    prior = LensPrior(LensConfig(rein=(0.7, 0.7), center=0.0, shear_sigma=0.0))
    head = CorrelatedLensHead(prior, 5, components=2, hidden=16)
    assert head.circular_phi and prior.names == ["q", "phi"]
    means = torch.tensor([[0.8, 0.02]], dtype=torch.float64)
    exact, _ = _gaussian_log_likelihood(prior, means, torch.tensor([0.01, 0.03], dtype=torch.float64),
                                        torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64), wrap_phi=True)

    def log_likelihood(theta, rows):
        out = exact(theta, rows)
        return torch.where(theta[:, 0] > 0.93, torch.full_like(out, math.nan), out)

    out = tempered_smc(head, log_likelihood, 1, n=256, moves=5, seed=0)
    s = out["theta"][0]
    d = torch.remainder(s[:, 1] - 0.02 + math.pi / 2, math.pi) - math.pi / 2
    assert float(out["beta"][0]) == 1.0
    assert abs(float(s[:, 0].mean()) - 0.8) < 0.25 * 0.01 and abs(float(d.mean())) < 0.25 * 0.03
    assert 0.85 < float(s[:, 0].std()) / 0.01 < 1.15 and 0.85 < float(d.std()) / 0.03 < 1.15
    assert abs(float(torch.corrcoef(torch.stack([s[:, 0], d]))[0, 1]) - 0.8) < 0.05
    assert bool(((s[:, 1] >= 0) & (s[:, 1] <= math.pi)).all())       # particles returned on the prior's range


def test_smc_refuses_bad_settings():
    prior = LensPrior(LensConfig(rein=(0.7, 0.7), phi=(0.3, 0.3), center=0.0))
    head = CorrelatedLensHead(prior, 5)
    for kw in ({"n": 2}, {"moves": 0}, {"min_ess": 1.0}, {"max_stages": 0}):
        with pytest.raises(ValueError, match="tempered_smc needs"):
            tempered_smc(head, lambda theta, rows: theta[:, 0], 1, **kw)


def test_a_constant_likelihood_leaves_the_prior_and_its_evidence_exact():
    """log p(y | theta) = c: one stage to beta = 1, log Z = c exactly, and the moved particles keep the
    prior's law (q uniform on [0.6, 0.95]: mean 0.775, sd 0.101; the shear's sd 0.05 truncated): a wrong
    Jacobian of the map onto the support would move them."""
    prior = LensPrior(LensConfig(rein=(0.7, 0.7), phi=(0.3, 0.3), center=0.0))
    head = CorrelatedLensHead(prior, 5)
    out = tempered_smc(head, lambda theta, rows: torch.full((len(theta),), -1.234, dtype=torch.float64), 2,
                       n=2048, moves=5, seed=0)
    assert out["stages"] == 1 and torch.equal(out["log_z"], torch.full((2,), -1.234, dtype=torch.float64))
    s = out["theta"].reshape(-1, 3)
    ref = prior.sample(20000, np.random.default_rng(1))
    assert abs(float(s[:, 0].mean()) - 0.775) < 0.006 and abs(float(s[:, 0].std()) / 0.101 - 1) < 0.05
    assert bool((abs(s[:, 1:].std(0) / ref[:, 1:].std(0) - 1) < 0.05).all())


def test_an_observation_without_a_finite_likelihood_is_given_up_without_stalling_the_others():
    prior, means, sd, log_likelihood, _ = _q_shear_problem()
    head = CorrelatedLensHead(prior, 5)

    def broken_first(theta, rows):
        out = log_likelihood(theta, rows)
        return torch.where(rows == 0, torch.full_like(out, math.nan), out)

    out = tempered_smc(head, broken_first, 2, n=256, moves=2, seed=0, max_stages=100)
    assert out["failed"].tolist() == [True, False] and out["stages"] < 40
    assert float(out["log_z"][0]) == -math.inf and math.isfinite(float(out["log_z"][1]))
    assert float(out["beta"][1]) == 1.0
    assert bool(((out["theta"][1].mean(0) - means[1]).abs() < 0.5 * sd).all())


def _slow_and_fast():
    """The q-shear problem with the second observation's likelihood 20x narrower (more stages to beta = 1):
    head, means, sds, the likelihood and the (2,) tensor counting its calls per observation."""
    prior, means, sd, log_likelihood, _ = _q_shear_problem()
    calls = torch.zeros(2, dtype=torch.long)

    def counted(theta, rows):
        calls.add_(torch.bincount(rows, minlength=2))
        narrow = log_likelihood(theta, rows)
        return torch.where(rows == 1, 400.0 * narrow, narrow)

    return CorrelatedLensHead(prior, 5), means, sd, counted, calls


def test_a_finished_observation_is_not_evaluated_while_a_slower_one_goes_on():
    """Two observations, the second's likelihood 20x narrower (more stages to beta = 1): once the first has
    reached beta = 1 and made that stage's moves, the likelihood is never called for it again. The calls per
    row are what ``evaluations`` reports, n (1 + moves x its own stages), and the first row's particles
    still hold its posterior."""
    head, means, sd, counted, calls = _slow_and_fast()

    out = tempered_smc(head, counted, 2, n=256, moves=3, seed=0)
    assert out["beta"].tolist() == [1.0, 1.0]
    assert torch.equal(calls, out["evaluations"]) and int(calls[0]) < int(calls[1])
    assert int(calls[1]) == 256 * (1 + 3 * out["stages"])
    assert bool(((out["theta"][0].mean(0) - means[0]).abs() < 0.5 * sd).all())


def test_final_moves_are_made_once_per_row_at_the_stage_that_reaches_beta_one():
    """With a slow and a fast row, each row's calls are n (1 + moves x its stages + final_moves): the final
    moves come once, when that row reaches beta = 1; the particles after them still hold the posterior
    (means within 0.25 sd, sds within 15 %)."""
    head, means, sd, counted, calls = _slow_and_fast()

    out = tempered_smc(head, counted, 2, n=512, moves=2, final_moves=7, seed=1)
    assert torch.equal(calls, out["evaluations"])
    assert int(calls[1]) == 512 * (1 + 2 * out["stages"] + 7)
    assert (int(calls[0]) - 512 * (1 + 7)) % (512 * 2) == 0 and int(calls[0]) < int(calls[1])
    s = out["theta"][0]
    assert bool(((s.mean(0) - means[0]).abs() < 0.25 * sd).all())
    assert bool((((s.std(0) / sd) - 1).abs() < 0.15).all()), s.std(0) / sd
    # the final moves refresh the resampled duplicates: nearly every particle distinct, fewer without them
    distinct = len(torch.unique(s, dim=0))
    without = tempered_smc(head, counted, 2, n=512, moves=2, seed=1)["theta"][0]
    assert distinct > 0.95 * 512 and distinct > len(torch.unique(without, dim=0)) + 50, distinct
    with pytest.raises(ValueError, match="final_moves >= 0"):
        tempered_smc(head, counted, 1, final_moves=-1)


def test_pool_runs_weights_each_run_by_its_evidence():
    """Runs with Z in the ratio 1 : 3 : 0 give 25 and 75 of a 100-particle cloud, each a subset of its own
    run's particles without repeats; a NaN or +inf log Z counts as 0; one run is returned unchanged whatever
    its log Z; no finite evidence among several runs is an error."""
    theta = torch.arange(3 * 100 * 2, dtype=torch.float64).reshape(3, 100, 2)
    cloud = pool_runs(theta, torch.tensor([0.0, math.log(3.0), -math.inf]), torch.Generator().manual_seed(0))
    assert cloud.shape == (100, 2)
    run = (cloud[:, 0] // 200).long()
    assert torch.bincount(run, minlength=3).tolist() == [25, 75, 0]
    assert len(torch.unique(cloud[:, 0])) == 100
    cloud = pool_runs(theta, torch.tensor([0.0, math.log(2.0), math.log(2.0)]), torch.Generator().manual_seed(0))
    assert torch.bincount((cloud[:, 0] // 200).long(), minlength=3).tolist() == [20, 40, 40]
    cloud = pool_runs(theta, torch.tensor([0.0, math.nan, math.inf]), torch.Generator().manual_seed(0))
    assert torch.bincount((cloud[:, 0] // 200).long(), minlength=3).tolist() == [100, 0, 0]
    assert torch.equal(pool_runs(theta[:1], torch.tensor([-math.inf])), theta[0])
    with pytest.raises(ValueError, match="no run has a finite evidence"):
        pool_runs(theta, torch.full((3,), -math.inf))


def test_the_bench_pools_independent_runs_per_observation():
    """The calibration bench's ``infer_group`` with three runs on two observations: each record keeps its three
    log Z, their log-mean-exp as log Z, the evaluations of all three runs, and samples at its own posterior."""
    from pipeline.bench.lens_marginal_calibration import infer_group

    prior, means, sd, log_likelihood, _ = _q_shear_problem()

    class Evidence:            # what infer_group uses of GaussianSourceEvidence, on observations 5 and 9
        def __init__(self):
            self.prior = prior

        def log_likelihood(self, theta, rows):
            return log_likelihood(theta, (rows == 9).long())

    head = CorrelatedLensHead(prior, 5, components=2, hidden=16)
    recs = infer_group(Evidence(), head, [5, 9], particles=128, moves=3, samples=32, seed=0, runs=3)
    one = infer_group(Evidence(), head, [5, 9], particles=128, moves=3, samples=32, seed=0)
    for b, (r, r1) in enumerate(zip(recs, one)):
        assert r["row"] == (5, 9)[b] and len(r["log_z_runs"]) == 3 and len(r["samples"]) == 32
        runs = torch.tensor(r["log_z_runs"], dtype=torch.float64)
        assert math.isclose(r["log_z"], float(torch.logsumexp(runs, 0)) - math.log(3))
        assert max(r["log_z_runs"]) - min(r["log_z_runs"]) < 2.0              # one mode: the runs agree
        assert r["evaluations"] > 2.5 * r1["evaluations"]
        s = torch.tensor(r["samples"])
        assert bool(((s.mean(0) - means[b]).abs() < 0.6 * sd).all()), (b, s.mean(0), means[b])


def test_the_bench_pools_only_runs_that_reached_beta_one(monkeypatch):
    """A run stopped at beta < 1 carries the evidence of a tempered target (here far above the finished run's):
    the bench pools and averages only the finished runs, and keeps every run's log Z in the record."""
    from pipeline.bench import lens_marginal_calibration as bench

    prior = _q_shear_problem()[0]
    theta = torch.stack([torch.full((16, 3), 0.1), torch.full((16, 3), 0.9)]).double()   # run 0, run 1

    def fake_smc(head, log_likelihood, G, **kw):
        return {"theta": theta, "beta": torch.tensor([1.0, 0.4], dtype=torch.float64),
                "log_z": torch.tensor([-50.0, -5.0], dtype=torch.float64), "failed": torch.tensor([False, False]),
                "collapsed": torch.zeros(2, dtype=torch.long), "stages": 3,
                "acceptance": torch.full((2,), 0.3, dtype=torch.float64), "evaluations": torch.full((2,), 64)}

    class Evidence:
        def __init__(self):
            self.prior = prior

    monkeypatch.setattr(bench, "tempered_smc", fake_smc)
    rec = bench.infer_group(Evidence(), None, [0], particles=16, moves=1, samples=8, seed=0, runs=2)[0]
    assert rec["log_z"] == -50.0 and rec["log_z_runs"] == [-50.0, -5.0] and rec["beta"] == 1.0
    samples = torch.tensor(rec["samples"], dtype=torch.float64)
    assert torch.allclose(samples, torch.full((8, 3), 0.1, dtype=torch.float64))
    assert rec["evaluations"] == 128
