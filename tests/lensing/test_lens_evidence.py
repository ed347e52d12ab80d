"""The evidence of an observation at another lens (:mod:`pipeline.lensing.lens_evidence`)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.bench.smc_evidence_gaussian import exact_log_z, gaussian_case
from pipeline.lensing.config import LensingConfig
from pipeline.lensing.lens_evidence import DiffusionSourceEvidence, problem_at_lens
from pipeline.lensing.observation import load_observation
from pipeline.lensing.operator import LensParams

from tests.lensing.small_observation import GEOM, write_small_observation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # caustics on NumPy 2

SIGMA = 0.5  # per image pixel: about one sigma of signal per pixel, where 16 particles give Var(log Z^) near 1


def test_problem_at_the_files_own_lens_is_the_files_problem(tmp_path):
    """Rebuilt at the lens the file names, the problem has the file's operator, noise, mask and brightness
    map; at another lens its operator differs."""
    problem, y, meta = load_observation(write_small_observation(tmp_path / "obs.fits"), LensingConfig(geometry=GEOM))
    same = problem_at_lens(problem, meta, meta["lens"])
    x = torch.randn(3, *problem.x_shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.forward(x), problem.forward(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(same.sigma, problem.sigma) and torch.equal(same.mask, problem.mask)
    assert (same.scale, same.offset, same.x_shape) == (problem.scale, problem.offset, problem.x_shape)
    other = problem_at_lens(problem, meta, LensParams(**{**meta["lens"].as_dict(), "rein": 0.6}))
    assert (other.forward(x) - problem.forward(x)).abs().max() > 0.1 * problem.forward(x).abs().max()


@pytest.mark.slow  # ~15 s: 64 SMC runs on a 256-pixel source
def test_evidence_at_two_lenses_matches_the_exact_gaussian_evidence():
    """For a Gaussian source prior the evidence at any lens is exact (a Gaussian marginal of y), and the Gaussian
    step proposal describes every step exactly: over 32 runs of 16 particles the estimate's mean Z^ / Z is 1
    within 4 standard errors plus 0.01 and Var(log Z^) is below 0.01 (measured about 4e-5), at the true lens and
    at a lens 0.08" larger whose exact evidence is lower by more than 5 nats, with both lenses in one batch
    (each run its own operator)."""
    post, problem, y, meta, law, lens_prior, truth = gaussian_case(SIGMA)
    thetas = torch.stack([truth, truth + torch.tensor([0.08, 0.0], dtype=torch.float64)])
    ev = DiffusionSourceEvidence(lens_prior, post, [(problem, y, meta)], particles=16, batch=64,
                                 generator=torch.Generator().manual_seed(7))
    exact = [exact_log_z(problem_at_lens(problem, meta, lens_prior.to_lens(t)), y, law) for t in thetas]
    assert exact[0] - exact[1] > 5
    est = ev.log_evidence(thetas.repeat(32, 1), torch.zeros(64, dtype=torch.long))  # the two lenses interleaved
    for i in range(2):
        ratio = torch.exp(est[i::2] - exact[i])
        se = float(ratio.std()) / math.sqrt(32)
        assert abs(float(ratio.mean()) - 1) < 4 * se + 0.01, (i, float(ratio.mean()), se)
        assert float(est[i::2].var()) < 0.01
    assert ev.calls == 64


@pytest.mark.slow  # ~10 s
def test_at_high_signal_to_noise_the_gaussian_step_keeps_the_evidence_exact():
    """At sigma 0.05 (about 14 sigma of signal per pixel), 16 particles of the Gaussian step give log Z^ within
    0.05 nats of the exact evidence with Var(log Z^) below 0.01, at both lenses; the policy's diagonal steps
    give runs thousands of nats^2 apart (Var above 100) at the true lens."""
    post, problem, y, meta, law, lens_prior, truth = gaussian_case(sigma=0.05)
    thetas = torch.stack([truth, truth + torch.tensor([0.02, 0.0], dtype=torch.float64)])
    ev = DiffusionSourceEvidence(lens_prior, post, [(problem, y, meta)], particles=16, batch=32,
                                 generator=torch.Generator().manual_seed(8))
    assert ev.proposal == "gaussian"
    est = ev.log_evidence(thetas.repeat(16, 1), torch.zeros(32, dtype=torch.long))
    for i in range(2):
        exact = exact_log_z(problem_at_lens(problem, meta, lens_prior.to_lens(thetas[i])), y, law)
        assert float(est[i::2].var()) < 0.01
        assert abs(float(est[i::2].mean()) - exact) < 0.05, (i, float(est[i::2].mean()), exact)
    policy = DiffusionSourceEvidence(lens_prior, post, [(problem, y, meta)], particles=16, batch=16, proposal="policy",
                                     generator=torch.Generator().manual_seed(8))
    assert float(policy.log_evidence(thetas[:1].repeat(16, 1), torch.zeros(16, dtype=torch.long)).var()) > 100


def test_the_policy_proposal_with_a_head_is_refused():
    post, problem, y, meta, _, lens_prior, _ = gaussian_case(SIGMA)
    post.use_head = True
    with pytest.raises(ValueError, match="conditioning input"):
        DiffusionSourceEvidence(lens_prior, post, [(problem, y, meta)], particles=4, proposal="policy")
