"""The sampler registry and the one interface every training-free method shares."""

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.errors import PipelineError
from pipeline.problems import DenseLinearProblem
from pipeline.samplers import METHODS, PARTICLE_METHODS, RTB_METHODS, TRAINING_FREE, make_sampler
from pipeline.samplers.base import Sampler, Samples
from pipeline.samplers.tuning import tune_on_separate_seed

K = 12
OPTS = {"dps": {"scale": 0.3}, "dps_cla": {"scale": 1.0}, "prior_is": {"particles": 4}, "fps_smc": {"particles": 4}}


@pytest.fixture(scope="module")
def setup():
    prior = GaussianMixturePrior([0.5, 0.5], torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), 0.5)
    chain = prior.schedule.chain(K)
    prob = DenseLinearProblem(torch.tensor([[1.0, 0.2]]), torch.tensor([0.5]))
    return prior, chain, prob


def test_method_names():
    assert METHODS == ("rtb", "rtb_amortized", "rtb_dps", "rtb_dps_cla", "rtb_amortized_is", "rtb_amortized_smc",
                       "rtb_amortized_gn",
                       "dps", "dps_cla", "cla", "exact_guidance", "prior_is", "fps", "fps_smc", "inversion")
    assert set(TRAINING_FREE) | set(RTB_METHODS) == set(METHODS)


def test_registry_errors(setup):
    prior, chain, _ = setup
    for name in RTB_METHODS:
        with pytest.raises(PipelineError, match="pipeline.rtb"):
            make_sampler(name, prior, chain)
    with pytest.raises(PipelineError, match="unknown sampling method 'dsp'"):
        make_sampler("dsp", prior, chain)
    with pytest.raises(PipelineError, match="unknown option.*particles"):
        make_sampler("dps", prior, chain, particles=3)
    with pytest.raises(PipelineError, match="no heuristic scale"):
        tune_on_separate_seed("cla", prior, chain, setup[2], 0, n_obs=1)


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_interface_contract(setup, name):
    prior, chain, prob = setup
    s = make_sampler(name, prior, chain, **OPTS.get(name, {}))
    assert isinstance(s, Sampler) and s.name == name
    n = 40
    y = torch.tensor([2.0])
    out = s.sample(prob, y, n, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, Samples) and out.x0.shape == (n, 2)
    assert out.log_r.dtype == torch.float64 and out.log_r.shape == (n,)
    assert torch.allclose(out.log_r, prob.log_likelihood(out.x0, y))
    assert out.info["method"] == name
    if name == "inversion":  # its own Gaussian prior, no diffusion chain: exact draws, no network call
        assert out.nfe == 0 and not out.has_trajectory_density and out.log_w is None
    elif name in PARTICLE_METHODS:
        assert out.nfe >= K
        assert out.log_w is not None and out.log_w.shape == (n,)
        assert out.info["particles"] == OPTS[name]["particles"] and out.nfe == OPTS[name]["particles"] * K
    else:
        assert out.nfe >= K
        assert out.has_trajectory_density and out.log_q_traj.dtype == torch.float64
        assert torch.isfinite(out.log_q_traj).all() and torch.isfinite(out.log_p_traj).all()
    # reproducible from the generator
    again = s.sample(prob, y, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.x0, again.x0)


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_batched_over_observations(setup, name):
    # One call, one observation per sample: the two halves must follow their own y (posterior modes at +-3).
    prior, chain, prob = setup
    n = 200
    y = torch.cat([torch.full((n // 2, 1), 3.0), torch.full((n // 2, 1), -3.0)])
    out = make_sampler(name, prior, chain, **OPTS.get(name, {})).sample(prob, y, n,
                                                                         generator=torch.Generator().manual_seed(1))
    assert out.x0[: n // 2, 0].mean() > 1.5 and out.x0[n // 2:, 0].mean() < -1.5
    with pytest.raises(PipelineError, match="observation y has shape"):
        make_sampler(name, prior, chain, **OPTS.get(name, {})).sample(prob, torch.zeros(3, 1), n)


@pytest.mark.parametrize("name", ["dps", "dps_cla", "cla", "exact_guidance", "fps"])
def test_samples_do_not_depend_on_other_batch_members(setup, name):
    # Same noise, different observations for members 1..n-1: member 0's sample is unchanged (per-sample guidance).
    prior, chain, prob = setup
    n = 16
    y1 = torch.full((n, 1), 1.0)
    y2 = y1.clone()
    y2[1:] = torch.linspace(-8, 8, n - 1)[:, None]
    s = make_sampler(name, prior, chain, **OPTS.get(name, {}))
    a = s.sample(prob, y1, n, generator=torch.Generator().manual_seed(3))
    b = s.sample(prob, y2, n, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a.x0[0], b.x0[0], atol=1e-5) and not torch.allclose(a.x0[1:], b.x0[1:])
    assert torch.allclose(a.log_q_traj[0], b.log_q_traj[0], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TRAINING_FREE)
def test_runs_on_cuda(setup, name):
    prior, chain, prob = setup
    out = make_sampler(name, prior, chain, device="cuda", **OPTS.get(name, {})).sample(
        prob, torch.tensor([1.0]), 8, generator=torch.Generator().manual_seed(0))
    assert out.x0.device.type == "cuda" and torch.isfinite(out.x0).all()
