"""Training the diffusion prior: denoising loss, AdamW, EMA, augmentation, exact resume.

Loss: ``E_{x0, t ~ U{1..T}, eps} |eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t) - eps|^2`` (mean over
pixels). Training data are read from an image HDU of a FITS file in PHYSICAL units and mapped to
network units ``x = (x_phys - offset) / scale``.

Reproducibility: the number of steps is fixed by the config; all data order, augmentation, timestep
and noise draws come from one CPU ``torch.Generator`` seeded from ``seed``, whose state is saved in
every checkpoint with the model, EMA and optimizer, so an interrupted-then-resumed run equals an
uninterrupted one bit for bit on CPU. ``max_wall_seconds`` is only a recorded safety cap: when hit,
the run checkpoints and stops without a ``done`` marker; re-running resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import config_hash, param
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import PRESETS, UNet, build_unet, count_parameters
from pipeline.errors import ConfigError, InputFileError
from pipeline.diffusion.network_prior import export_prior, prior_hparams
from pipeline.io.atomic import write_text
from pipeline.io.checkpoint import has_checkpoints, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from pipeline.io.fits import read_image_hdu
from pipeline.runtime import choose_device, tqdm_disable

log = logging.getLogger(__name__)


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

    def build_unet(self, in_channels: int, image_size: int) -> UNet:
        return build_unet(self.unet, in_channels=in_channels, image_size=image_size,
                          base_channels=self.base_channels, channel_mults=self.channel_mults,
                          num_res_blocks=self.num_res_blocks, attn_levels=self.attn_levels, dropout=self.dropout)

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(T=self.T, beta_start=self.beta_start, beta_end=self.beta_end)


def load_training_images(path, hdu: str = "TRAIN", scale: float = 1.0, offset: float = 0.0,
                         image_size: int | None = None, channels: int | None = None) -> tuple[torch.Tensor, dict]:
    """Images of HDU ``hdu`` as a float32 tensor (N, C, H, W) in NETWORK units, plus header info."""
    arr, hdr = read_image_hdu(path, hdu, header=True)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[0] < 1:
        raise InputFileError(path, f"expected (N, H, W) or (N, C, H, W) images, got shape {arr.shape}", field=hdu)
    n, c, h, w = arr.shape
    if image_size is not None and (h, w) != (image_size, image_size):
        raise InputFileError(path, f"images are {h}x{w} but the config says image_size={image_size}", field=hdu)
    if channels is not None and c != channels:
        raise InputFileError(path, f"images have {c} channels but the config says channels={channels}", field=hdu)
    x = (torch.from_numpy(arr) - offset) / scale
    info = {"path": str(path), "hdu": hdu, "n": n, "shape": [c, h, w],
            "bunit": str(hdr.get("BUNIT", "")), "pixscale": hdr.get("PIXSCALE")}
    return x.float().contiguous(), info


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random flips ('flip': left-right and up-down) or the 8 dihedral symmetries ('dihedral')."""
    if mode == "none":
        return x
    B = x.shape[0]
    fl = torch.randint(0, 2, (B,), generator=generator).bool().to(x.device)
    x = torch.where(fl[:, None, None, None], x.flip(-1), x)
    if mode == "flip":
        fu = torch.randint(0, 2, (B,), generator=generator).bool().to(x.device)
        return torch.where(fu[:, None, None, None], x.flip(-2), x)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("dihedral augmentation needs square images (use augment: flip)")
    k = torch.randint(0, 4, (B,), generator=generator).to(x.device)
    rots = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
    return rots[k, torch.arange(B, device=x.device)]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay, min(decay, (1 + step) / (10 + step)), so short runs are not
    dominated by the random initialisation."""
    return min(decay, (1.0 + step) / (10.0 + step))


def lr_at(step: int, cfg: PriorConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (independent of the total steps, so
    extending a run does not change its past)."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint we resume from (atomic rewrite)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by a kill
    write_text(path, "".join(line + "\n" for line in keep))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    target_steps: int
    completed: bool
    final_loss: float
    wall_seconds: float
    steps_per_second: float
    n_params: int
    config_hash: str


def train_prior(cfg: PriorConfig, data_path, run_dir, *, steps: int | None = None, device: str = "auto",
                callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train (or resume) a diffusion prior in ``run_dir``; see the module docstring.

    ``device``: auto, cpu or cuda (:func:`pipeline.runtime.choose_device`).
    ``callback(step, record)`` is called after every optimisation step (tests use it to interrupt).
    Writes ``run_dir/step-N/`` checkpoints, ``metrics.jsonl``, and on completion ``final/`` (EMA
    weights, loadable by :func:`pipeline.diffusion.network_prior.load_prior`) and a ``done`` JSON marker.
    """
    run_dir = Path(run_dir)
    target = int(steps if steps is not None else cfg.steps)
    device = choose_device(device)
    data, data_info = load_training_images(data_path, cfg.data_hdu, cfg.scale, cfg.offset, cfg.image_size,
                                           cfg.channels)
    n_data, (c, h, w) = data.shape[0], data.shape[1:]
    if cfg.augment == "dihedral" and h != w:
        raise InputFileError(data_path, f"images are {h}x{w}: dihedral augmentation needs square images "
                                        "(set augment: flip)", field=cfg.data_hdu)
    schedule = cfg.schedule()
    chash = cfg.result_hash()

    torch.manual_seed(cfg.seed)  # network initialisation
    try:
        net = cfg.build_unet(c, h)
        net(torch.zeros(1, c, h, w), torch.ones(1, dtype=torch.long))  # shape check before training
    except ValueError as exc:
        raise InputFileError(data_path, f"images of shape {c}x{h}x{w} do not fit the UNet ({exc})",
                             field=cfg.data_hdu) from None
    net.to(device)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    hparams = prior_hparams(net, schedule, (c, h, w), cfg.scale, cfg.offset, data=data_info, config_hash=chash,
                            train={"steps": target, "batch_size": cfg.batch_size, "lr": cfg.lr,
                                   "ema_decay": cfg.ema_decay, "augment": cfg.augment, "seed": cfg.seed})
    metrics_path = run_dir / "metrics.jsonl"
    step = 0
    loss_acc = [0.0, 0]
    if has_checkpoints(run_dir):
        ckpt = load_checkpoint(run_dir, names=["model", "ema", "optim"], map_location=device)
        if ckpt.state.get("config_hash") != chash:
            raise InputFileError(run_dir, f"checkpoint was trained with a different prior config (hash "
                                          f"{ckpt.state.get('config_hash')} != {chash}); use a new run directory")
        net.load_state_dict(ckpt.states["model"])
        ema.load_state_dict(ckpt.states["ema"])
        opt.load_state_dict(ckpt.states["optim"])
        restore_rng_state(ckpt.state["rng"], {"data": gen})
        step = ckpt.step
        loss_acc = list(ckpt.state.get("extra", {}).get("loss_acc", [0.0, 0]))
        _truncate_metrics(metrics_path, step)
        log.info("resuming %s from step %d", run_dir, step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    done_path = run_dir / "done"
    if done_path.exists() and step < target:
        done_path.unlink()  # extending a finished run: it is not done any more

    n_params = count_parameters(net)
    log.info("training prior: %d images %s, UNet %s (%d params), %d -> %d steps on %s", n_data, (c, h, w),
             cfg.unet, n_params, step, target, device)
    abar = schedule.alpha_bar.float()

    def checkpoint(at_step):
        state = {"config_hash": chash, "rng": rng_state({"data": gen}), "extra": {"loss_acc": loss_acc}}
        save_checkpoint(run_dir, at_step, {"model": net.state_dict(), "ema": ema.state_dict(),
                                           "optim": opt.state_dict()}, hparams, state, keep=cfg.keep_checkpoints)

    t_start = time.perf_counter()
    start_step = step
    last_loss = float("nan")
    stopped_early = False
    net.train()
    with tqdm(total=target, initial=step, disable=tqdm_disable(), desc="train-prior", unit="step") as bar:
        while step < target:
            idx = torch.randint(0, n_data, (cfg.batch_size,), generator=gen)
            x0 = augment_batch(data[idx], cfg.augment, gen)
            t = torch.randint(1, schedule.T + 1, (cfg.batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            ab = abar[t][:, None, None, None]
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            xt, t, noise = xt.to(device), t.to(device), noise.to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss = F.mse_loss(net(xt, t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
            else:
                gnorm = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in net.parameters()
                                             if p.grad is not None)))
            opt.step()
            ema_update(ema, net, ema_decay_at(step, cfg.ema_decay))
            step += 1
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"training loss is {last_loss} at step {step}; lower lr or check the data")
            loss_acc[0] += last_loss
            loss_acc[1] += 1
            bar.update(1)
            record = {"step": step, "loss": last_loss, "lr": lr_at(step - 1, cfg), "grad_norm": gnorm}
            if step % cfg.log_every == 0 or step == target:
                elapsed = time.perf_counter() - t_start
                rec = {"step": step, "loss": loss_acc[0] / max(loss_acc[1], 1), "last_loss": last_loss,
                       "lr": record["lr"], "grad_norm": gnorm, "elapsed_s": round(elapsed, 3),
                       "steps_per_s": round((step - start_step) / max(elapsed, 1e-9), 4)}
                _append_jsonl(metrics_path, rec)
                log.info("step %d loss %.4f (%.2f steps/s)", step, rec["loss"], rec["steps_per_s"])
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                loss_acc = [0.0, 0]
            if step % cfg.checkpoint_every == 0 or step == target:
                checkpoint(step)
            if callback is not None:
                callback(step, record)
            if cfg.max_wall_seconds and time.perf_counter() - t_start > cfg.max_wall_seconds and step < target:
                checkpoint(step)
                _append_jsonl(metrics_path, {"step": step, "event": "wall_clock_cap",
                                             "max_wall_seconds": cfg.max_wall_seconds})
                log.warning("wall-clock cap of %.0f s reached at step %d of %d; checkpointed, rerun to resume",
                            cfg.max_wall_seconds, step, target)
                stopped_early = True
                break
    wall = time.perf_counter() - t_start
    completed = step >= target and not stopped_early
    if completed and not done_path.exists():
        export_prior(run_dir / "final", ema.state_dict(), {**hparams, "step": step})
        marker = {"step": step, "target_steps": target, "config_hash": chash, "final_loss": last_loss,
                  "n_params": n_params}
        write_text(done_path, json.dumps(marker, indent=2) + "\n")
    sps = (step - start_step) / wall if wall > 0 else float("nan")
    return TrainResult(run_dir=run_dir, step=step, target_steps=target, completed=completed, final_loss=last_loss,
                       wall_seconds=wall, steps_per_second=sps, n_params=n_params, config_hash=chash)
