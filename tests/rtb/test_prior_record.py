"""A posterior checkpoint records the prior (recipe hash) and chain (K, variance) it was fine-tuned on,
and is refused, with one line naming the checkpoint and the field, against another prior or chain."""

import json
import logging

import pytest
import torch

from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.errors import InputFileError, PipelineError
from pipeline.problems import DenseLinearProblem
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.posterior import make_posterior, posterior_spec
from pipeline.rtb.loading import load_posterior
from pipeline.rtb.trainer import RTBTrainer


def _prior(recipe="aaaa1111", K=8, variance="small"):
    prior = GaussianMixturePrior([0.3, 0.7], [[-2.0], [2.0]], 0.25)
    prior.meta = {"config_hash": recipe, "sample_K": K, "sample_variance": variance}
    return prior


def _cfg(**kw):
    base = dict(K=8, steps=4, batch_size=16, head_hidden=8, head_layers=1, checkpoint_every=2, log_every=1,
                snapshot_every=2, seed=1)
    base.update(kw)
    return RTBConfig(**base)


def _trained(tmp_path, prior, **kw):
    problem, y = DenseLinearProblem([[1.0]], 1.0), torch.tensor([-0.5])
    cfg = _cfg(**kw)
    post = make_posterior(prior, cfg)
    trainer = RTBTrainer(post, cfg, problem=problem, y=y, run_dir=tmp_path / "run", spec=posterior_spec(prior, cfg))
    trainer.train()
    return trainer, problem, y, cfg


def test_posterior_records_its_prior_and_chain(tmp_path):
    trainer, problem, _, _ = _trained(tmp_path, _prior())
    hp = json.loads((tmp_path / "run" / "step-000004" / "hparams.json").read_text())
    assert hp["prior"] == {"recipe_hash": "aaaa1111", "K": 8, "variance": "small"}
    post, _ = load_posterior(tmp_path / "run", _prior())  # the same prior loads
    assert post.chain.K == 8


@pytest.mark.parametrize("other, field", [(dict(recipe="bbbb2222"), "prior.recipe_hash"),
                                          (dict(K=10), "prior.K"), (dict(variance="large"), "prior.variance")])
def test_posterior_is_refused_against_another_prior_or_chain(tmp_path, other, field):
    _, problem, y, cfg = _trained(tmp_path, _prior())
    with pytest.raises(InputFileError) as exc:
        load_posterior(tmp_path / "run", _prior(**other))
    msg = str(exc.value)
    assert "\n" not in msg and field in msg and str(tmp_path / "run") in msg
    assert isinstance(exc.value, PipelineError)
    if "recipe_hash" in field:  # fine-tuning (resume) refuses it too
        prior = _prior(**other)
        t = RTBTrainer(make_posterior(prior, cfg), cfg, problem=problem, y=y, run_dir=tmp_path / "run",
                       spec=posterior_spec(prior, cfg))
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
    trainer, problem, _, _ = _trained(tmp_path, _prior(), ema_decay=0.5, learn_step_scale=True, lr_per_step=0.1)
    name = "per_step/step_log_var"  # the EMA key of a per-step scalar
    assert name in trainer.ema
    live = trainer.post.step_log_var.detach()
    assert not torch.equal(trainer.ema[name], live)  # an average, not the live value (lr 0.1, 4 steps)
    assert float(live.abs().max()) > 1e-3
    loaded, _ = load_posterior(tmp_path / "run", _prior())
    torch.testing.assert_close(loaded.step_log_var.detach(), trainer.ema[name], rtol=0, atol=0)
    loaded_raw, _ = load_posterior(tmp_path / "run", _prior(), use_ema=False)
    torch.testing.assert_close(loaded_raw.step_log_var.detach(), live, rtol=0, atol=0)
