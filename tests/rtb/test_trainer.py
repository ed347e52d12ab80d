"""RTB trainer: reaches the chain-prior reference posterior on a 1-D mixture; rollback; checkpoints."""

import json
import math

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import rollout
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.errors import InputFileError
from pipeline.metrics import wasserstein_1d
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig, legacy_v1_hash
from pipeline.rtb.posterior import make_posterior, posterior_spec
from pipeline.rtb.sampler import RTBSampler
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.trainer import RTBTrainer


def _problem():
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0], [2.0]], 0.25)
    return prior, DenseLinearProblem([[1.0]], 1.0), torch.tensor([-0.5])


@pytest.mark.slow
@pytest.mark.parametrize("huber", [0.0, 0.2])
def test_rtb_reaches_chain_reference_on_1d_mixture(huber):
    """W1(RTB, reference) <= 2 x the Monte-Carlo floor at N = 2000, seed 0 (chain-prior reference by IS);
    also with a Huber bound of 0.2 nats, which clamps 70 % of the first 50 steps' trajectories and a third
    of the last 50 (measured): the bound changes the path, not the fixed point."""
    torch.manual_seed(0)
    prior, problem, y = _problem()
    cfg = RTBConfig().with_fields(steps=400, batch_size=256, lr=3e-3, lr_final_frac=0.05, lr_logz=0.05,
                                  head_hidden=64, head_layers=2, seed=0, huber=huber)
    post = make_posterior(prior, prior.schedule.chain(20), cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y)
    summary = trainer.train()
    assert summary["rollbacks"] == 0 and not summary["diverged"]
    # reference: importance sampling of prior-chain trajectories (1-D: plain prior proposals suffice)
    g = torch.Generator().manual_seed(5)
    N, M = 2000, 400000
    tr = rollout(prior, post.chain, M, generator=g, keep_states=False)
    lr = problem.log_likelihood(tr.x0, y)
    w = torch.softmax(lr, 0)
    ref1 = tr.x0[torch.multinomial(w, N, True, generator=g), 0]
    ref2 = tr.x0[torch.multinomial(w, N, True, generator=g), 0]
    floor = float(wasserstein_1d(ref1, ref2))
    logz_ref = float(torch.logsumexp(lr, 0) - math.log(M))
    smp = RTBSampler(post).sample(problem, y, N, generator=torch.Generator().manual_seed(7))
    w1 = float(wasserstein_1d(smp.x0[:, 0], ref1))
    assert w1 <= 2 * floor, (w1, floor)
    _, est = trainer.evaluate(4000)
    assert abs(est.iw - logz_ref) < 0.05
    assert abs(summary["log_z"] - logz_ref) < 0.15  # learned scalar ~ ELBO side of log Z


CHAIN = NoiseSchedule().chain(8)


def _small_cfg(**kw):
    base = dict(steps=20, batch_size=32, head_hidden=16, head_layers=1, checkpoint_every=10, log_every=1,
                snapshot_every=5, seed=3, replay_rate=0.3, tempered_rate=0.2, prior_rate=0.1)
    base.update(kw)
    return RTBConfig().with_fields(**base)


def test_rollback_on_nonfinite_then_divergence(tmp_path):
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=40)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y, metrics_path=tmp_path / "m.jsonl")
    trainer.train(10)
    good = {n: p.detach().clone() for n, p in post.model.named_parameters()}
    good_logz = float(post.log_z.detach())
    orig = problem.log_likelihood
    problem.log_likelihood = lambda x, yy: orig(x, yy) * float("nan")  # poison the reward
    assert trainer.train_step() is None
    assert trainer.rollbacks == 1 and not trainer.diverged
    assert trainer.lr_scale == pytest.approx(cfg.guards.rollback_lr_factor)
    for n, p in post.model.named_parameters():  # restored to the snapshot taken at step 10
        torch.testing.assert_close(p.detach(), good[n])
    assert float(post.log_z.detach()) == good_logz
    trainer.train_step()
    trainer.train_step()
    assert trainer.rollbacks == 3 and not trainer.diverged
    trainer.train_step()  # still non-finite after 3 rollbacks: diverged
    assert trainer.diverged and trainer.rollbacks == 3
    summary = trainer.train()  # the loop stops at once
    assert summary["diverged"] and summary["steps"] == 10
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["rollback"] * 3 + ["diverged"]
    problem.log_likelihood = orig


def test_rollback_on_loss_spike():
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=30, spike_factor=10.0, spike_warmup=10, replay_rate=0.0, tempered_rate=0.0,
                     prior_rate=0.0)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y)
    trainer.train(15)
    orig = problem.log_likelihood
    problem.log_likelihood = lambda x, yy: orig(x, yy) - 1e3 * torch.rand(x.shape[0], dtype=torch.float64)
    assert trainer.train_step() is None and trainer.rollbacks == 1
    problem.log_likelihood = orig
    assert trainer.train_step() is not None


def test_loss_spike_after_the_rollback_budget_stops_at_the_last_good_state(tmp_path):
    """Divergence: only non-finite values after 3 rollbacks mean divergence. A 4th loss spike
    restores the last good snapshot and ends training there; the run is not marked diverged."""
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=40, spike_factor=10.0, spike_warmup=10, replay_rate=0.0, tempered_rate=0.0,
                     prior_rate=0.0)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y, metrics_path=tmp_path / "m.jsonl")
    trainer.train(15)
    orig = problem.log_likelihood
    problem.log_likelihood = lambda x, yy: orig(x, yy) - 1e3 * torch.rand(x.shape[0], dtype=torch.float64)
    for _ in range(3):
        assert trainer.train_step() is None
    assert trainer.rollbacks == 3 and not trainer.stopped_early
    good = {n: p.detach().clone() for n, p in post.model.named_parameters()}
    assert trainer.train_step() is None  # the 4th spike
    problem.log_likelihood = orig
    assert trainer.stopped_early and not trainer.diverged and trainer.rollbacks == 3
    for n, p in post.model.named_parameters():
        torch.testing.assert_close(p.detach(), good[n])
    summary = trainer.train()  # the loop does not resume training
    assert summary["stopped_early"] and not summary["diverged"] and summary["steps"] == 15
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["rollback"] * 3 + ["stopped"]


def test_no_snapshot_of_a_state_wrecked_during_the_spike_warmup():
    """An outlier batch during the warmup (no spike check yet) is trained on; the snapshot due right
    after it is skipped, so a later rollback returns to the last healthy snapshot, not the wrecked one."""
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=40, spike_factor=10.0, spike_warmup=30, snapshot_every=5, replay_rate=0.0,
                     tempered_rate=0.0, prior_rate=0.0)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y)
    trainer.train(14)
    assert trainer._snapshot["step"] == 10
    orig = problem.log_likelihood
    problem.log_likelihood = lambda x, yy: orig(x, yy) - 1e4 * torch.rand(x.shape[0], dtype=torch.float64)
    assert trainer.train_step() is not None  # step 15, inside the warmup: trained on, not checked
    problem.log_likelihood = orig
    assert trainer.step_idx == 15 and trainer._snapshot["step"] == 10  # the outlier step is not snapshotted
    trainer.train(20)
    assert trainer._snapshot["step"] == 20  # healthy steps are snapshotted again


def test_checkpoint_resume_is_exact(tmp_path, caplog):
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=30, ema_decay=0.9)
    post = make_posterior(prior, CHAIN, cfg)
    spec = posterior_spec(prior, CHAIN, cfg)
    a = RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec)
    a.train(20)  # checkpoints at 10 and 20
    b_post = make_posterior(prior, CHAIN, cfg)
    b = RTBTrainer(b_post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec)
    with caplog.at_level("INFO", logger="pipeline.rtb"):
        assert b.resume() and b.step_idx == 20
    assert float(b_post.log_z.detach()) == float(post.log_z.detach())  # log Z restored, not reset to 0
    assert f"log Z {float(post.log_z.detach()):.4f}" in caplog.text  # one log Z: the one it resumed
    assert len(b.buffer) == len(a.buffer)
    a.train(30)
    b.train(30)
    for (n, p), (_, q) in zip(post.model.named_parameters(), b_post.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert float(b_post.log_z.detach()) == float(post.log_z.detach())
    # the posterior rebuilds from the checkpoint alone (EMA weights by default)
    loaded, hp = load_posterior(tmp_path / "run", prior)
    assert hp["kind"] == "rtb_posterior"
    for n, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, b.ema[n])
    # a different model/objective config is refused with a one-line error naming the field
    cfg2 = _small_cfg(steps=30, ema_decay=0.9, lr=5e-4)
    c = RTBTrainer(make_posterior(prior, CHAIN, cfg2), cfg2, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec)
    with pytest.raises(InputFileError, match="config_hash"):
        c.resume()


def test_amortized_vargrad_runs_and_sampler_reports_trajectory_densities():
    prior, problem, _ = _problem()
    cfg = _small_cfg(amortized=True, logz="vargrad", group_size=4, steps=6)
    post = make_posterior(prior, CHAIN, cfg, cond_dim=1)

    def obs_sampler(G, gen):
        x = prior.sample(G, generator=gen).float()
        return problem.simulate(x, generator=gen), None

    trainer = RTBTrainer(post, cfg, problem=problem, obs_sampler=obs_sampler)
    trainer.train()
    assert trainer.step_idx == 6
    smp = RTBSampler(post, "rtb_amortized", cond_fn=lambda _problem, yy: yy.reshape(yy.shape[0], -1)).sample(
        problem, torch.tensor([0.3]), 50, generator=torch.Generator().manual_seed(0))
    assert smp.x0.shape == (50, 1) and smp.has_trajectory_density
    assert torch.isfinite(smp.log_q_traj).all() and smp.log_r.dtype == torch.float64
    assert smp.nfe == 2 * CHAIN.K - 1


def test_rtb_config_validation_one_line_errors(tmp_path):
    from pipeline.config import load_section
    from pipeline.errors import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text("rtb:\n  exploration: {replay_rate: 0.6, prior_rate: 0.6}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'rtb.exploration.replay_rate'"):
        load_section(p, "rtb", RTBConfig)
    for body, field_name in (("objective: {amortized: true}", "rtb.objective.logz"),
                             ("policy: {features: [x0hat, bogus]}", "rtb.policy.features"),
                             ("policy: {learn_guidance_gain: maybe}", "rtb.policy.learn_guidance_gain"),
                             ("optim: {lr_per_step: -1}", "rtb.optim.lr_per_step"),
                             ("policy: {guidance_gain_init: 0}", "rtb.policy.guidance_gain_init"),
                             ("objective: {amortized: true, logz: vargrad, group_size: 8}\n  optim: {batch_size: 30}",
                              "rtb.objective.group_size"),
                             ("lr: 0.1", "rtb.lr"), ("K: 20", "rtb.K")):  # old flat keys are unknown now
        p.write_text(f"rtb:\n  {body}\n")
        with pytest.raises(ConfigError, match=field_name) as err:
            load_section(p, "rtb", RTBConfig)
        assert "\n" not in str(err.value)
    p.write_text("rtb:\n  policy: {guidance: dps_cla}\n  optim: {lr: 0.01}\n")
    cfg = load_section(p, "rtb", RTBConfig)
    assert cfg.policy.guidance == "dps_cla" and cfg.optim.lr == 0.01 and cfg.run.steps == 1000


def test_recipe_hash_is_versioned_and_ignores_what_does_not_change_the_result():
    cfg = _small_cfg()
    h = cfg.recipe_hash()
    assert h.startswith("v2-") and len(h) == 3 + 16
    # run length, logging, checkpoints, gradient chunking: the same recipe
    same = cfg.with_fields(steps=999, chunk_size=1, log_every=7, checkpoint_every=3, keep_checkpoints=9,
                           eval_samples=5)
    assert same.recipe_hash() == h
    for change in (dict(lr=5e-4), dict(seed=4), dict(head_hidden=32), dict(replay_rate=0.1),
                   dict(group_size=4), dict(spike_factor=3.0), dict(guidance="dps")):
        assert cfg.with_fields(**change).recipe_hash() != h, change
    # the legacy (unversioned) hash had the chain and chunk_size in it
    assert legacy_v1_hash(cfg, 8, "small") != legacy_v1_hash(cfg, 9, "small")
    assert legacy_v1_hash(cfg, 8, "small") != legacy_v1_hash(cfg.with_fields(chunk_size=3), 8, "small")
    assert "-" not in legacy_v1_hash(cfg, 8, "small")


def test_resume_accepts_the_legacy_hash_of_the_same_recipe_only(tmp_path):
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=4)
    trainer = RTBTrainer(make_posterior(prior, CHAIN, cfg), cfg, problem=problem, y=y)
    assert trainer._accepts_hash(cfg.recipe_hash())
    assert trainer._accepts_hash(legacy_v1_hash(cfg, CHAIN.K, CHAIN.variance))
    assert not trainer._accepts_hash(legacy_v1_hash(cfg, CHAIN.K + 1, CHAIN.variance))  # another chain
    assert not trainer._accepts_hash(legacy_v1_hash(cfg.with_fields(lr=5e-4), CHAIN.K, CHAIN.variance))
    assert not trainer._accepts_hash(cfg.with_fields(lr=5e-4).recipe_hash())
    assert not trainer._accepts_hash(None)


@pytest.mark.parametrize("huber", [0.0, 5.0])
def test_one_wild_draw_is_trained_on_with_a_huber_bound_and_a_degraded_policy_still_rolls_back(huber):
    """A batch with one trajectory a million nats off is a spike of the squared loss (rollback); with a
    Huber bound its share of the step is bounded, so the step is taken. Every trajectory off (the policy
    degraded as a whole) is a spike either way."""
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=40, spike_factor=10.0, spike_warmup=10, replay_rate=0.0, tempered_rate=0.0,
                     prior_rate=0.0, huber=huber)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y)
    trainer.train(15)
    orig = problem.log_likelihood
    problem.log_likelihood = lambda x, yy: orig(x, yy) - 1e6 * (torch.arange(x.shape[0]) == 0).double()
    before = [p.detach().clone() for p in post.model.parameters()]
    rec = trainer.train_step()
    if huber > 0:
        assert rec is not None and trainer.rollbacks == 0
        assert rec["grad_norm"] < 1e3  # the wild draw weighs huber / B, not 1e6 / B
        assert any(not torch.equal(a, p) for a, p in zip(before, post.model.parameters()))
    else:
        assert rec is None and trainer.rollbacks == 1
    problem.log_likelihood = lambda x, yy: orig(x, yy) - 1e3 * (1 + torch.rand(x.shape[0], dtype=torch.float64))
    assert trainer.train_step() is None and trainer.rollbacks == (1 if huber > 0 else 2)
    problem.log_likelihood = orig


@pytest.mark.parametrize("huber", [0.0, 5.0])
def test_an_observation_the_policy_cannot_fit_yet_is_trained_on_with_a_huber_bound(huber):
    """Amortized, 2 observations of 8 trajectories a batch. One observation whose every draw misfits by
    10^4-10^6 nats, and two wild draws of the other (10 of 16 trajectories off), is a spike of the squared
    loss; with a Huber bound the guard watches the lower median over observations of each one's median
    trajectory loss, so the step is taken. Every draw off is a spike either way."""
    prior, problem, _ = _problem()
    cfg = _small_cfg(amortized=True, logz="vargrad", group_size=8, batch_size=16, steps=40, spike_factor=1000.0,
                     spike_warmup=10, replay_rate=0.0, tempered_rate=0.0, prior_rate=0.0, huber=huber)
    post = make_posterior(prior, CHAIN, cfg, cond_dim=1)

    def obs_sampler(G, gen):
        x = prior.sample(G, generator=gen).float()
        return problem.simulate(x, generator=gen), None

    trainer = RTBTrainer(post, cfg, problem=problem, obs_sampler=obs_sampler)
    trainer.train(15)
    orig = problem.log_likelihood
    wild = 10 ** (4 + 2 * torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    problem.log_likelihood = lambda x, yy: orig(x, yy) - wild * (torch.arange(x.shape[0]) < 10).double()
    rec = trainer.train_step()
    if huber > 0:
        assert rec is not None and trainer.rollbacks == 0
    else:
        assert rec is None and trainer.rollbacks == 1
    problem.log_likelihood = lambda x, yy: orig(x, yy) - wild
    assert trainer.train_step() is None and trainer.rollbacks == (1 if huber > 0 else 2)
    problem.log_likelihood = orig


def test_huber_spike_guard_ignores_the_dead_zone():
    """With a dead zone, a well-fit batch has most trajectory losses at 0; the guard's statistic must not
    read 0 there (a zero running median would make the next ordinary batch a spike)."""
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=40, huber=5.0, dead_zone=1.0)
    trainer = RTBTrainer(make_posterior(prior, CHAIN, cfg), cfg, problem=problem, y=y)
    delta = torch.tensor([0.1, -0.2, 0.3, 2.0], dtype=torch.float64)
    assert trainer._spike_statistic(delta, 0.0, torch.zeros(4, dtype=torch.long)) > 0


def test_training_without_the_head_is_refused_but_nothing_to_train_returns(tmp_path):
    """rtb.policy.use_head false: the head is not sampled, so a run with steps left is a one-line config
    error naming the field; asked for no steps (nothing to train) the trainer just returns."""
    from pipeline.errors import ConfigError
    prior, problem, y = _problem()
    cfg = _small_cfg(steps=2, use_head=False)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y)
    with pytest.raises(ConfigError, match="rtb.policy.use_head"):
        trainer.train()
    assert trainer.step_idx == 0
    assert trainer.train(0)["steps"] == 0
