"""Per-chain-step scalars of the RTB posterior: a log-variance offset (``learn_step_scale``) and a
log-gain on the frozen guidance (``learn_guidance_gain``). Their effect on the step law, their
checkpointing, their rollback, and that training moves the gain the right way."""

import math

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.objective import policy_rollout
from pipeline.rtb.posterior import make_posterior, posterior_spec
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.trainer import RTBTrainer


def _setup(**kw):
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 0.5)
    problem = DenseLinearProblem([[1.0, 0.5]], 0.5)
    base = dict(K=8, steps=20, batch_size=32, head_hidden=16, head_layers=1, guidance="dps_cla",
                guidance_scale=1.0, learn_step_scale=True, learn_guidance_gain=True, seed=1, log_every=5,
                checkpoint_every=10, snapshot_every=5)
    base.update(kw)
    cfg = RTBConfig(**base)
    return prior, problem, torch.tensor([0.7]), cfg


def _elbo(post, problem, y) -> float:
    """Mean ELBO of 4,000 on-policy trajectories at the observation y of problem (fixed seed)."""
    with torch.no_grad():
        b = policy_rollout(post, 4000, y, problem=problem, generator=torch.Generator().manual_seed(9))
    return float((b.log_r - b.log_ratio()).double().mean())


def test_per_step_scalars_set_the_step_law_for_int_and_tensor_k():
    prior, problem, y, cfg = _setup()
    post = make_posterior(prior, cfg)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 4
    eps_p = prior.eps(x, post.timesteps(k, 5, x.device))
    guide = post.guide(x, k, eps_p, y, problem=problem)
    m0, s0 = post.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    m_noguide, _ = post.step_params(x, k, eps_p, y, problem=problem, guide=None)
    with torch.no_grad():
        post.step_log_var[k] = 0.4
        post.guidance_log_gain[k] = math.log(0.5)
    m1, s1 = post.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    # the guidance offset is halved, the std multiplied by exp(0.2) (0.4 is well inside the tanh bound)
    torch.testing.assert_close(m1 - m_noguide, 0.5 * (m0 - m_noguide), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1 / s0, torch.full_like(s1, math.exp(0.2)), rtol=1e-3, atol=0)
    # per-sample chain indices (the chunked second pass) give the same law
    kk = torch.full((5,), k, dtype=torch.long)
    m2, s2 = post.step_params(x, kk, eps_p, y, problem=problem, guide=guide)
    torch.testing.assert_close(m2, m1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2.expand_as(x), s1.expand_as(x), rtol=1e-5, atol=1e-7)


def test_per_step_options_are_off_by_default_and_keep_old_config_hashes():
    d = RTBConfig().hash_fields()
    assert "learn_step_scale" not in d and "learn_guidance_gain" not in d and "lr_per_step" not in d
    assert RTBConfig(learn_guidance_gain=True).hash_fields()["learn_guidance_gain"] is True
    prior, problem, y, cfg = _setup(learn_step_scale=False, learn_guidance_gain=False)
    assert make_posterior(prior, cfg).per_step_parameters() == {}
    # no guidance: no gain to learn
    _, _, _, cfg2 = _setup(guidance="none")
    assert set(make_posterior(prior, cfg2).per_step_parameters()) == {"step_log_var"}


def test_guidance_gain_init_scales_the_starting_guidance_and_is_validated():
    prior, problem, y, cfg = _setup(learn_step_scale=False)
    assert "guidance_gain_init" not in cfg.hash_fields()  # neutral 1.0: old run hashes are kept
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 3
    base = make_posterior(prior, cfg)
    eps_p = prior.eps(x, base.timesteps(k, 5, x.device))
    guide = base.guide(x, k, eps_p, y, problem=problem)
    m_noguide, _ = base.step_params(x, k, eps_p, y, problem=problem, guide=None)
    m1, _ = base.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    weak_cfg = RTBConfig(**{**cfg.__dict__, "guidance_gain_init": 0.25})
    assert weak_cfg.hash_fields()["guidance_gain_init"] == 0.25
    weak = make_posterior(prior, weak_cfg)
    torch.testing.assert_close(weak.guidance_log_gain, torch.full((cfg.K + 1,), math.log(0.25)))
    m_weak, _ = weak.step_params(x, k, eps_p, y, problem=problem, guide=guide)
    torch.testing.assert_close(m_weak - m_noguide, 0.25 * (m1 - m_noguide), rtol=1e-5, atol=1e-6)
    # the spec carries it, so a rebuilt posterior starts from the same gain
    assert posterior_spec(prior, weak_cfg)["guidance_gain_init"] == 0.25
    # the config rejects a gain <= 0 with a one-line error (test_rtb_trainer); the module too
    try:
        make_posterior(prior, RTBConfig(**{**cfg.__dict__, "guidance_gain_init": 0.0}))
    except ValueError as e:
        assert "guidance_gain_init" in str(e)
    else:
        raise AssertionError("guidance_gain_init 0 accepted")


def test_per_step_scalars_are_checkpointed_resumed_and_reloaded(tmp_path):
    prior, problem, y, cfg = _setup(steps=20)
    spec = posterior_spec(prior, cfg)
    post = make_posterior(prior, cfg)
    a = RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec)
    a.train(20)
    trained = {n: p.detach().clone() for n, p in post.per_step_parameters().items()}
    assert all(float(v.abs().max()) > 0 for v in trained.values())  # training moved them
    b_post = make_posterior(prior, cfg)
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

    with pytest.raises(InputFileError, match=r"step-20 \[per_step\]: checkpoint has no .step_log_var."):
        _load_per_step(make_posterior(prior, cfg), _Old())


def test_rollback_restores_the_per_step_scalars():
    prior, problem, y, cfg = _setup()
    post = make_posterior(prior, cfg)
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
    prior, problem, y, cfg = _setup(guidance_scale=8.0, learn_step_scale=False, steps=150, batch_size=128,
                                    head_hidden=8, replay_rate=0.0, prior_rate=0.0, tempered_rate=0.0)
    torch.manual_seed(0)
    post = make_posterior(prior, cfg)

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
    chain = prior.schedule.chain(8)
    rec = tune_guidance_scale(prior, chain, problem, "dps_cla", 5, n=64, n_obs=3, grid=[0.25, 1.0, 16.0])
    assert rec["n_obs"] == 3 and rec["grid"] == [0.25, 1.0, 16.0]
    # a 16x DPS+CLA pull over-concentrates the chain: its ELBO is the worst and it is never chosen
    assert rec["scale"] != 16.0 and rec["values"][2] == min(rec["values"])
    with pytest.raises(ValueError, match="guidance must be one of"):
        tune_guidance_scale(prior, chain, problem, "none", 5)
    with pytest.raises(ValueError, match="grid is empty"):
        tune_guidance_scale(prior, chain, problem, "dps", 5, grid=[])


def test_guided_variance_is_the_gaussian_product_with_the_diagonal_data_precision():
    prior, problem, y, cfg = _setup(guided_variance=True, learn_step_scale=False)
    post = make_posterior(prior, cfg)
    assert "variance_log_gain" in post.per_step_parameters()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 3
    eps_p = prior.eps(x, post.timesteps(k, 5, x.device))
    yb = y.expand(5, 1)
    with torch.no_grad():
        post.variance_log_gain[k] = math.log(2.0)
    _, s = post.step_params(x, k, eps_p, yb, problem=problem)
    ab, var_p = float(post.chain.abar[k - 1]), float(post.chain.reverse_var[k])
    d = torch.tensor([1.0, 0.25]) / 0.5 ** 2  # diag(M^T M) / sigma^2 for M = [1, 0.5], sigma 0.5
    lam = (d / ab) / (1 + d * (1 - ab) / ab)
    want = math.sqrt(var_p) / torch.sqrt(1 + 2.0 * var_p * lam)
    torch.testing.assert_close(s, want.expand(5, 2), rtol=1e-5, atol=1e-7)
    assert (s < math.sqrt(var_p)).all()  # it only shrinks
    # per-sample chain indices (the chunked second pass) give the same std
    _, s2 = post.step_params(x, torch.full((5,), k, dtype=torch.long), eps_p, yb, problem=problem)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-7)
    # off by default and hash-neutral; refused without a per-pixel data precision
    assert "guided_variance" not in RTBConfig().hash_fields()

    class NoDiag:
        is_linear = True

    import pytest

    with pytest.raises(ValueError, match="diag_precision"):
        make_posterior(prior, cfg).guided_variance_offset(x, k, yb, NoDiag())


@pytest.mark.slow
def test_training_raises_the_guided_variance_where_the_data_is_precise():
    """A high-SNR observation of both coordinates: the posterior is far narrower than the prior's last
    steps, so RTB's gradient must raise the guided-variance gain of the final step from its e^-3 start
    and the ELBO must improve."""
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 0.5)
    problem = DenseLinearProblem([[1.0, 0.0], [0.0, 1.0]], 0.05)
    y = torch.tensor([1.9, 1.1])
    cfg = RTBConfig(K=8, steps=150, batch_size=128, head_hidden=8, head_layers=1, guidance="dps_cla",
                    guidance_scale=1.0, learn_guidance_gain=True, guided_variance=True, seed=1,
                    replay_rate=0.0, prior_rate=0.0, tempered_rate=0.0)
    torch.manual_seed(0)
    post = make_posterior(prior, cfg)

    before = _elbo(post, problem, y)
    RTBTrainer(post, cfg, problem=problem, y=y).train()
    # the last scored step (x_2 -> x_1): measured -3 -> -2.27 in 150 steps
    assert float(post.variance_log_gain[2]) > -3.0 + 0.4, post.variance_log_gain
    after = _elbo(post, problem, y)
    assert after > before + 0.5, (before, after)


def test_guidance_uses_the_problem_passed_with_each_call():
    """One posterior serves observations of different operators: the frozen guidance uses the problem
    given with the call, and interleaved calls equal calls on fresh posteriors (no stored problem)."""
    prior, problem_a, y, cfg = _setup()
    problem_b = DenseLinearProblem([[0.2, -1.0]], 0.3)
    post = make_posterior(prior, cfg)
    assert not hasattr(post, "problem")
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    k = 4
    eps_p = prior.eps(x, post.timesteps(k, 5, x.device))
    g_a = post.guide(x, k, eps_p, y, problem=problem_a)
    g_b = post.guide(x, k, eps_p, y, problem=problem_b)
    torch.testing.assert_close(post.guide(x, k, eps_p, y, problem=problem_a), g_a, rtol=0, atol=0)
    torch.testing.assert_close(g_b, make_posterior(prior, cfg).guide(x, k, eps_p, y, problem=problem_b), rtol=0, atol=0)
    assert (g_b - g_a).abs().max() > 1e-3


def test_warm_start_copies_the_network_and_shared_scalars_and_refuses_another_network(tmp_path):
    import pytest

    from pipeline.errors import InputFileError
    from pipeline.lensing.finetune import warm_start_posterior

    prior, problem, y, cfg = _setup(steps=4, learn_step_scale=False, checkpoint_every=2)
    spec = posterior_spec(prior, cfg)
    post = make_posterior(prior, cfg)
    RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=spec).train()
    # a new recipe with the same network: guided variance on
    cfg2 = RTBConfig(**{**cfg.__dict__, "guided_variance": True})
    spec2 = posterior_spec(prior, cfg2)
    new = make_posterior(prior, cfg2)
    warm_start_posterior(new, spec2, tmp_path / "run")
    for (n, a), (_, b) in zip(post.model.state_dict().items(), new.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    torch.testing.assert_close(new.guidance_log_gain, post.guidance_log_gain)
    assert float(new.variance_log_gain.max()) == -3.0  # not in the source: keeps its initial value
    other = posterior_spec(prior, RTBConfig(**{**cfg.__dict__, "head_hidden": 32}))
    with pytest.raises(InputFileError, match="spec"):
        warm_start_posterior(make_posterior(prior, RTBConfig(**{**cfg.__dict__, "head_hidden": 32})),
                             other, tmp_path / "run")
