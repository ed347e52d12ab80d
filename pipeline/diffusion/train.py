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
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.diffusion.prior_config import PriorConfig
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import UNet, build_unet, count_parameters
from pipeline.errors import InputFileError
from pipeline.diffusion.network_prior import export_prior, prior_hparams
from pipeline.io.atomic import write_text
from pipeline.io.checkpoint import has_checkpoints, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from pipeline.io.fits import read_image_hdu
from pipeline.runtime import choose_device, tqdm_disable
from pipeline.metrics.source_stats import covered_ranges

log = logging.getLogger(__name__)


def prior_unet(cfg: PriorConfig, in_channels: int, image_size: int) -> UNet:
    """The U-Net of the ``prior:`` section ``cfg`` (its preset with the section's overrides) for images of
    ``in_channels`` channels and side ``image_size`` pixels."""
    return build_unet(cfg.unet, in_channels=in_channels, image_size=image_size,
                      base_channels=cfg.base_channels, channel_mults=cfg.channel_mults,
                      num_res_blocks=cfg.num_res_blocks, attn_levels=cfg.attn_levels, dropout=cfg.dropout)


def prior_schedule(cfg: PriorConfig) -> NoiseSchedule:
    """The linear-beta noise schedule of the ``prior:`` section ``cfg`` (``T`` steps)."""
    return NoiseSchedule(T=cfg.T, beta_start=cfg.beta_start, beta_end=cfg.beta_end)


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
    if c == 1 and info["pixscale"]:  # source maps: record the flux, size and peak ranges trained on
        info["covered"] = covered_ranges(arr[:, 0], float(info["pixscale"]))
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
    schedule = prior_schedule(cfg)
    chash = cfg.result_hash()

    torch.manual_seed(cfg.seed)  # network initialisation
    try:
        net = prior_unet(cfg, c, h)
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
