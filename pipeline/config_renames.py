"""Config keys that moved or were removed, for one-line errors on old configs.

``RENAMED`` maps each old dotted key to its new dotted key, or to a sentence (it contains a space)
saying why it was removed. The config loader consults it when it meets an unknown key.
"""

from __future__ import annotations

RENAMED: dict[str, str] = {
    # one chain for every command
    "prior.sample_K": "chain.K",
    "prior.sample_variance": "chain.variance",
    "rtb.K": "chain.K",
    "rtb.variance": "chain.variance",
    # one device for every command
    "prior.device": "device",
    "posterior.device": "device",
    "rtb.device": "removed: it was never read; the top-level device decides",
    "seed": "removed: it was never read; each section keeps its own seed (prior.seed, rtb.run.seed, ...)",
    # options that did not help (docs/results/experiments.md)
    "rtb.learn_step_scale": "removed: a learned per-step log-variance barely moved on the closed-form Gaussian "
                            "check (docs/results/experiments.md)",
    "rtb.guided_variance": "removed: the diagonal data-precision step variance changed nothing that matters on "
                           "lensing (docs/results/experiments.md)",
    # rtb: nested by concern
    "rtb.parameterisation": "rtb.policy.parameterisation",
    "rtb.lora_rank": "rtb.policy.lora_rank",
    "rtb.head_hidden": "rtb.policy.head_hidden",
    "rtb.head_layers": "rtb.policy.head_layers",
    "rtb.head_preset": "rtb.policy.head_preset",
    "rtb.in_scale": "rtb.policy.in_scale",
    "rtb.features": "rtb.policy.features",
    "rtb.learn_variance": "rtb.policy.learn_variance",
    "rtb.guidance": "rtb.policy.guidance",
    "rtb.guidance_scale": "rtb.policy.guidance_scale",
    "rtb.learn_guidance_gain": "rtb.policy.learn_guidance_gain",
    "rtb.guidance_gain_init": "rtb.policy.guidance_gain_init",
    "rtb.amortized": "rtb.objective.amortized",
    "rtb.logz": "rtb.objective.logz",
    "rtb.group_size": "rtb.objective.group_size",
    "rtb.beta_start": "rtb.objective.beta_start",
    "rtb.beta_ramp_steps": "rtb.objective.beta_ramp_steps",
    "rtb.dead_zone": "rtb.objective.dead_zone",
    "rtb.batch_size": "rtb.optim.batch_size",
    "rtb.lr": "rtb.optim.lr",
    "rtb.lr_logz": "rtb.optim.lr_logz",
    "rtb.lr_per_step": "rtb.optim.lr_per_step",
    "rtb.lr_final_frac": "rtb.optim.lr_final_frac",
    "rtb.grad_clip": "rtb.optim.grad_clip",
    "rtb.ema_decay": "rtb.optim.ema_decay",
    "rtb.replay_rate": "rtb.exploration.replay_rate",
    "rtb.replay_capacity": "rtb.exploration.replay_capacity",
    "rtb.replay_priority_frac": "rtb.exploration.replay_priority_frac",
    "rtb.prior_rate": "rtb.exploration.prior_rate",
    "rtb.tempered_rate": "rtb.exploration.tempered_rate",
    "rtb.tempered_std_scale": "rtb.exploration.tempered_std_scale",
    "rtb.dps_rate": "rtb.exploration.dps_rate",
    "rtb.dps_scale": "rtb.exploration.dps_scale",
    "rtb.spike_factor": "rtb.guards.spike_factor",
    "rtb.spike_warmup": "rtb.guards.spike_warmup",
    "rtb.max_rollbacks": "rtb.guards.max_rollbacks",
    "rtb.rollback_lr_factor": "rtb.guards.rollback_lr_factor",
    "rtb.snapshot_every": "rtb.guards.snapshot_every",
    "rtb.diverged_logz_tol": "rtb.guards.diverged_logz_tol",
    "rtb.steps": "rtb.run.steps",
    "rtb.seed": "rtb.run.seed",
    "rtb.chunk_size": "rtb.run.chunk_size",
    "rtb.log_every": "rtb.run.log_every",
    "rtb.checkpoint_every": "rtb.run.checkpoint_every",
    "rtb.keep_checkpoints": "rtb.run.keep_checkpoints",
    "rtb.eval_samples": "rtb.run.eval_samples",
}
