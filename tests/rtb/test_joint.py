"""Joint RTB over (theta, source) on a toy with an exact joint posterior: the quadrature reference, the
theta head's exact log-prob, the PMMH reference and trained joint RTB, each against the quadrature."""

import math

import pytest
import torch

from pipeline.bench.joint_toy import (JointToy, make_policy, monte_carlo, policy_theta_moments, quadrature,
                                      run_pmmh)
from pipeline.rtb.joint import (BoundedThetaHead, UniformBox, choose_n_trajectories, ess, joint_log_z, joint_loss,
                                joint_rollout, pmmh, policy_log_weights, prior_chain_log_weights, train_joint)
from pipeline.rtb.objective import deltas_vargrad


@pytest.fixture(scope="module")
def toy_obs():
    toy = JointToy()
    theta, ys = toy.observations(4, seed=0)
    return toy, ys


def _perturbed_head(box, y_dim, seed):
    torch.manual_seed(seed)
    head = BoundedThetaHead(box, y_dim, components=3, hidden=16)
    for prm in head.net[-1].parameters():
        torch.nn.init.normal_(prm, std=0.5)
    return head


@pytest.mark.slow
def test_quadrature_matches_brute_force_monte_carlo(toy_obs):
    toy, ys = toy_obs
    for i in (1, 2):
        ref = quadrature(toy, ys[i])
        mc = monte_carlo(toy, ys[i], 100_000, seed=1 + i)
        se = ref["std"] / math.sqrt(mc["ess"])  # the weighted mean's standard error
        assert abs(mc["mean"] - ref["mean"]) < 5 * se
        assert mc["std"] / ref["std"] == pytest.approx(1.0, abs=0.05)
        assert mc["log_evidence"] == pytest.approx(ref["log_evidence"], abs=5 / math.sqrt(mc["ess"]))
        coarse = quadrature(toy, ys[i], n_grid=501)  # the grid is fine enough: 4x fewer points agree
        assert coarse["mean"] == pytest.approx(ref["mean"], abs=1e-4 * ref["std"])
        assert coarse["log_evidence"] == pytest.approx(ref["log_evidence"], abs=1e-5)


def test_theta_head_log_prob_is_normalised_on_the_box():
    box = UniformBox([-1.0], [2.0])
    head = _perturbed_head(box, 3, seed=0)
    y = torch.randn(2, 3, dtype=torch.float64)
    grid = torch.linspace(-1.0, 2.0, 40_001, dtype=torch.float64)[1:-1, None]
    with torch.no_grad():
        for row in y:
            dens = head.log_prob(grid, row.expand(len(grid), -1)).exp()
            h = 3.0 / 40_000
            assert float(dens.sum() * h) == pytest.approx(1.0, abs=1e-3)
            # sampling draws from the same density: the sample mean matches the density's mean
            th = head.sample(row.expand(40_000, -1), torch.Generator().manual_seed(1))
            mean = float((dens * grid[:, 0]).sum() * h)
            sd = math.sqrt(float((dens * (grid[:, 0] - mean) ** 2).sum() * h))
            assert float(th.mean()) == pytest.approx(mean, abs=5 * sd / math.sqrt(40_000))
            assert bool(((th > -1) & (th < 2)).all())
        outside = head.log_prob(torch.tensor([[-1.5], [2.5]], dtype=torch.float64), y)
        assert bool(torch.isneginf(outside).all())


def test_theta_head_log_prob_is_normalised_in_two_dimensions():
    box = UniformBox([0.0, -1.0], [1.0, 1.0])
    head = _perturbed_head(box, 2, seed=3)
    n = 801
    a = torch.linspace(0.0, 1.0, n, dtype=torch.float64)[1:-1]
    b = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)[1:-1]
    grid = torch.cartesian_prod(a, b)
    with torch.no_grad():
        dens = head.log_prob(grid, torch.zeros(len(grid), 2, dtype=torch.float64)).exp()
    assert float(dens.sum() * (1.0 / (n - 1)) * (2.0 / (n - 1))) == pytest.approx(1.0, abs=1e-2)


def test_joint_loss_is_rtb_with_vargrad_log_z_over_the_whole_trajectory(toy_obs):
    toy, ys = toy_obs
    policy = make_policy(toy, seed=0)
    y = ys[:2].repeat_interleave(8, 0)
    groups = torch.arange(2).repeat_interleave(8)
    batch = joint_rollout(policy, toy.log_lik, y, groups=groups, generator=torch.Generator().manual_seed(0))
    K = toy.K
    assert sorted(batch.log_q_steps) == list(range(2, K + 2))  # x steps 2..K and theta as step K+1
    loss, log_z = joint_loss(policy, batch)
    delta, _ = deltas_vargrad(batch)
    assert float(loss.detach()) == pytest.approx(float(0.5 * (delta ** 2).mean()), rel=1e-12)
    # by hand: log Z_g = mean_g(log r + log p - log q), with theta's prior and head in log p / log q
    theta = batch.info["theta"]
    s = (batch.log_r + toy.box.log_prob(theta) - policy.theta_head.log_prob(theta, y).detach()
         + sum(batch.log_p_steps[k] - batch.log_q_steps[k] for k in range(2, K + 1)))
    torch.testing.assert_close(log_z, s.view(2, 8).mean(1), rtol=1e-12, atol=1e-12)
    loss.backward()
    assert any(float(p.grad.abs().max()) > 0 for p in policy.theta_head.parameters())


@pytest.mark.slow
def test_pmmh_matches_quadrature(toy_obs):
    toy, ys = toy_obs
    for i in (0, 2):
        ref = quadrature(toy, ys[i])
        mh = run_pmmh(toy, ys[i], n_iter=8000, seed=i)
        assert mh["var_log_z"] <= 2.0
        assert abs(mh["mean"] - ref["mean"]) <= 0.2 * ref["std"]
        assert 0.8 <= mh["std"] / ref["std"] <= 1.25
        assert mh["ess"] >= 500
        assert 0.1 < mh["acceptance"] < 0.7


def test_pmmh_reuses_the_current_estimate():
    """Only proposals are estimated (one estimate each, none for the current state): the cost is n_traj times
    (1 + proposals inside the support); a lucky (overestimated) start keeps its Z^, so the chain stays put."""
    toy = JointToy()
    y = toy.observations(1, seed=0)[1][0]
    calls = []
    base = prior_chain_log_weights(toy.chain, toy.log_lik, y)

    def counting(theta, n, gen):
        calls.append(float(theta[0]))
        return base(theta, n, gen)

    out = pmmh(toy.box.log_prob, counting, torch.tensor([0.5]), n_traj=4, step=0.3, n_iter=200, seed=0)
    assert out["trajectories"] == 4 * len(calls)
    assert len(calls) <= 201  # one for the start and at most one per iteration
    lucky = []

    def lucky_start(theta, n, gen):
        lucky.append(1)
        return base(theta, n, gen) + (30.0 if len(lucky) == 1 else 0.0)

    stuck = pmmh(toy.box.log_prob, lucky_start, torch.tensor([0.5]), n_traj=4, step=0.3, n_iter=200, seed=0)
    assert stuck["acceptance"] == 0.0 and out["acceptance"] > 0.1
    with pytest.raises(ValueError, match="outside the prior's support"):
        pmmh(toy.box.log_prob, base, torch.tensor([3.0]), n_traj=4, step=0.3, n_iter=2)


@pytest.fixture(scope="module")
def trained(toy_obs):
    """Joint RTB amortized over the four observations, 400 steps (about 6 s)."""
    toy, ys = toy_obs
    policy = make_policy(toy, seed=0)
    losses = train_joint(policy, toy.log_lik, ys, steps=400, seed=0)
    return policy, losses


@pytest.mark.slow
def test_joint_rtb_matches_quadrature_marginal_of_theta(toy_obs, trained):
    toy, ys = toy_obs
    policy, losses = trained
    assert sum(losses[-20:]) / 20 < 0.05 * sum(losses[:20]) / 20
    for i in range(4):
        ref = quadrature(toy, ys[i])
        q = policy_theta_moments(policy, ys[i], n=20_000)
        assert abs(q["mean"] - ref["mean"]) <= 0.2 * ref["std"], i
        assert 0.8 <= q["std"] / ref["std"] <= 1.25, i
        # log Z of the joint sampler is the evidence with theta marginalised
        assert joint_log_z(policy, toy.log_lik, ys[i], 20_000) == pytest.approx(ref["log_evidence"], abs=0.1)


@pytest.mark.slow
def test_pmmh_on_the_trained_theta_conditional_sampler(toy_obs, trained):
    """PMMH with the trained policy's x-steps at fixed theta as the sampler: few trajectories per estimate."""
    toy, ys = toy_obs
    policy, _ = trained
    ref = quadrature(toy, ys[0])
    mode = ref["grid"][int(ref["density"].argmax())].reshape(1)
    lw = policy_log_weights(policy, toy.log_lik, ys[0])
    n_traj, var = choose_n_trajectories(lw, mode, target_var=0.5, n0=1)
    assert n_traj <= 8 and var <= 0.5  # the prior chain needs 16 for Var <= 2 here
    out = pmmh(toy.box.log_prob, lw, mode, n_traj=n_traj, step=2.4 * ref["std"], n_iter=8000, seed=0)
    th = out["theta"][:, 0]
    assert abs(float(th.mean()) - ref["mean"]) <= 0.2 * ref["std"]
    assert 0.8 <= float(th.std()) / ref["std"] <= 1.25
    assert ess(th) >= 500
