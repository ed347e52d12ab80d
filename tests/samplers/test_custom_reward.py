"""A reward of one's own: the docs/custom_reward.md example runs as written, and RewardProblem plugs
into the registry's samplers (RTB and the guided ones)."""

import math
import re
from pathlib import Path

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.errors import PipelineError
from pipeline.metrics.logz import estimate_logz_samples
from pipeline.samplers import make_sampler
from pipeline.samplers.reward import RewardProblem

DOC = Path(__file__).resolve().parents[2] / "docs" / "custom_reward.md"


@pytest.mark.slow
def test_the_documented_example_runs_and_moves_the_samples_to_the_reward(capsys):
    """Prior: modes at x_0 = -2 and 2 (std 0.5); reward N(x_0; 1, 0.5^2). The exact posterior keeps the
    right mode (the left one's weight is e^-8 of it), with x_0 mean (2 + 1) / 2 = 1.5 (equal variances).
    After 150 RTB steps from q = prior (whose mean is 0): mean within 0.25 of 1.5."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    ns = {}
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the documented example itself
    out = ns["out"]
    assert out.x0.shape == (2000, 2) and out.log_r.dtype == torch.float64
    assert abs(float(out.x0[:, 0].mean()) - 1.5) < 0.25
    assert "mean x_0:" in capsys.readouterr().out


def test_guided_samplers_take_a_reward_and_need_its_gradient_only_for_dps():
    prior = GaussianMixturePrior([0.5, 0.5], torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.5)
    chain = prior.schedule.chain(10)

    def log_r(x):
        return -0.5 * ((x[:, 0] - 1.0) / 0.5) ** 2

    def grad(x):
        g = torch.zeros_like(x)
        g[:, 0] = -(x[:, 0] - 1.0) / 0.25
        return g

    with_grad, plain = RewardProblem(log_r, grad), RewardProblem(log_r)
    gen = torch.Generator().manual_seed(0)
    out = make_sampler("dps", prior, chain, scale=1.0).sample(with_grad, with_grad.y, 1000, generator=gen)
    assert out.x0[:, 0].mean() > 1.0 and torch.isfinite(out.log_q_traj).all()
    assert torch.allclose(out.log_r, log_r(out.x0).double())
    with pytest.raises(PipelineError, match="no gradient"):
        make_sampler("dps", prior, chain).sample(plain, plain.y, 4, generator=gen)
    is_ = make_sampler("prior_is", prior, chain, particles=16).sample(plain, plain.y, 500, generator=gen)
    assert is_.x0[:, 0].mean() > 1.0 and math.isfinite(is_.info["logz"]["iw"])
    est = estimate_logz_samples(out)
    assert est.elbo <= is_.info["logz"]["iw"] + 0.5
    with pytest.raises(PipelineError, match="expected \\(3,\\)"):
        RewardProblem(lambda x: x).log_likelihood(torch.zeros(3, 2))
