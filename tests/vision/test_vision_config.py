"""The ``vision:`` section nests ``chain:``, ``prior:``, ``latent_prior:`` and ``rtb:`` with the bench's own
defaults: their values, how partial sections and ``--quick`` merge onto them, the per-method RTB settings,
the device and the one-line errors of the old flat keys."""

import argparse
import dataclasses

import pytest
import yaml

from pipeline.config import from_mapping
from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.prior_config import PriorConfig
from pipeline.errors import ConfigError
from pipeline.settings import load_config
from pipeline.vision import bench
from pipeline.vision.config import QUICK, VisionConfig, vision_prior, vision_rtb
from pipeline.vision.methods import rtb_config


def _args(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def _write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_sections_hold_the_bench_recipe():
    cfg = VisionConfig()
    assert cfg.chain == ChainConfig(K=10, variance="small")
    assert cfg.prior == PriorConfig(unet="tiny", channel_mults=[1, 2, 2, 2], steps=2000, batch_size=32, lr=2e-3,
                                    warmup_steps=100, checkpoint_every=500, log_every=100, ema_decay=0.999, seed=0,
                                    augment="flip")
    assert cfg.latent_prior == PriorConfig(unet="tiny", steps=3000, batch_size=32, lr=2e-3, warmup_steps=100,
                                           checkpoint_every=750, log_every=150, ema_decay=0.999, seed=0,
                                           augment="none")
    r = cfg.rtb
    assert (r.policy.parameterisation, r.policy.head_preset, r.policy.guidance) == ("head", "tiny", "none")
    assert (r.objective.amortized, r.objective.logz, r.objective.group_size) == (True, "vargrad", 4)
    assert (r.optim.batch_size, r.optim.lr) == (8, 1e-3)
    e = r.exploration
    assert (e.replay_rate, e.prior_rate, e.tempered_rate, e.dps_rate) == (0.2, 0.0, 0.1, 0.2)
    assert (r.run.steps, r.run.seed, r.run.log_every, r.run.checkpoint_every, r.run.eval_samples) == (50, 0, 2, 50, 16)


def test_digits_are_not_flipped_unless_the_per_dataset_rule_is_cleared():
    cfg = VisionConfig()
    assert cfg.pixel_prior("mnist").augment == "none" and cfg.pixel_prior("cifar10").augment == "flip"
    assert cfg.pixel_prior("mnist").steps == cfg.prior.steps and cfg.prior.augment == "flip"
    cfg = from_mapping(VisionConfig, {"prior": {"augment": "dihedral"}, "prior_augment": {}}, prefix="vision.")
    assert cfg.pixel_prior("mnist").augment == "dihedral"


def test_quick_runs_the_recipe_at_its_own_budget():
    cfg = from_mapping(VisionConfig, QUICK, "--quick", prefix="vision.")
    # 300 prior steps: warm-up 30, checkpoint every 100, log every 15, EMA 0.99 (below 2000 steps)
    assert cfg.prior == vision_prior(300, channel_mults=[1, 2, 2, 2], augment="flip")
    assert (cfg.prior.warmup_steps, cfg.prior.checkpoint_every, cfg.prior.log_every, cfg.prior.ema_decay) == \
        (30, 100, 15, 0.99)
    assert cfg.latent_prior == vision_prior(300, augment="none")
    assert cfg.rtb == vision_rtb(10, 8) and cfg.chain.K == 10


def test_a_partial_section_keeps_the_bench_defaults_of_the_keys_it_leaves_out(tmp_path):
    path = _write(tmp_path, {"vision": {"rtb": {"run": {"steps": 5}}, "prior": {"steps": 10}}})
    cfg = load_config(path).vision
    assert cfg.rtb == dataclasses.replace(vision_rtb(50, 16), run=dataclasses.replace(vision_rtb(50, 16).run, steps=5))
    assert cfg.prior == dataclasses.replace(VisionConfig().prior, steps=10)
    assert cfg.latent_prior == VisionConfig().latent_prior


def test_each_rtb_variant_changes_only_guidance_and_dps_exploration():
    cfg = VisionConfig()
    plain = rtb_config(cfg, "none", 0.01, 0.3)
    guided = rtb_config(cfg, "dps", 0.01, 0.3)
    assert plain == cfg.rtb.with_fields(guidance_scale=0.01, dps_scale=0.3)
    assert guided == cfg.rtb.with_fields(guidance="dps", guidance_scale=0.01, dps_rate=0.0, dps_scale=0.3)
    assert cfg.rtb == vision_rtb(50, 16)  # the section itself is left alone


@pytest.mark.parametrize("old, new", [
    ("rtb_steps", "vision.rtb.run.steps"),
    ("K", "vision.chain.K"),
    ("prior_steps", "vision.prior.steps"),
    ("rtb_head", "vision.rtb.policy.head_preset"),
    ("prior_batch", "vision.latent_prior.batch_size"),
    ("device", "top-level device"),
])
def test_an_old_flat_key_names_its_new_place_in_one_line(tmp_path, old, new):
    path = _write(tmp_path, {"vision": {old: 5}})
    for load in (lambda: load_config(path), lambda: bench.config_from_args(_args("--config", str(path)))):
        with pytest.raises(ConfigError) as err:
            load()
        msg = str(err.value)
        assert f"{path}: field 'vision.{old}'" in msg and new in msg and "\n" not in msg


def test_device_is_the_top_level_one_unless_the_flag_says_otherwise(tmp_path):
    path = _write(tmp_path, {"device": "cpu", "vision": {"n_obs": 1}})
    assert bench.device_from_args(_args("--config", str(path))) == "cpu"
    assert bench.device_from_args(_args("--config", str(path), "--device", "cuda")) == "cuda"
    assert bench.device_from_args(_args()) == "auto"
    bad = _write(tmp_path, {"device": "tpu"})
    with pytest.raises(ConfigError, match="'device'"):
        bench.device_from_args(_args("--config", str(bad)))


def test_seed_flag_reseeds_the_data_and_every_training(tmp_path):
    cfg, _ = bench.config_from_args(_args("--seed", "3"))
    assert (cfg.seed, cfg.prior.seed, cfg.latent_prior.seed, cfg.rtb.run.seed) == (3, 3, 3, 3)
    cfg, _ = bench.config_from_args(_args("--config", str(_write(tmp_path, {"vision": {"seed": 3}}))))
    assert (cfg.seed, cfg.prior.seed, cfg.latent_prior.seed, cfg.rtb.run.seed) == (3, 0, 0, 0)
