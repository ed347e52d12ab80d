"""``PriorConfig``: the ``prior:`` section, the recipe a diffusion prior is trained with.

Plain Python (no torch), so the config tree imports fast; the network and the noise schedule it
describes are built by :func:`pipeline.diffusion.train.prior_unet` and
:func:`pipeline.diffusion.train.prior_schedule`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import config_hash, param
from pipeline.diffusion.unet_presets import PRESETS
from pipeline.errors import ConfigError


@dataclass
class PriorConfig:
    """Section ``prior:`` of the pipeline config (diffusion prior training; the chain it is sampled on is
    the ``chain:`` section, the device the top-level ``device``)."""

    data: str | None = param(None, "Training FITS file (the command's --data overrides it).")
    out: str | None = param(None, "Run directory (the command's --out overrides it).")
    data_hdu: str = param("TRAIN", "Image HDU holding the (N, H, W) or (N, C, H, W) training images in physical units.")
    scale: float = param(1.0, "Network units to physical: x_phys = scale * x + offset.", "electron/(s arcsec2)", gt=0)
    offset: float = param(0.0, "Offset of the map from network units to physical ones.", "electron/(s arcsec2)")
    image_size: int | None = param(None, "Image side; when set, the data must match it.", "pixel", min=4)
    channels: int | None = param(None, "Image channels; when set, the data must match it.", min=1)
    unet: str = param("small", "U-Net preset (channels, levels, attention); the fields below override parts of it.",
                      choices=sorted(PRESETS))
    base_channels: int | None = param(None, "Channels of the first U-Net level (null: the preset's).", min=1, max=1024)
    channel_mults: list[int] | None = param(None, "Channel multiplier per U-Net level (null: the preset's).",
                                            min=1, max=16)
    num_res_blocks: int | None = param(None, "Residual blocks per U-Net level (null: the preset's).", min=1, max=8)
    attn_levels: list[int] | None = param(None, "U-Net levels with self-attention (null: the preset's).", min=0)
    dropout: float | None = param(None, "Dropout in the residual blocks (null: the preset's).", min=0.0, max=0.9)
    T: int = param(1000, "Training diffusion steps of the noise schedule.", "steps", min=2)
    beta_start: float = param(1e-4, "First beta of the linear noise schedule.", gt=0, max=0.5)
    beta_end: float = param(0.02, "Last beta of the linear noise schedule.", gt=0, max=0.999)
    steps: int = param(3000, "Optimiser steps; a finished run given more steps resumes and trains on.", "steps", min=1)
    batch_size: int = param(32, "Training images per step.", "samples", min=1)
    lr: float = param(2e-4, "AdamW learning rate after the warm-up.", gt=0, max=1.0)
    warmup_steps: int = param(100, "Steps of linear learning-rate warm-up.", "steps", min=0)
    weight_decay: float = param(0.0, "AdamW weight decay.", min=0.0)
    grad_clip: float = param(1.0, "Global gradient-norm clip; 0 disables clipping.", min=0.0)
    ema_decay: float = param(0.999, "Decay of the exponential moving average of the weights that is exported.",
                             min=0.0, max=1.0)
    augment: str = param("dihedral", "Random symmetries applied to each training image (flips, or the 8 flips "
                         "and quarter turns).", choices=["none", "flip", "dihedral"])
    seed: int = param(0, "Seed of data order, augmentation, timesteps and noise.", min=0)
    checkpoint_every: int = param(500, "Steps between rolling checkpoints.", "steps", min=1)
    keep_checkpoints: int = param(3, "Rolling checkpoints kept.", min=1)
    log_every: int = param(50, "Steps between log lines.", "steps", min=1)
    max_wall_seconds: float = param(0.0, "Safety cap: checkpoint and stop after this long (rerun to resume); 0 = "
                                    "no cap.", "s", min=0.0)

    def validate(self, source, prefix: str = "") -> None:
        if self.beta_start > self.beta_end:
            raise ConfigError(source, prefix + "beta_start", f"must be <= beta_end ({self.beta_end}), got {self.beta_start}")
        mults = self.channel_mults if self.channel_mults is not None else PRESETS[self.unet]["channel_mults"]
        if not mults:
            raise ConfigError(source, prefix + "channel_mults", "must not be empty")
        if self.attn_levels is not None and any(a >= len(mults) for a in self.attn_levels):
            raise ConfigError(source, prefix + "attn_levels", f"levels must be < {len(mults)} (len(channel_mults))")
        if self.image_size is not None and self.image_size % 2 ** (len(mults) - 1):
            raise ConfigError(source, prefix + "image_size",
                              f"must be divisible by {2 ** (len(mults) - 1)} for {len(mults)} UNet levels")

    def result_hash(self) -> str:
        """Hash of the fields that change the trained weights (not steps, logging, paths or caps),
        so a run can be resumed with more steps but not with a different recipe. (Checkpoints made when
        the section also held the device and the sampling chain skipped those too: same hash.)"""
        skip = {"data", "out", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_wall_seconds"}
        return config_hash({k: v for k, v in dataclasses.asdict(self).items() if k not in skip})
