"""RTB objective: the two-pass chunked gradient equals naive full backprop (float64)."""

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.objective import (deltas_scalar, deltas_vargrad, naive_loss, policy_rollout, prior_rollout,
                                    two_pass_backward)
from pipeline.rtb.posterior import MLPCorrection, RTBPosterior


def _posterior(cond_dim=0, seed=0, K=12):
    torch.manual_seed(seed)
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 0.5)
    chain = prior.schedule.chain(K)
    problem = DenseLinearProblem([[1.0, 0.5]], 0.5)
    model = MLPCorrection(2, cond_dim=cond_dim, feat_dim=4, hidden=16, layers=2).double()
    torch.nn.init.normal_(model.out.weight, std=0.3)  # perturbed: q != p, so the test is not vacuous
    torch.nn.init.normal_(model.out.bias, std=0.1)
    post = RTBPosterior(prior, chain, model, problem=problem, features=("x0hat", "grad"))
    with torch.no_grad():
        post.log_z.fill_(0.7)
    return post


def _grads(post):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in post.parameters()]


@pytest.mark.parametrize("chunk", [1, 3, 11, 50])
def test_two_pass_equals_naive(chunk):
    post = _posterior()
    y = torch.tensor([1.0], dtype=torch.float64)
    batch = policy_rollout(post, 16, y, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
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
    batch = prior_rollout(post, 16, y, cond=y, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
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
    batch = policy_rollout(post, 8, torch.tensor([0.3]), generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    for k in range(2, post.chain.K + 1):
        kk = torch.full((8,), k, dtype=torch.long)
        lq = post.log_q_step(batch.xs[k], batch.xs[k - 1], kk, batch.eps_p[k], batch.y)
        torch.testing.assert_close(lq.detach(), batch.log_q_steps[k], rtol=1e-12, atol=1e-10)


def test_dead_zone_masks_small_deltas():
    post = _posterior()
    batch = policy_rollout(post, 16, torch.tensor([1.0]), generator=torch.Generator().manual_seed(4),
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
    batch = policy_rollout(post, 16, y, cond=y, groups=groups, generator=torch.Generator().manual_seed(5),
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
    post.guidance = make_frozen_guidance(method, post.chain, post.problem, 0.5)
    with torch.no_grad():  # zero correction: q is the guided prior chain, so log q != log p already
        post.model.out.weight.zero_()
        post.model.out.bias.zero_()
    y = torch.tensor([1.0], dtype=torch.float64)
    batch = policy_rollout(post, 16, y, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert all(batch.guide[k] is not None for k in range(2, post.chain.K + 1))
    assert float(batch.log_ratio().abs().max()) > 1e-3
    torch.nn.init.normal_(post.model.out.weight, std=0.3)
    batch = policy_rollout(post, 16, y, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _assert_two_pass_equals_naive(post, batch)


def test_behaviour_policy_is_scored_under_q():
    """A DPS-guided behaviour rollout: states follow the guided mean, log q is q_phi's own."""
    post = _posterior()
    y = torch.tensor([1.0], dtype=torch.float64)
    shift = 0.3

    def behaviour(x, k, eps_p, yy):
        return torch.full_like(x, shift)

    b = policy_rollout(post, 8, y, behaviour=behaviour, generator=torch.Generator().manual_seed(8),
                       dtype=torch.float64)
    for k in range(2, post.chain.K + 1):
        kk = torch.full((8,), k, dtype=torch.long)
        lq = post.log_q_step(b.xs[k], b.xs[k - 1], kk, b.eps_p[k], b.y).detach()
        torch.testing.assert_close(b.log_q_steps[k], lq, rtol=1e-12, atol=1e-10)


def _posterior_step_cov(seed=0, K=8, dim=3):
    """A posterior with a learned full step covariance, perturbed away from the identity factor."""
    torch.manual_seed(seed)
    prior = GaussianMixturePrior([0.5, 0.5], [[-1.0] * dim, [1.0] * dim], 0.5)
    chain = prior.schedule.chain(K)
    problem = DenseLinearProblem([[1.0] + [0.5] * (dim - 1)], 0.5)
    model = MLPCorrection(dim, feat_dim=2 * dim, hidden=16, layers=2, out_mult=2, step_cov_K=K, readout=True,
                          chain_t=chain.t.tolist(), T=prior.schedule.T).double()
    torch.nn.init.normal_(model.out.weight, std=0.2)
    torch.nn.init.normal_(model.per_step_cov.raw, std=0.3)
    torch.nn.init.normal_(model.per_step_readout.weight, std=0.2)
    post = RTBPosterior(prior, chain, model, problem=problem, features=("x0hat", "grad"), learn_variance=True)
    return post


def test_full_step_covariance_log_q_is_the_correlated_gaussian_density():
    """With a learned factor L_k, q's step is N(mean, diag(s) L_k L_k^T diag(s)): the sampled steps'
    log q equals torch's MultivariateNormal density, and pass two reproduces it."""
    post = _posterior_step_cov()
    y = torch.tensor([0.4], dtype=torch.float64)
    batch = policy_rollout(post, 6, y, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for k in (post.chain.K, 4, 2):
        x, x_prev = batch.xs[k], batch.xs[k - 1]
        mean, std = post.step_params(x, k, batch.eps_p[k], batch.y)
        L = post.step_cov.factor(k).detach()
        for b in range(x.shape[0]):
            scale = torch.diag(std[b].detach()) @ L
            mvn = torch.distributions.MultivariateNormal(mean[b].detach(), scale_tril=scale)
            assert float(batch.log_q_steps[k][b]) == pytest.approx(float(mvn.log_prob(x_prev[b])), rel=1e-10)
        kk = torch.full((6,), k, dtype=torch.long)
        lq = post.log_q_step(x, x_prev, kk, batch.eps_p[k], batch.y)
        torch.testing.assert_close(lq.detach(), batch.log_q_steps[k], rtol=1e-12, atol=1e-10)


def test_two_pass_equals_naive_with_full_step_covariance():
    post = _posterior_step_cov(seed=1)
    y = torch.tensor([0.4], dtype=torch.float64)
    batch = policy_rollout(post, 12, y, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _assert_two_pass_equals_naive(post, batch)
    assert float(post.step_cov.raw.grad.abs().max()) > 0  # the factor is trained
    assert float(post.model.per_step_readout.weight.grad.abs().max()) > 0  # and the readout


def test_per_step_readout_and_factor_start_at_the_prior():
    """Zero-initialised per-step parts: q's step equals the prior chain's, whatever the state."""
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import make_posterior

    prior = GaussianMixturePrior([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], 0.5)
    problem = DenseLinearProblem([[1.0, 0.5]], 0.5)
    cfg = RTBConfig(K=6, step_cov="full", per_step_readout=True, learn_variance=True, head_hidden=8)
    post = make_posterior(prior, problem, cfg)
    batch = policy_rollout(post, 32, torch.tensor([0.3]), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(batch.log_q(), batch.log_p(), rtol=1e-6, atol=1e-6)
    assert "per_step_lr_factor" in cfg.hash_fields() and "per_step_lr_factor" not in RTBConfig().hash_fields()


def test_full_step_covariance_refused_for_image_posteriors():
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import posterior_spec

    class _ImagePrior:
        event_shape = (1, 8, 8)

    with pytest.raises(ValueError, match="step_cov"):
        posterior_spec(_ImagePrior(), RTBConfig(step_cov="full"))
