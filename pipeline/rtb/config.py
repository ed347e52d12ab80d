"""``RTBConfig``: the ``rtb:`` section of the pipeline config, one nested section per concern.

``policy`` (what q_phi is), ``objective`` (the RTB loss), ``optim`` (the optimiser), ``exploration``
(behaviour policies), ``guards`` (rollbacks on spikes and NaNs) and ``run`` (length, seed, logging,
checkpoints, memory layout). The chain RTB trains on is the top-level ``chain:`` section
(:class:`pipeline.diffusion.chain_config.ChainConfig`). :meth:`RTBConfig.recipe` lists the fields that
change the trained posterior; its hash guards resumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from pipeline.config import config_hash, param
from pipeline.errors import ConfigError

RECIPE_VERSION = "v2"
# the policy's closed-form step options with their neutral values: recorded in recipes and specs only when set
STEP_OPTIONS = (("step_variance_mode", "prior"), ("step_mean_shift", False), ("step_mean_cg_iters", 0),
                ("use_head", True), ("step_model_chain_x0", False))


@dataclass
class PolicyConfig:
    """The posterior policy q_phi: its network, inputs, learned variances and guidance."""

    parameterisation: str = param("head", "Head = frozen prior plus a zero-initialised correction network; "
                                          "full = a trainable copy of the prior network.", choices=["head", "full"])
    lora_rank: int = param(0, "With parameterisation full: rank of low-rank adapters on the copy (0 fine-tunes "
                              "every weight).", min=0)
    head_hidden: int = param(128, "Hidden width of the MLP correction head (vector priors).", min=1)
    head_layers: int = param(3, "Hidden layers of the MLP correction head (vector priors).", min=1)
    head_preset: str = param("tiny", "Size preset of the U-Net correction head (image priors).",
                             choices=["tiny", "small", "medium", "paper"])
    in_scale: float = param(1.0, "Divisor applied to the MLP head's state input (an input normalisation).", gt=0)
    features: list[str] = param(["x0hat", "grad"], "Head inputs: x0hat = the prior's Tweedie estimate, grad = "
                                "the likelihood gradient at it.", choices=["x0hat", "grad"])
    learn_variance: bool = param(True, "Let the head output a bounded per-coordinate log-variance offset of "
                                       "every step.")
    step_variance_tau2: float | None = param(None, "Prior per-pixel variance of x_0 (network units^2): narrows "
                                             "each step's std by the data precision of the lens (docs/method.md); "
                                             "null = off.", gt=0)
    step_variance_mode: str = param("prior", "Prior variance in that narrowing: prior = step_variance_tau2 for every "
                                             "pixel; tweedie = per pixel the Tweedie estimate's square plus "
                                             "step_variance_tau2; galaxy = per sample its mean over pixels plus "
                                             "step_variance_tau2.", choices=["prior", "tweedie", "galaxy"])
    step_mean_shift: bool = param(False, "With step_variance_tau2: also move each step's mean towards the data by the "
                                         "same diagonal model, damped so no direction overshoots (docs/method.md).")
    step_mean_cg_iters: int = param(0, "With step_mean_shift: conjugate-gradient iterations of that shift on the "
                                       "whole lens operator (0 = the damped diagonal form; docs/method.md).", min=0)
    step_model_chain_x0: bool = param(False, "With step_variance_tau2: the step model's x_0 is the chain's own f(x_1), "
                                             "its variance given x_k summed over the steps left (zero at the last "
                                             "step), not the forward process's x_0 (docs/method.md).")
    use_head: bool = param(True, "Sample with the trained correction head; false = the prior's step with the "
                                 "likelihood-informed step only (nothing to train; the head stays in checkpoints).")
    guidance: str = param("none", "Frozen-prior guidance added to the policy mean (detached; no double "
                                  "backprop).", choices=["none", "dps", "dps_cla"])
    guidance_scale: float = param(1.0, "Scale of that guidance (tuned by the untrained ELBO).", min=0)
    learn_guidance_gain: bool = param(False, "Learn one log-gain per chain step on the guidance offset.")
    guidance_gain_init: float = param(1.0, "Initial gain on every step; below 1 the start is a weaker-guided "
                                           "chain, so a guidance that points at wrong modes does not lock the "
                                           "policy onto them.", gt=0)

    def validate(self, source="<config>", prefix: str = "") -> None:
        if self.step_mean_shift and self.step_variance_tau2 is None:
            raise ConfigError(source, prefix + "step_mean_shift", "needs step_variance_tau2 (the model's prior variance)")
        if self.step_model_chain_x0 and self.step_variance_tau2 is None:
            raise ConfigError(source, prefix + "step_model_chain_x0", "needs step_variance_tau2 (the step model)")
        if self.step_mean_cg_iters and not self.step_mean_shift:
            raise ConfigError(source, prefix + "step_mean_cg_iters", "needs step_mean_shift: true")
        if not self.use_head and self.step_variance_tau2 is None and self.guidance == "none":
            raise ConfigError(source, prefix + "use_head", "false with no step variance and no guidance samples "
                              "the prior alone (the data are ignored): set step_variance_tau2 or use_head: true")


@dataclass
class ObjectiveConfig:
    """The RTB loss: how log Z is estimated and how the reward is tempered."""

    amortized: bool = param(False, "One network for every observation (conditioned on y) instead of one "
                                   "posterior per observation.")
    logz: str = param("scalar", "How log Z is estimated: scalar = one learned value (single observation); vargrad = "
                                "per group of trajectories sharing one y (needed when amortized).",
                      choices=["scalar", "vargrad"])
    group_size: int = param(8, "Trajectories per observation in a batch (vargrad).", min=2)
    beta_start: float = param(1.0, "Reward temperature at step 0, ramped linearly to 1 (outputs and log Z "
                                   "always use 1).", gt=0, max=1)
    beta_ramp_steps: int = param(0, "Length of that ramp (0 = no ramp).", unit="steps", min=0)
    dead_zone: float = param(0.0, "Trajectory residuals |delta| below this get no gradient.", unit="nats", min=0)
    huber: float = param(0.0, "Loss 1/2 delta^2 up to |delta| = huber and linear beyond, so wild draws cannot "
                              "dominate a step; same minimiser (0 = squared everywhere).", unit="nats", min=0)


@dataclass
class OptimConfig:
    """Adam with a cosine learning-rate decay, gradient clipping and an optional EMA of the weights."""

    batch_size: int = param(64, "Trajectories per optimisation step.", min=1)
    lr: float = param(1e-3, "Adam step size of the policy network.", gt=0)
    lr_logz: float = param(0.1, "Adam step size of the scalar log Z.", gt=0)
    lr_per_step: float = param(1e-2, "Adam step size of the per-chain-step scalars (the guidance gains; their "
                                     "gradient pools every coordinate).", gt=0)
    lr_final_frac: float = param(0.1, "Final learning rate of the cosine decay, as a fraction of the initial.",
                                 gt=0, max=1)
    grad_clip: float = param(10.0, "Clip the gradient norm to this.", gt=0)
    ema_decay: float = param(0.0, "Decay of an exponential moving average of the weights (0 = none; the "
                                  "export uses the EMA when on).", min=0, max=0.99999)


@dataclass
class ExplorationConfig:
    """Off-policy behaviour policies: per-step probabilities (the remainder is on-policy) and their settings."""

    replay_rate: float = param(0.1, "Probability of a replay batch (backtracked from reward-prioritised "
                                    "buffered samples).", min=0, max=1)
    replay_capacity: int = param(2000, "Samples kept in the replay buffer.", min=1)
    replay_priority_frac: float = param(0.5, "Fraction of replay draws taken by reward rank (the rest "
                                             "uniformly).", min=0, max=1)
    prior_rate: float = param(0.05, "Probability of a batch of prior-chain rollouts.", min=0, max=1)
    tempered_rate: float = param(0.1, "Probability of rollouts with inflated step noise.", min=0, max=1)
    tempered_std_scale: float = param(1.5, "Step-noise multiplier of the tempered rollouts.", gt=0)
    dps_rate: float = param(0.0, "Probability of DPS-guided rollouts through the frozen prior.", min=0, max=1)
    dps_scale: float = param(1.0, "DPS guidance scale of those rollouts.", min=0)

    def validate(self, source="<config>", prefix: str = "") -> None:
        total = self.replay_rate + self.prior_rate + self.tempered_rate + self.dps_rate
        if total > 1.0 + 1e-9:
            raise ConfigError(source, prefix + "replay_rate",
                              f"exploration rates (replay+prior+tempered+dps) sum to {total:.3g} > 1")


@dataclass
class GuardsConfig:
    """Rollback to the last good state on a loss spike or a non-finite value."""

    spike_factor: float = param(1000.0, "A loss above this times the running median of its behaviour source "
                                        "is a spike (0 = off).", min=0)
    spike_warmup: int = param(50, "Steps before spikes are detected.", unit="steps", min=0)
    max_rollbacks: int = param(3, "Rollbacks allowed; then a NaN marks the run diverged and a spike stops it.",
                               min=0)
    rollback_lr_factor: float = param(0.5, "Learning-rate factor applied at every rollback.", gt=0, max=1)
    snapshot_every: int = param(10, "Steps between snapshots of the last good state.", unit="steps", min=1)
    diverged_logz_tol: float = param(1.0, "With a reference log Z: an end |log Z - reference| above this marks "
                                          "the run diverged.", unit="nats", gt=0)


@dataclass
class RunConfig:
    """Length, seed, logging, checkpoints and memory layout (none but ``seed`` changes the result)."""

    steps: int = param(1000, "Optimisation steps in total (a resume trains on to this).", unit="steps", min=0)
    seed: int = param(0, "Seed of the head's initialisation and of every training draw.")
    chunk_size: int = param(10, "Chain steps per chunk of the two-pass gradient (memory only; the gradient "
                                "is the same).", unit="steps", min=1)
    log_every: int = param(10, "Steps between metric lines.", unit="steps", min=1)
    checkpoint_every: int = param(200, "Steps between rolling checkpoints.", unit="steps", min=1)
    keep_checkpoints: int = param(3, "Rolling checkpoints kept.", min=1)
    eval_samples: int = param(1000, "Samples of the final log Z estimate.", min=2)


@dataclass
class RTBConfig:
    """RTB fine-tuning settings, one nested section per concern (see the module docstring)."""

    policy: PolicyConfig = param(PolicyConfig, "The posterior policy q_phi.")
    objective: ObjectiveConfig = param(ObjectiveConfig, "The RTB loss.")
    optim: OptimConfig = param(OptimConfig, "The optimiser.")
    exploration: ExplorationConfig = param(ExplorationConfig, "Off-policy behaviour policies.")
    guards: GuardsConfig = param(GuardsConfig, "Rollbacks on loss spikes and non-finite values.")
    run: RunConfig = param(RunConfig, "Length, seed, logging and checkpoints.")

    def validate(self, source="<config>", prefix: str = "") -> None:
        o = self.objective
        if o.amortized and o.logz != "vargrad":
            raise ConfigError(source, prefix + "objective.logz",
                              "the amortized posterior needs logz: vargrad (Z depends on y; no shared scalar)")
        if 0 < o.huber and o.huber ** 2 <= o.dead_zone:
            raise ConfigError(source, prefix + "objective.huber",
                              f"huber {o.huber:g} must exceed sqrt(dead_zone) = {o.dead_zone ** 0.5:g}")
        if o.logz == "vargrad" and self.optim.batch_size % o.group_size:
            raise ConfigError(source, prefix + "objective.group_size", f"optim.batch_size {self.optim.batch_size} "
                              f"must be a multiple of group_size {o.group_size}")

    def flat(self) -> dict:
        """Every field of every subsection by its own name (names are unique across subsections)."""
        out = {}
        for f in fields(self):
            out.update(asdict(getattr(self, f.name)))
        return out

    def with_fields(self, **values) -> "RTBConfig":
        """A copy with the named fields replaced, each in the subsection that holds it (field names are
        unique across subsections), e.g. ``cfg.with_fields(lr=3e-4, steps=100)``; an unknown name is a
        TypeError."""
        sections = {f.name: getattr(self, f.name) for f in fields(self)}
        changes: dict[str, dict] = {}
        for name, value in values.items():
            owner = next((sec for sec, obj in sections.items() if name in {f.name for f in fields(obj)}), None)
            if owner is None:
                raise TypeError(f"RTBConfig has no field {name!r}")
            changes.setdefault(owner, {})[name] = value
        return replace(self, **{sec: replace(sections[sec], **kw) for sec, kw in changes.items()})

    def recipe(self) -> dict:
        """Every field that changes the trained posterior, listed explicitly (a resume must match them;
        run length, logging, checkpoint cadence and the gradient chunking may change)."""
        p, o, m, e, g = self.policy, self.objective, self.optim, self.exploration, self.guards
        return {
            "policy": {"parameterisation": p.parameterisation, "lora_rank": p.lora_rank,
                       "head_hidden": p.head_hidden, "head_layers": p.head_layers, "head_preset": p.head_preset,
                       "in_scale": p.in_scale, "features": list(p.features), "learn_variance": p.learn_variance,
                       "guidance": p.guidance, "guidance_scale": p.guidance_scale,
                       "learn_guidance_gain": p.learn_guidance_gain, "guidance_gain_init": p.guidance_gain_init,
                       **({"step_variance_tau2": p.step_variance_tau2} if p.step_variance_tau2 is not None else {}),
                       **{k: getattr(p, k) for k, neutral in STEP_OPTIONS if getattr(p, k) != neutral}},
            "objective": {"amortized": o.amortized, "logz": o.logz, "group_size": o.group_size,
                          "beta_start": o.beta_start, "beta_ramp_steps": o.beta_ramp_steps,
                          "dead_zone": o.dead_zone, **({"huber": o.huber} if o.huber > 0 else {})},
            "optim": {"batch_size": m.batch_size, "lr": m.lr, "lr_logz": m.lr_logz, "lr_per_step": m.lr_per_step,
                      "lr_final_frac": m.lr_final_frac, "grad_clip": m.grad_clip, "ema_decay": m.ema_decay},
            "exploration": {"replay_rate": e.replay_rate, "replay_capacity": e.replay_capacity,
                            "replay_priority_frac": e.replay_priority_frac, "prior_rate": e.prior_rate,
                            "tempered_rate": e.tempered_rate, "tempered_std_scale": e.tempered_std_scale,
                            "dps_rate": e.dps_rate, "dps_scale": e.dps_scale},
            "guards": {"spike_factor": g.spike_factor, "spike_warmup": g.spike_warmup,
                       "max_rollbacks": g.max_rollbacks, "rollback_lr_factor": g.rollback_lr_factor,
                       "snapshot_every": g.snapshot_every},
            "seed": self.run.seed,
        }

    def recipe_hash(self) -> str:
        """``"v2-<hex>"``: the versioned hash of :meth:`recipe`."""
        return f"{RECIPE_VERSION}-{config_hash(self.recipe())}"


def legacy_v1_hash(cfg: RTBConfig, K: int, variance: str) -> str:
    """The recipe hash that checkpoints written before the nested ``rtb:`` layout carry (no version tag).

    It hashed the old flat section (every field of today's subsections under its own name, plus the
    chain's ``K`` and ``variance``, and the removed ``learn_step_scale`` / ``guided_variance``), less
    ``steps``, logging, checkpoint cadence, ``eval_samples`` and the device, and less options added late
    while at their neutral value. Used only to accept such checkpoints on resume."""
    flat = {**cfg.flat(), "K": int(K), "variance": str(variance)}
    for k in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_samples"):
        flat.pop(k)
    for k, neutral in (("lora_rank", 0), ("learn_guidance_gain", False), ("lr_per_step", 1e-2),
                       ("guidance_gain_init", 1.0), ("huber", 0.0), ("step_variance_tau2", None), *STEP_OPTIONS):
        if flat[k] == neutral:
            flat.pop(k)
    return config_hash(flat)
