"""A posterior checkpoint records the prior (recipe hash) and chain (K, variance) it was fine-tuned on,
and is refused, with one line naming the checkpoint and the field, against another prior or chain."""

import json
import logging

import pytest
import torch

from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.schedule import NoiseSchedule, build_chain
from pipeline.errors import InputFileError, PipelineError
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.posterior import make_posterior, posterior_spec
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.trainer import RTBTrainer


CHAIN = NoiseSchedule().chain(8)


def _prior(recipe="aaaa1111"):
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0], [2.0]], 0.25)
    prior.meta = {"config_hash": recipe}
    return prior


def _cfg(**kw):
    base = dict(steps=4, batch_size=16, head_hidden=8, head_layers=1, checkpoint_every=2, log_every=1,
                snapshot_every=2, seed=1)
    base.update(kw)
    return RTBConfig().with_fields(**base)


def _trained(tmp_path, prior, **kw):
    problem, y = DenseLinearProblem([[1.0]], 1.0), torch.tensor([-0.5])
    cfg = _cfg(**kw)
    post = make_posterior(prior, CHAIN, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run",
                         spec=posterior_spec(prior, CHAIN, cfg))
    trainer.train()
    return trainer, problem, y, cfg


def test_posterior_records_its_prior_and_chain(tmp_path):
    trainer, problem, _, _ = _trained(tmp_path, _prior())
    hp = json.loads((tmp_path / "run" / "step-000004" / "hparams.json").read_text())
    assert hp["prior"] == {"recipe_hash": "aaaa1111", "K": 8, "variance": "small", "timesteps": CHAIN.t.tolist()}
    post, _ = load_posterior(tmp_path / "run", _prior(), chain=CHAIN)  # the same prior and chain load
    assert post.chain.K == 8 and post.chain.t.tolist() == CHAIN.t.tolist()


@pytest.mark.parametrize("other, chain, field", [
    (dict(recipe="bbbb2222"), CHAIN, "prior.recipe_hash"),
    ({}, NoiseSchedule().chain(10), "prior.K"),
    ({}, NoiseSchedule().chain(8, "large"), "prior.variance"),
    ({}, build_chain(ChainConfig(K=8, spacing="quadratic"), NoiseSchedule()), "prior.timesteps")])
def test_posterior_is_refused_against_another_prior_or_chain(tmp_path, other, chain, field):
    _, problem, y, cfg = _trained(tmp_path, _prior())
    with pytest.raises(InputFileError) as exc:
        load_posterior(tmp_path / "run", _prior(**other), chain=chain)
    msg = str(exc.value)
    assert "\n" not in msg and field in msg and str(tmp_path / "run") in msg
    assert isinstance(exc.value, PipelineError)
    if "recipe_hash" in field:  # fine-tuning (resume) refuses it too
        prior = _prior(**other)
        t = RTBTrainer(make_posterior(prior, CHAIN, cfg), cfg, problem=problem, y=y, run_dir=tmp_path / "run",
                       spec=posterior_spec(prior, CHAIN, cfg))
        with pytest.raises(InputFileError, match="prior.recipe_hash"):
            t.resume()


def test_posterior_without_the_record_loads_with_a_warning(tmp_path, caplog):
    _, problem, _, _ = _trained(tmp_path, _prior())
    step = tmp_path / "run" / "step-000004"
    from pipeline.io.checkpoint import load_checkpoint, write_checkpoint_dir

    ck = load_checkpoint(step)
    hp = {k: v for k, v in ck.hparams.items() if k != "prior"}
    write_checkpoint_dir(tmp_path / "old", ck.states, hp, ck.state)  # as written before the record existed
    with caplog.at_level(logging.WARNING):
        load_posterior(tmp_path / "old", _prior(recipe="cccc3333"))
    assert any("records no prior recipe hash" in r.getMessage() for r in caplog.records)


def test_ema_includes_the_per_step_scalars(tmp_path):
    trainer, problem, _, _ = _trained(tmp_path, _prior(), ema_decay=0.5, guidance="dps_cla", learn_guidance_gain=True,
                                      lr_per_step=0.1)
    name = "per_step/guidance_log_gain"  # the EMA key of a per-step scalar
    assert name in trainer.ema
    live = trainer.post.guidance_log_gain.detach()
    assert not torch.equal(trainer.ema[name], live)  # an average, not the live value (lr 0.1, 4 steps)
    assert float(live.abs().max()) > 1e-3
    loaded, _ = load_posterior(tmp_path / "run", _prior())
    torch.testing.assert_close(loaded.guidance_log_gain.detach(), trainer.ema[name], rtol=0, atol=0)
    loaded_raw, _ = load_posterior(tmp_path / "run", _prior(), use_ema=False)
    torch.testing.assert_close(loaded_raw.guidance_log_gain.detach(), live, rtol=0, atol=0)
