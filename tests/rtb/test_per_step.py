"""Per-chain-step scalars of the RTB posterior: a log-gain on the frozen guidance (``learn_guidance_gain``).
Their effect on the step law, their checkpointing, their rollback, and that training moves the gain the
right way."""

import math

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.objective import policy_rollout
from pipeline.rtb.posterior import make_posterior, posterior_spec
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.trainer import RTBTrainer


CHAIN = NoiseSchedule().chain(8)


def _setup(**kw):
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 0.5)
    problem = DenseLinearProblem([[1.0, 0.5]], 0.5)
    base = dict(steps=20, batch_size=32, head_hidden=16, head_layers=1, guidance="dps_cla",
                guidance_scale=1.0, learn_guidance_gain=True, seed=1, log_every=5,
                checkpoint_every=10, snapshot_every=5)
    base.update(kw)
    cfg = RTBConfig().with_fields(**base)
    return prior, problem, torch.tensor([0.7]), cfg


def _elbo(post, problem, y) -> float:
    """Mean ELBO of 4,000 on-policy trajectories at the observation y of problem (fixed seed)."""
    with torch.no_grad():
        b = policy_rollout(post, 4000, y, problem=problem, generator=torch.Generator().manual_seed(9))
    return float((b.log_r - b.log_ratio()).double().mean())


def test_per_step_scalars_set_the_step_law_for_int_and_tensor_k():
    prior, problem, y, cfg = _setup()
    post = make_posterior(prior, CHAIN, cfg)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 4
    eps_p = prior.eps(x, post.timesteps(k, 5, x.device))
    guide = post.guide(x, k, eps_p, y, problem=problem)
    m0, s0 = post.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    m_noguide, _ = post.step_params(x, k, eps_p, y, problem=problem, guide=None)
    with torch.no_grad():
        post.guidance_log_gain[k] = math.log(0.5)
    m1, s1 = post.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    # the guidance offset is halved; the std is not the gain's business
    torch.testing.assert_close(m1 - m_noguide, 0.5 * (m0 - m_noguide), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=0, atol=0)
    # per-sample chain indices (the chunked second pass) give the same law
    kk = torch.full((5,), k, dtype=torch.long)
    m2, s2 = post.step_params(x, kk, eps_p, y, problem=problem, guide=guide)
    torch.testing.assert_close(m2, m1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2.expand_as(x), s1.expand_as(x), rtol=1e-5, atol=1e-7)


def test_per_step_gain_is_off_by_default_and_part_of_the_recipe():
    assert RTBConfig().policy.learn_guidance_gain is False
    on = RTBConfig().with_fields(learn_guidance_gain=True)
    assert on.recipe()["policy"]["learn_guidance_gain"] is True and on.recipe_hash() != RTBConfig().recipe_hash()
    prior, problem, y, cfg = _setup(learn_guidance_gain=False)
    assert make_posterior(prior, CHAIN, cfg).per_step_parameters() == {}
    # no guidance: no gain to learn
    _, _, _, cfg2 = _setup(guidance="none")
    assert make_posterior(prior, CHAIN, cfg2).per_step_parameters() == {}


def test_guidance_gain_init_scales_the_starting_guidance_and_is_validated():
    prior, problem, y, cfg = _setup()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 3
    base = make_posterior(prior, CHAIN, cfg)
    eps_p = prior.eps(x, base.timesteps(k, 5, x.device))
    guide = base.guide(x, k, eps_p, y, problem=problem)
    m_noguide, _ = base.step_params(x, k, eps_p, y, problem=problem, guide=None)
    m1, _ = base.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    weak_cfg = cfg.with_fields(guidance_gain_init=0.25)
    assert weak_cfg.recipe()["policy"]["guidance_gain_init"] == 0.25
    weak = make_posterior(prior, CHAIN, weak_cfg)
    torch.testing.assert_close(weak.guidance_log_gain, torch.full((CHAIN.K + 1,), math.log(0.25)))
    m_weak, _ = weak.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    torch.testing.assert_close(m_weak - m_noguide, 0.25 * (m1 - m_noguide), rtol=1e-5, atol=1e-6)
    # the spec carries it, so a rebuilt posterior starts from the same gain
    assert posterior_spec(prior, CHAIN, weak_cfg)["guidance_gain_init"] == 0.25
    # the config rejects a gain <= 0 with a one-line error (test_rtb_trainer); the module too
    try:
        make_posterior(prior, CHAIN, cfg.with_fields(guidance_gain_init=0.0))
    except ValueError as e:
        assert "guidance_gain_init" in str(e)
    else:
        raise AssertionError("guidance_gain_init 0 accepted")


def test_per_step_scalars_are_checkpointed_resumed_and_reloaded(tmp_path):
    prior, problem, y, cfg = _setup(steps=20)
    spec = posterior_spec(prior, CHAIN, cfg)
    post = make_posterior(prior, CHAIN, cfg)
    a = RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec)
    a.train(20)
    trained = {n: p.detach().clone() for n, p in post.per_step_parameters().items()}
    assert all(float(v.abs().max()) > 0 for v in trained.values())  # training moved them
    b_post = make_posterior(prior, CHAIN, cfg)
    assert RTBTrainer(b_post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec).resume()
    loaded, _ = load_posterior(tmp_path / "run", prior)
    for p in (b_post, loaded):
        for n, v in p.per_step_parameters().items():
            torch.testing.assert_close(v.detach(), trained[n], rtol=0, atol=0)
    # a checkpoint written without the scalars cannot silently load into a posterior that needs them
    import pytest

    from pipeline.errors import InputFileError
    from pipeline.rtb.loading import _load_per_step

    class _Old:
        path, states = tmp_path / "run" / "step-20", {}

    with pytest.raises(InputFileError, match=r"step-20 \[per_step\]: checkpoint has no .guidance_log_gain."):
        _load_per_step(make_posterior(prior, CHAIN, cfg), _Old())


def test_rollback_restores_the_per_step_scalars():
    prior, problem, y, cfg = _setup()
    post = make_posterior(prior, CHAIN, cfg)
    tr = RTBTrainer(post, cfg, problem=problem, y=y)
    tr.train(5)
    tr._take_snapshot()
    saved = {n: p.detach().clone() for n, p in post.per_step_parameters().items()}
    with torch.no_grad():
        for p in post.per_step_parameters().values():
            p.add_(1.0)
    tr.rollback("test")
    for n, p in post.per_step_parameters().items():
        torch.testing.assert_close(p.detach(), saved[n], rtol=0, atol=0)


@pytest.mark.slow
def test_training_turns_down_an_overstrong_guidance():
    """DPS+CLA at 8x a sensible scale over-concentrates the guided chain; RTB's ELBO gradient must lower
    the learned gain (mean log-gain < -0.1 after 150 steps; measured -0.31) and raise the ELBO."""
    prior, problem, y, cfg = _setup(guidance_scale=8.0, steps=150, batch_size=128,
                                    head_hidden=8, replay_rate=0.0, prior_rate=0.0, tempered_rate=0.0)
    torch.manual_seed(0)
    post = make_posterior(prior, CHAIN, cfg)

    before = _elbo(post, problem, y)
    RTBTrainer(post, cfg, problem=problem, y=y).train()
    gain = post.guidance_log_gain.detach()[2:]
    assert float(gain.mean()) < -0.1, gain
    after = _elbo(post, problem, y)
    assert after > before + 0.5, (before, after)


def test_guidance_scale_tuner_averages_observations_and_refuses_bad_input():
    import pytest

    from pipeline.rtb.tuning import tune_guidance_scale

    prior, problem, _, _ = _setup()
    chain = CHAIN
    rec = tune_guidance_scale(prior, chain, problem, "dps_cla", 5, n=64, n_obs=3, grid=[0.25, 1.0, 16.0])
    assert rec["n_obs"] == 3 and rec["grid"] == [0.25, 1.0, 16.0]
    # a 16x DPS+CLA pull over-concentrates the chain: its ELBO is the worst and it is never chosen
    assert rec["scale"] != 16.0 and rec["values"][2] == min(rec["values"])
    with pytest.raises(ValueError, match="guidance must be one of"):
        tune_guidance_scale(prior, chain, problem, "none", 5)
    with pytest.raises(ValueError, match="grid is empty"):
        tune_guidance_scale(prior, chain, problem, "dps", 5, grid=[])


def test_guidance_uses_the_problem_passed_with_each_call():
    """One posterior serves observations of different operators: the frozen guidance uses the problem
    given with the call, and interleaved calls equal calls on fresh posteriors (no stored problem)."""
    prior, problem_a, y, cfg = _setup()
    problem_b = DenseLinearProblem([[0.2, -1.0]], 0.3)
    post = make_posterior(prior, CHAIN, cfg)
    assert not hasattr(post, "problem")
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 4
    eps_p = prior.eps(x, post.timesteps(k, 5, x.device))
    g_a = post.guide(x, k, eps_p, y, problem=problem_a)
    g_b = post.guide(x, k, eps_p, y, problem=problem_b)
    torch.testing.assert_close(post.guide(x, k, eps_p, y, problem=problem_a), g_a, rtol=0, atol=0)
    fresh = make_posterior(prior, CHAIN, cfg)
    torch.testing.assert_close(g_b, fresh.guide(x, k, eps_p, y, problem=problem_b), rtol=0, atol=0)
    assert (g_b - g_a).abs().max() > 1e-3


def test_warm_start_copies_the_network_and_shared_scalars_and_refuses_another_network(tmp_path):
    import pytest

    from pipeline.errors import InputFileError
    from pipeline.lensing.finetune import warm_start_posterior

    prior, problem, y, cfg = _setup(steps=4, checkpoint_every=2, learn_guidance_gain=False)
    spec = posterior_spec(prior, CHAIN, cfg)
    post = make_posterior(prior, CHAIN, cfg)
    RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec).train()
    # a new recipe with the same network: the learned guidance gain on
    cfg2 = cfg.with_fields(learn_guidance_gain=True)
    spec2 = posterior_spec(prior, CHAIN, cfg2)
    new = make_posterior(prior, CHAIN, cfg2)
    warm_start_posterior(new, spec2, tmp_path / "run")
    for (n, a), (_, b) in zip(post.model.state_dict().items(), new.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert float(new.guidance_log_gain.detach().abs().max()) == 0.0  # not in the source: keeps its initial value
    other = posterior_spec(prior, CHAIN, cfg.with_fields(head_hidden=32))
    with pytest.raises(InputFileError, match="spec"):
        warm_start_posterior(make_posterior(prior, CHAIN, cfg.with_fields(head_hidden=32)),
                             other, tmp_path / "run")
