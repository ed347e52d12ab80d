"""RTB objective: the two-pass chunked gradient equals naive full backprop (float64)."""

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.objective import (deltas_scalar, deltas_vargrad, loss_value, naive_loss, policy_rollout,
                                    prior_rollout, trajectory_weights, two_pass_backward)
from pipeline.rtb.posterior import MLPCorrection, RTBPosterior

problem = DenseLinearProblem([[1.0, 0.5]], 0.5)  # the observation's operator, passed with every call


def _posterior(cond_dim=0, seed=0, K=12):
    torch.manual_seed(seed)
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 0.5)
    chain = prior.schedule.chain(K)
    model = MLPCorrection(2, cond_dim=cond_dim, feat_dim=4, hidden=16, layers=2).double()
    torch.nn.init.normal_(model.out.weight, std=0.3)  # perturbed: q != p, so the test is not vacuous
    torch.nn.init.normal_(model.out.bias, std=0.1)
    post = RTBPosterior(prior, chain, model, features=("x0hat", "grad"))
    with torch.no_grad():
        post.log_z.fill_(0.7)
    return post


def _grads(post):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in post.parameters()]


@pytest.mark.parametrize("chunk", [1, 3, 11, 50])
def test_two_pass_equals_naive(chunk):
    post = _posterior()
    y = torch.tensor([1.0], dtype=torch.float64)
    batch = policy_rollout(post, 16, y, problem=problem, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta = deltas_scalar(batch, post.log_z)
    post.zero_grad()
    loss2 = two_pass_backward(post, batch, delta, chunk_size=chunk)
    g2 = _grads(post)
    post.zero_grad()
    loss1 = naive_loss(post, batch)
    loss1.backward()
    g1 = _grads(post)
    assert loss2 == pytest.approx(float(loss1.detach()), rel=1e-12)
    assert any(float(g.abs().max()) > 1e-3 for g in g1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    # log Z's gradient is counted once whatever the number of chunks: d loss / d log Z = mean(delta)
    assert float(post.log_z.grad) == pytest.approx(float(delta.mean()), rel=1e-10)


def test_two_pass_equals_naive_off_policy_and_amortized():
    post = _posterior(cond_dim=1)
    y = torch.tensor([[1.0], [-0.5]], dtype=torch.float64).repeat_interleave(8, 0)
    batch = prior_rollout(post, 16, y, cond=y, problem=problem, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _assert_two_pass_equals_naive(post, batch)


def _assert_two_pass_equals_naive(post, batch):
    """The two-pass gradient of 1/2 delta^2 equals one-graph backprop (float64)."""
    delta = deltas_scalar(batch, post.log_z)
    post.zero_grad()
    two_pass_backward(post, batch, delta, chunk_size=4)
    g2 = _grads(post)
    post.zero_grad()
    naive_loss(post, batch).backward()
    for a, b in zip(g2, _grads(post)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_pass_two_log_q_matches_pass_one():
    post = _posterior()
    batch = policy_rollout(post, 8, torch.tensor([0.3]), problem=problem, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    for k in range(2, post.chain.K + 1):
        kk = torch.full((8,), k, dtype=torch.long)
        lq = post.log_q_step(batch.xs[k], batch.xs[k - 1], kk, batch.eps_p[k], batch.y, problem=batch.problem)
        torch.testing.assert_close(lq.detach(), batch.log_q_steps[k], rtol=1e-12, atol=1e-10)


def test_dead_zone_masks_small_deltas():
    post = _posterior()
    batch = policy_rollout(post, 16, torch.tensor([1.0]), problem=problem, generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64)
    delta = deltas_scalar(batch, post.log_z)
    c = float(delta.pow(2).median())
    post.zero_grad()
    two_pass_backward(post, batch, delta, chunk_size=5, dead_zone=c)
    keep = (delta ** 2 > c).double()
    assert float(post.log_z.grad) == pytest.approx(float((delta * keep).mean()), rel=1e-10)
    assert 0 < keep.sum() < 16


def test_vargrad_delta_is_zero_mean_per_group_and_gradient_matches():
    post = _posterior(cond_dim=1)
    y = torch.tensor([[1.0], [-0.5], [2.0], [0.0]], dtype=torch.float64).repeat_interleave(4, 0)
    groups = torch.arange(4).repeat_interleave(4)
    batch = policy_rollout(post, 16, y, cond=y, groups=groups, problem=problem, generator=torch.Generator().manual_seed(5),
                           dtype=torch.float64)
    delta, logz = deltas_vargrad(batch)
    for g in range(4):
        assert abs(float(delta[groups == g].sum())) < 1e-9
    # log Z_g is the loss-minimising constant of each group
    s = batch.log_ratio() - batch.log_r
    for g in range(4):
        assert float(logz[g]) == pytest.approx(-float(s[groups == g].mean()), rel=1e-12)
    post.zero_grad()
    two_pass_backward(post, batch, delta, chunk_size=3, learn_log_z=False)
    g2 = _grads(post)
    post.zero_grad()
    naive_loss(post, batch, log_z=logz[groups]).backward()
    for a, b in zip(g2[1:], _grads(post)[1:]):  # skip the unused scalar log Z
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert post.log_z.grad is None or float(post.log_z.grad) == 0.0


@pytest.mark.parametrize("method", ["dps", "dps_cla"])
def test_guided_parameterisation_two_pass_equals_naive(method):
    """RTB+DPS(+CLA): the frozen-prior guidance is part of q's mean, cached from the rollout."""
    from pipeline.rtb.posterior import make_frozen_guidance

    post = _posterior()
    post.guidance = make_frozen_guidance(method, post.chain, 0.5)
    with torch.no_grad():  # zero correction: q is the guided prior chain, so log q != log p already
        post.model.out.weight.zero_()
        post.model.out.bias.zero_()
    y = torch.tensor([1.0], dtype=torch.float64)
    batch = policy_rollout(post, 16, y, problem=problem, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert all(batch.guide[k] is not None for k in range(2, post.chain.K + 1))
    assert float(batch.log_ratio().abs().max()) > 1e-3
    torch.nn.init.normal_(post.model.out.weight, std=0.3)
    batch = policy_rollout(post, 16, y, problem=problem, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _assert_two_pass_equals_naive(post, batch)


def test_behaviour_policy_is_scored_under_q():
    """A DPS-guided behaviour rollout: states follow the guided mean, log q is q_phi's own."""
    post = _posterior()
    y = torch.tensor([1.0], dtype=torch.float64)
    shift = 0.3

    def behaviour(x, k, eps_p, yy, _problem):
        return torch.full_like(x, shift)

    b = policy_rollout(post, 8, y, behaviour=behaviour, problem=problem, generator=torch.Generator().manual_seed(8),
                       dtype=torch.float64)
    for k in range(2, post.chain.K + 1):
        kk = torch.full((8,), k, dtype=torch.long)
        lq = post.log_q_step(b.xs[k], b.xs[k - 1], kk, b.eps_p[k], b.y, problem=b.problem).detach()
        torch.testing.assert_close(b.log_q_steps[k], lq, rtol=1e-12, atol=1e-10)


def test_conditioning_given_once_or_per_sample_is_not_confused_at_a_batch_equal_to_its_channels():
    """An image posterior conditioned on a 2-channel map, sampled 2 at a time: the map given once
    (2, H, W) is broadcast, not read as two per-sample 1-channel maps; given per sample (2, 2, H, W)
    it is used as is; any other shape is refused with both accepted shapes named."""
    from pipeline.diffusion.network_prior import NetworkPrior
    from pipeline.diffusion.schedule import NoiseSchedule
    from pipeline.diffusion.unet import build_unet
    from pipeline.rtb.posterior import UNetCorrection
    from pipeline.vision.operators import MaskInpainting

    torch.manual_seed(0)
    prior = NetworkPrior(build_unet("tiny", base_channels=8), NoiseSchedule(T=200, beta_end=0.03), (1, 8, 8))
    head = UNetCorrection(1, cond_channels=2, preset="tiny", base_channels=8)
    for p in head.parameters():  # perturbed, so the conditioning changes the step means
        torch.nn.init.normal_(p, std=0.05)
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[:, :, :4] = True
    post, problem = RTBPosterior(prior, prior.schedule.chain(4), head), MaskInpainting(keep)
    assert post.cond_shape == (2, 8, 8)
    y = torch.zeros(1, 8, 8)
    cond = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(c):
        with torch.no_grad():
            b = policy_rollout(post, 2, y, cond=c, problem=problem, generator=torch.Generator().manual_seed(2))
        return b.xs[0], b.log_p_steps  # final samples; prior log-probs of the steps taken

    (x_once, lp_once), (x_per, lp_per) = run(cond), run(cond.unsqueeze(0).expand(2, 2, 8, 8))
    torch.testing.assert_close(x_once, x_per)
    for k in lp_once:
        torch.testing.assert_close(lp_once[k], lp_per[k])
    # the conditioning matters (so the equality above is not vacuous)
    assert not torch.allclose(x_once, run(torch.flip(cond, [0]))[0])
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 2, 8, 8\)"):
        run(torch.randn(3, 2, 8, 8))


@pytest.mark.parametrize("dead_zone", [0.0, 0.05])
def test_huber_two_pass_equals_naive_and_bounds_each_trajectory(dead_zone):
    """With a Huber bound h the two-pass gradient is that of mean_b huber_h(delta_b) (float64), each
    trajectory's weight is clamped to [-h, h], and an outlier trajectory's weight does not grow with it."""
    post = _posterior()
    y = torch.tensor([1.0], dtype=torch.float64)
    batch = policy_rollout(post, 16, y, problem=problem, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    delta = deltas_scalar(batch, post.log_z)
    h = float(delta.abs().median())  # half the trajectories on the linear branch
    post.zero_grad()
    loss2 = two_pass_backward(post, batch, delta, chunk_size=4, dead_zone=dead_zone, huber=h)
    g2 = _grads(post)
    # d loss / d log Z = mean of the clamped, dead-zoned weights, counted once
    assert float(post.log_z.grad) == pytest.approx(float(trajectory_weights(delta, dead_zone, h).mean()), rel=1e-10)
    post.zero_grad()
    naive = naive_loss(post, batch, huber=h)
    naive.backward()
    if dead_zone == 0.0:
        assert loss2 == pytest.approx(float(naive.detach()), rel=1e-12)
        for a, b in zip(g2, _grads(post)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    w = trajectory_weights(delta, dead_zone, h)
    assert float(w.abs().max()) <= h * (1 + 1e-12)
    assert int((w.abs() == h).sum()) >= 7
    # the loss is continuous and its derivative in each delta is the weight (central differences)
    eps = 1e-6
    for b in range(16):
        up, dn = delta.clone(), delta.clone()
        up[b] += eps
        dn[b] -= eps
        fd = (loss_value(up, dead_zone, h) - loss_value(dn, dead_zone, h)) / (2 * eps) * 16
        assert fd == pytest.approx(float(w[b]), abs=1e-5)
    # a trajectory a million nats off moves the step no more than one at h
    far = delta.clone()
    far[0] = 1e6
    assert float(trajectory_weights(far, dead_zone, h)[0]) == pytest.approx(h)
    assert loss_value(far, dead_zone, h) < 1e6 * h  # linear, not quadratic, in the outlier


def test_huber_recipe_hash_is_unchanged_while_off():
    from pipeline.rtb.config import RTBConfig
    cfg = RTBConfig()
    assert "huber" not in cfg.recipe()["objective"]
    on = cfg.with_fields(huber=50.0)
    assert on.recipe()["objective"]["huber"] == 50.0 and on.recipe_hash() != cfg.recipe_hash()


def test_huber_vargrad_log_z_is_the_m_estimate_and_an_outlier_only_moves_itself():
    post = _posterior(cond_dim=1)
    y = torch.tensor([[1.0], [-0.5]], dtype=torch.float64).repeat_interleave(8, 0)
    groups = torch.arange(2).repeat_interleave(8)
    batch = policy_rollout(post, 16, y, cond=y, groups=groups, problem=problem,
                           generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    h = 0.5
    batch.log_r[0] -= 1e7  # one wildly wrong draw in group 0
    delta, logz = deltas_vargrad(batch, huber=h)
    w = trajectory_weights(delta, 0.0, h)
    for g in range(2):  # the loss-minimising constant: the clamped weights sum to zero per group
        assert abs(float(w[groups == g].sum())) < 1e-9
    assert float(w[0]) == pytest.approx(h)
    # the other seven of group 0 are centred as if the outlier were a trajectory at +h (not at 1e7 / 8)
    assert float(delta[1:8].abs().max()) < 1e3
    mean_delta, _ = deltas_vargrad(batch)
    assert float(mean_delta[1:8].abs().min()) > 1e6
    # the gradient is that of mean_b huber(delta_b) at these log Z_g (float64)
    post.zero_grad()
    two_pass_backward(post, batch, delta, chunk_size=3, learn_log_z=False, huber=h)
    g2 = _grads(post)
    post.zero_grad()
    naive_loss(post, batch, log_z=logz[groups], huber=h).backward()
    for a, b in zip(g2[1:], _grads(post)[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_huber_location_is_the_middle_of_a_flat_root_and_exact_for_one_trajectory():
    from pipeline.rtb.objective import _huber_location
    s = torch.tensor([0.0, 0.0, 10.0, 10.0, 1e6], dtype=torch.float64)
    inv = torch.tensor([0, 0, 0, 0, 1])
    loc = _huber_location(s, inv, 2, 1.0)
    torch.testing.assert_close(s[:4] + loc[0], torch.tensor([-5.0, -5.0, 5.0, 5.0], dtype=torch.float64))
    assert float(s[4] + loc[1]) == 0.0
