"""Replay buffer and backtracking behave as specified."""

import math

import pytest
import torch

from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.rtb.exploration import ReplayBuffer, backtrack


def test_buffer_fifo_capacity_and_nonfinite_dropped():
    buf = ReplayBuffer(capacity=6)
    x = torch.arange(10, dtype=torch.float32)[:, None]
    r = torch.arange(10, dtype=torch.float64)
    r[3] = float("nan")
    buf.add(x, r)
    assert len(buf) == 6
    assert buf.x1[:, 0].tolist() == [4, 5, 6, 7, 8, 9]  # oldest evicted first; NaN entry (3) dropped
    assert buf.n_added == 9
    buf.add(torch.tensor([[42.0]]), torch.tensor([-math.inf]))
    assert len(buf) == 6 and buf.n_added == 9


def test_buffer_rank_priorities_and_sampling_frequencies():
    buf = ReplayBuffer(capacity=100, priority_frac=1.0, kappa=0.01)
    r = torch.tensor([-5.0, 0.0, -100.0, -1.0], dtype=torch.float64)  # ranks 2, 0, 3, 1
    buf.add(torch.zeros(4, 1), r)
    p = buf.priorities()
    w = 1.0 / (0.04 + torch.tensor([2.0, 0.0, 3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(p, w / w.sum())
    assert int(p.argmax()) == 1
    idx = buf.sample_indices(20000, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=4).double() / 20000
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    # scale invariance: multiplying rewards by 100 changes nothing (ranks only)
    buf2 = ReplayBuffer(capacity=100, priority_frac=1.0, kappa=0.01)
    buf2.add(torch.zeros(4, 1), 100 * r)
    torch.testing.assert_close(buf2.priorities(), p)


def test_buffer_uniform_part_and_state_roundtrip():
    buf = ReplayBuffer(capacity=10, priority_frac=0.0)
    buf.add(torch.randn(5, 2), torch.tensor([0.0, -1.0, -2.0, -3.0, -50.0]), y=torch.arange(5.0)[:, None])
    idx = buf.sample_indices(10000, torch.Generator().manual_seed(1))
    freq = torch.bincount(idx, minlength=5).double() / 10000
    assert float((freq - 0.2).abs().max()) < 0.02
    ent = buf.sample(3, torch.Generator().manual_seed(2))
    torch.testing.assert_close(ent["y"][:, 0], ent["idx"].double().float())
    other = ReplayBuffer(capacity=10)
    other.load_state_dict(buf.state_dict())
    torch.testing.assert_close(other.x1, buf.x1)
    torch.testing.assert_close(other.log_r, buf.log_r)
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=3).sample(1)


def test_backtracking_is_the_strided_forward_markov_chain():
    chain = NoiseSchedule().chain(10)
    n, d = 40000, 2
    x1 = torch.tensor([[1.5, -0.5]], dtype=torch.float64).expand(n, d)
    xs = backtrack(chain, x1, generator=torch.Generator().manual_seed(0))
    assert sorted(xs) == list(range(1, 11))
    ab1 = float(chain.abar[1])
    for k in range(2, 11):
        ratio = float(chain.abar[k]) / ab1
        # marginal of x_k given x_1: N(sqrt(abar_k/abar_1) x_1, (1 - abar_k/abar_1) I)
        torch.testing.assert_close(xs[k].mean(0), math.sqrt(ratio) * x1[0], atol=0.02, rtol=0)
        torch.testing.assert_close(xs[k].var(0), torch.full((d,), 1 - ratio, dtype=torch.float64), atol=0.02,
                                   rtol=0.03)
    # increments e_k = x_k - sqrt(a_k) x_{k-1} ~ N(0, b_k I), fresh noise each step (uncorrelated)
    inc = {k: (xs[k] - math.sqrt(float(chain.a[k])) * xs[k - 1]) / math.sqrt(float(chain.b[k])) for k in range(2, 11)}
    for k in range(2, 11):
        assert float(inc[k].var(0).max()) == pytest.approx(1.0, abs=0.03)
    for k in range(2, 10):
        c = float(torch.corrcoef(torch.stack([inc[k][:, 0], inc[k + 1][:, 0]]))[0, 1])
        assert abs(c) < 0.03
