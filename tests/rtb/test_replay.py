"""Amortized replay keeps the reward signal: a replayed group holds distinct stored x_1 of ONE
observation, so its VarGrad delta depends on their rewards (a group of copies of one x_1 would not)."""

import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.exploration import ReplayBuffer
from pipeline.rtb.objective import deltas_vargrad
from pipeline.rtb.posterior import make_posterior
from pipeline.rtb.trainer import RTBTrainer


def _amortized_trainer(**kw):
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0], [2.0]], 0.25)
    problem = DenseLinearProblem([[1.0]], 1.0)
    base = dict(steps=12, batch_size=16, head_hidden=16, head_layers=1, log_every=1, snapshot_every=5,
                seed=3, amortized=True, logz="vargrad", group_size=4, replay_rate=0.5, prior_rate=0.0,
                tempered_rate=0.0)
    base.update(kw)
    cfg = RTBConfig().with_fields(**base)
    post = make_posterior(prior, prior.schedule.chain(8), cfg, cond_dim=1)

    def obs_sampler(G, gen):
        return problem.simulate(prior.sample(G, generator=gen).float(), generator=gen), None

    return RTBTrainer(post, cfg, problem=problem, obs_sampler=obs_sampler), cfg


def test_replay_groups_are_distinct_states_of_one_observation_and_delta_sees_rewards():
    trainer, cfg = _amortized_trainer(replay_rate=0.0)
    trainer.train(3)  # on-policy batches fill the buffer: 3 x 4 observations x 4 trajectories
    assert trainer.buffer.obs_id is not None and int(trainer.buffer.obs_id.unique().numel()) == 12
    batch = trainer.draw_batch("replay")
    assert batch.n == cfg.optim.batch_size
    groups = torch.as_tensor(batch.groups)
    for g in groups.unique():
        m = groups == g
        assert int(m.sum()) == cfg.objective.group_size
        ys = batch.y[m]
        assert torch.equal(ys, ys[:1].expand_as(ys))  # one observation per group
        distinct = torch.unique(batch.x1[m].reshape(int(m.sum()), -1), dim=0).shape[0]
        assert distinct == cfg.objective.group_size
    delta, _ = deltas_vargrad(batch)
    # the rewards matter: one member's reward raised by 1 nat moves every delta of its group (by 1/4 or 3/4)
    bumped = batch.log_r.clone()
    bumped[0] += 1.0
    batch_b = type(batch)(**{**batch.__dict__, "log_r": bumped})
    delta_b, _ = deltas_vargrad(batch_b)
    diff = (delta_b - delta).double()
    in_g0 = groups == groups[0]
    torch.testing.assert_close(diff[0], torch.tensor(-0.75, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(diff[in_g0][1:], torch.full((cfg.objective.group_size - 1,), 0.25, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    assert float(diff[~in_g0].abs().max()) == 0.0
    # and across the batch the within-group rewards differ (distinct x_1 under one y)
    spread = [float(batch.log_r[groups == g].std()) for g in groups.unique()]
    assert min(spread) > 1e-6


def test_amortized_training_exercises_replay():
    trainer, cfg = _amortized_trainer(replay_rate=0.6, steps=16)
    seen, draw = [], trainer.draw_batch

    def recording(source):
        b = draw(source)
        if source == "replay":
            seen.append(b)
        return b

    trainer.draw_batch = recording
    trainer.train()
    replayed = [r for r in trainer.history if r["source"] == "replay"]
    assert len(replayed) >= 3 and len(seen) == len(replayed)
    assert all(r["loss"] > 1e-8 for r in replayed)
    for b in seen:  # every replayed group carries distinct rewards, so its delta depends on them
        g = torch.as_tensor(b.groups)
        assert min(float(b.log_r[g == k].std()) for k in g.unique()) > 1e-6


def test_replay_buffer_groups_and_old_state_without_ids():
    buf = ReplayBuffer(capacity=100, priority_frac=0.5)
    y = torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0], [2.0]])
    buf.add(torch.arange(6.0)[:, None], torch.arange(6.0), y, y, groups=torch.tensor([0, 0, 0, 1, 1, 2]))
    gen = torch.Generator().manual_seed(0)
    out = buf.sample_groups(20, 4, gen)
    for g in out["groups"].unique():
        m = out["groups"] == g
        assert int(m.sum()) in (2, 3)  # observation 2 (one entry) is never a group; no entry twice
        assert out["idx"][m].unique().numel() == int(m.sum())
        assert out["y"][m].unique().numel() == 1
    state = buf.state_dict()
    del state["obs_id"], state["n_obs"]
    old = ReplayBuffer(100)
    old.load_state_dict(state)  # a buffer saved before ids existed: ids from equal y
    assert old.obs_id.tolist() == [0, 0, 0, 1, 1, 2]


def test_replay_buffer_keeps_image_and_lens_index_apart_through_a_checkpoint():
    """Entries store y as the image and the lens index of a per-sample problem separately; both survive
    state_dict/load_state_dict and come back together from group sampling. A buffer saved with the
    index packed into slot 0 of a flat y (the old layout) is read into the same form."""
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    ys = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(0))[groups]  # one image per observation
    lens = torch.tensor([4, 4, 4, 1, 1, 7])
    buf = ReplayBuffer(capacity=100, priority_frac=0.5)
    buf.add(torch.arange(6.0)[:, None], torch.arange(6.0), ys, None, groups=groups, lens=lens)
    back = ReplayBuffer(100)
    back.load_state_dict(buf.state_dict(), y_shape=(3, 2))
    assert torch.equal(back.y, ys) and back.lens.tolist() == lens.tolist()
    assert back.obs_id.tolist() == buf.obs_id.tolist()
    out = back.sample_groups(10, 3, torch.Generator().manual_seed(1))
    assert torch.equal(out["y"], ys[out["idx"]]) and torch.equal(out["lens"], lens[out["idx"]])
    old_state = {**buf.state_dict(), "y": torch.cat([lens[:, None].float(), ys.reshape(6, -1)], 1)}
    del old_state["lens"], old_state["obs_id"], old_state["n_obs"]
    old = ReplayBuffer(100)
    old.load_state_dict(old_state, y_shape=(3, 2))
    assert torch.equal(old.y, ys) and old.lens.tolist() == lens.tolist()
    assert old.obs_id.tolist() == [1, 1, 1, 0, 0, 2]  # ids from equal packed y: entries of one observation share
