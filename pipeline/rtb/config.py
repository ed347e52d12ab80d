"""``RTBConfig``: the ``rtb:`` section of the pipeline config (validated, one-line errors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.errors import ConfigError


@dataclass
class RTBConfig:
    """RTB fine-tuning settings. Rates are per-iteration probabilities of each behaviour policy; the
    remainder is on-policy. Learning rates are Adam step sizes; log Z is in nats."""

    # chain and parameterisation
    K: int = field(default=50, metadata={"min": 2, "max": 1000})
    variance: str = field(default="small", metadata={"choices": ["small", "large"]})
    parameterisation: str = field(default="head", metadata={"choices": ["head", "full"]})
    lora_rank: int = field(default=0, metadata={"min": 0})  # parameterisation "full": 0 = fine-tune all weights
    head_hidden: int = field(default=128, metadata={"min": 1})
    head_layers: int = field(default=3, metadata={"min": 1})
    head_preset: str = field(default="tiny", metadata={"choices": ["tiny", "small", "medium", "paper"]})
    in_scale: float = field(default=1.0, metadata={"gt": 0})
    features: list[str] = field(default_factory=lambda: ["x0hat", "grad"], metadata={"choices": ["x0hat", "grad"]})
    learn_variance: bool = True
    learn_step_scale: bool = False  # one learned log-variance offset per chain step (all coordinates)
    guidance: str = field(default="none", metadata={"choices": ["none", "dps", "dps_cla"]})
    guidance_scale: float = field(default=1.0, metadata={"min": 0})
    learn_guidance_gain: bool = False  # one learned log-gain per chain step on the guidance offset
    # its value at initialisation (every step): below 1 the start is a weaker-guided chain, which keeps a
    # guidance that points at the wrong modes from locking the policy onto them (README, bench gmm 80-D)
    guidance_gain_init: float = field(default=1.0, metadata={"gt": 0})
    guided_variance: bool = False  # per-pixel step variance from diag(A^T A / sigma^2), learned per-step gain
    # objective
    amortized: bool = False
    logz: str = field(default="scalar", metadata={"choices": ["scalar", "vargrad"]})
    group_size: int = field(default=8, metadata={"min": 2})
    beta_start: float = field(default=1.0, metadata={"gt": 0, "max": 1})
    beta_ramp_steps: int = field(default=0, metadata={"min": 0})
    dead_zone: float = field(default=0.0, metadata={"min": 0})
    # optimisation
    steps: int = field(default=1000, metadata={"min": 0})
    batch_size: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"gt": 0})
    lr_logz: float = field(default=0.1, metadata={"gt": 0})
    lr_per_step: float = field(default=1e-2, metadata={"gt": 0})  # learn_step_scale / learn_guidance_gain
    lr_final_frac: float = field(default=0.1, metadata={"gt": 0, "max": 1})
    grad_clip: float = field(default=10.0, metadata={"gt": 0})
    chunk_size: int = field(default=10, metadata={"min": 1})
    ema_decay: float = field(default=0.0, metadata={"min": 0, "max": 0.99999})
    # exploration
    replay_rate: float = field(default=0.1, metadata={"min": 0, "max": 1})
    replay_capacity: int = field(default=2000, metadata={"min": 1})
    replay_priority_frac: float = field(default=0.5, metadata={"min": 0, "max": 1})
    prior_rate: float = field(default=0.05, metadata={"min": 0, "max": 1})
    tempered_rate: float = field(default=0.1, metadata={"min": 0, "max": 1})
    tempered_std_scale: float = field(default=1.5, metadata={"gt": 0})
    dps_rate: float = field(default=0.0, metadata={"min": 0, "max": 1})
    dps_scale: float = field(default=1.0, metadata={"min": 0})
    # stability
    spike_factor: float = field(default=1000.0, metadata={"min": 0})
    spike_warmup: int = field(default=50, metadata={"min": 0})
    max_rollbacks: int = field(default=3, metadata={"min": 0})
    rollback_lr_factor: float = field(default=0.5, metadata={"gt": 0, "max": 1})
    snapshot_every: int = field(default=10, metadata={"min": 1})
    diverged_logz_tol: float = field(default=1.0, metadata={"gt": 0})
    # bookkeeping
    log_every: int = field(default=10, metadata={"min": 1})
    checkpoint_every: int = field(default=200, metadata={"min": 1})
    keep_checkpoints: int = field(default=3, metadata={"min": 1})
    eval_samples: int = field(default=1000, metadata={"min": 2})
    seed: int = 0
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})

    def validate(self, source="<config>", prefix: str = "") -> None:
        total = self.replay_rate + self.prior_rate + self.tempered_rate + self.dps_rate
        if total > 1.0 + 1e-9:
            raise ConfigError(source, prefix + "replay_rate",
                              f"exploration rates (replay+prior+tempered+dps) sum to {total:.3g} > 1")
        if self.amortized and self.logz != "vargrad":
            raise ConfigError(source, prefix + "logz",
                              "the amortized posterior needs logz: vargrad (Z depends on y; no shared scalar)")
        if self.logz == "vargrad" and self.batch_size % self.group_size:
            raise ConfigError(source, prefix + "group_size",
                              f"batch_size {self.batch_size} must be a multiple of group_size {self.group_size}")

    def hash_fields(self) -> dict:
        """Fields that define the model and objective (a resume must match them; ``steps``,
        logging and checkpoint cadence and the device may change)."""
        d = asdict(self)
        for k in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_samples", "device"):
            d.pop(k)
        # Options added after checkpoints exist are left out while at their neutral value, so a new
        # option that is off does not orphan runs made before it existed (same recipe, same hash).
        for k, neutral in (("lora_rank", 0), ("learn_step_scale", False), ("learn_guidance_gain", False),
                            ("lr_per_step", 1e-2), ("guided_variance", False),
                            ("guidance_gain_init", 1.0)):
            if d.get(k) == neutral:
                d.pop(k)
        return d
