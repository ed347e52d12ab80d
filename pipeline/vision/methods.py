"""The methods of the vision benchmark: DPS-scale tuning, amortized RTB (plain or with frozen DPS
guidance) trained per task, the training-free samplers, and the per-observation scores.

log Z (nats) comes from the trajectory log-weights ``log r + log p_theta(tau) - log q(tau)`` (ELBO with
its standard error, and importance-weighted); for prior + importance resampling the IW value is its own
estimate over all proposals and the ELBO the plain prior chain's. NFE counts network evaluations per
sample (RTB: K prior + K-1 head calls).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from pipeline.config import config_hash
from pipeline.metrics.logz import estimate_logz, log_weights
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.posterior import build_posterior, posterior_spec
from pipeline.rtb.sampler import RTBSampler
from pipeline.rtb.trainer import RTBTrainer
from pipeline.samplers import make_sampler
from pipeline.samplers.tuning import tune_scale
from pipeline.vision.config import VisionConfig
from pipeline.vision.metrics import psnr, ssim
from pipeline.vision.operators import align_phase_retrieval
from pipeline.vision.tasks import Context, Task


def finite_or_none(v):
    """v as a float, or None when it is None or not finite."""
    return None if v is None or not math.isfinite(v) else float(v)


def logz_from_samples(s) -> dict:
    """log Z (nats) of one observation's samples: ELBO with its standard error, IW and ESS (None where
    the method has no trajectory density nor an IW estimate of its own)."""
    out = {"elbo": None, "elbo_se": None, "iw": None, "ess": None}
    if s.has_trajectory_density:
        est = estimate_logz(log_weights(s.log_r, s.log_p_traj, s.log_q_traj))
        out.update(elbo=finite_or_none(est.elbo), elbo_se=finite_or_none(est.elbo_se), iw=finite_or_none(est.iw),
                   ess=finite_or_none(est.ess))
    elif s.info.get("logz_iw") is not None:
        out.update(iw=finite_or_none(s.info["logz_iw"]), elbo=finite_or_none(s.info.get("prior_elbo")),
                   elbo_se=finite_or_none(s.info.get("prior_elbo_se")))
    return out


def tune_dps_scale(cfg: VisionConfig, task: Task, seed: int) -> tuple[float, dict]:
    """DPS's scale from ``cfg.dps_grid`` on the extra (tuning) observation, by ELBO or mean log r
    (:func:`pipeline.samplers.tuning.tune_scale`, ``cfg.n_samples`` samples seeded by ``seed``)."""
    return tune_scale(lambda s: make_sampler("dps", task.prior, task.chain, scale=s), [(task.problem, task.ys[-1])],
                      grid=cfg.dps_grid, n=cfg.n_samples, seed=seed, objective=cfg.dps_tune_metric,
                      label=f"{task.key} dps scale")


def cond_fn_for(task: Task):
    """The observation enters RTB's head as extra image channels when it lives on x's grid (pixel-space
    inpainting and deblurring); otherwise (phase retrieval, latent space) only through the likelihood-
    gradient feature, and cond is an empty (B, 0, H, W) tensor so replay and batching still work."""
    C, H, W = task.prior.event_shape
    use_image = task.space == "pixel" and tuple(task.problem.y_shape) == tuple(task.problem.x_shape)

    def cond_fn(_problem, y):
        if use_image:
            return y
        return torch.zeros((y.shape[0], 0, H, W), dtype=y.dtype, device=y.device)

    return cond_fn, (C if use_image else 0)


def rtb_config(cfg: VisionConfig, guidance: str, scale: float, dps_scale: float) -> RTBConfig:
    """``cfg.rtb`` for one RTB variant: ``guidance`` 'none' (plain amortized RTB, whose DPS-explored
    rollouts use ``dps_scale``) or 'dps' (frozen DPS guidance at ``scale`` in the policy; no DPS
    exploration). Both record ``scale`` as the guidance scale, so their run directories stay apart."""
    dps_rate = cfg.rtb.exploration.dps_rate if guidance == "none" else 0.0
    return cfg.rtb.with_fields(guidance=guidance, guidance_scale=scale, dps_rate=dps_rate, dps_scale=dps_scale)


def policy_samples(post, problem, cond_fn, y, n, generator, K):
    """n samples of the posterior ``post`` at the observation y of ``problem``, with their trajectory
    log-densities, as Samples."""
    name = "rtb_amortized" if post.guidance is None else "rtb_dps"
    return RTBSampler(post, name, cond_fn=cond_fn, batch_size=n).sample(problem, y, n, generator=generator)


def tune_rtb_dps_scale(cfg: VisionConfig, task: Task, seed: int) -> tuple[float, dict]:
    """Scale of RTB+DPS's frozen (Jacobian-free) DPS guidance, picked by ELBO of the untrained policy
    (q = prior + guidance: the head starts at zero) on the tuning observation. The frozen guidance uses
    d x0_hat / d x_k ~ I / sqrt(abar_k), far stronger than the network's Jacobian at high noise, so the
    network-DPS scale does not transfer."""
    cond_fn, cond_channels = cond_fn_for(task)

    def sampler_at(scale):
        spec = posterior_spec(task.prior, task.chain, rtb_config(cfg, "dps", scale, scale), cond_channels=cond_channels)
        post = build_posterior(task.prior, spec)
        return RTBSampler(post, "rtb_dps", cond_fn=cond_fn, batch_size=cfg.n_samples)

    return tune_scale(sampler_at, [(task.problem, task.ys[-1])], grid=cfg.rtb_dps_grid, n=cfg.n_samples, seed=seed,
                      objective="elbo", label=f"{task.key} rtb_dps guidance scale")


class RTBMethod:
    """Amortized RTB posterior for one task (optionally with frozen DPS guidance): train, then sample."""

    def __init__(self, cfg: VisionConfig, task: Task, ctx: Context, *, guidance: str, scale: float,
                 dps_scale: float):
        self.task, self.guidance = task, guidance
        self.cond_fn, cond_channels = cond_fn_for(task)
        self.rcfg = rtb_config(cfg, guidance, scale, dps_scale)
        spec = posterior_spec(task.prior, task.chain, self.rcfg, cond_channels=cond_channels)
        self.post = build_posterior(task.prior, spec)
        name = f"{task.ds_name}-{task.space}-{task.task}-{'rtb_dps' if guidance != 'none' else 'rtb'}"
        prior_id = str(task.prior.meta.get("checkpoint", ""))
        run_dir = ctx.out / "rtb" / f"{name}-{config_hash([self.rcfg.recipe(), spec, prior_id])}"
        self.trainer = RTBTrainer(self.post, self.rcfg, problem=task.problem, obs_sampler=task.obs_sampler,
                                  cond_fn=self.cond_fn,
                                  run_dir=run_dir, metrics_path=run_dir / "metrics.jsonl", spec=spec)
        t0 = time.perf_counter()
        self.trainer.resume()
        self.trainer.train()
        self.train_seconds = time.perf_counter() - t0
        self.summary = self.trainer.summary()
        self.n_head_params = sum(p.numel() for p in self.post.trainable_parameters())

    def sample(self, y, n, generator):
        with self.trainer.ema_weights():
            return policy_samples(self.post, self.task.problem, self.cond_fn, y.to(self.task.truths.device), n,
                                  generator,
                                  self.task.chain.K)

    def budget(self, cfg: VisionConfig) -> str:
        flag = "DIVERGED (rollback limit hit); " if self.summary.get("diverged") else ""
        return (f"{flag}K={cfg.chain.K}; train {self.summary['steps']} it x {cfg.rtb.optim.batch_size} traj, "
                f"{self.summary.get('rollbacks', 0)} rollbacks "
                f"({self.train_seconds:.0f} s this run), head {self.n_head_params / 1e3:.0f}k params; "
                f"sample: K prior + K-1 head evals")


def build_sampler(method: str, cfg: VisionConfig, task: Task, dps_scale: float):
    """(training-free sampler, budget text) of ``method`` on ``task``."""
    if method == "dps":
        return make_sampler("dps", task.prior, task.chain, scale=dps_scale), f"K={cfg.chain.K}, scale {dps_scale:g}"
    if method == "dps_cla":
        return (make_sampler("dps_cla", task.prior, task.chain, scale=cfg.dps_cla_scale),
                f"K={cfg.chain.K}, scale {cfg.dps_cla_scale:g}")
    if method == "prior_is":
        return (make_sampler("prior_is", task.prior, task.chain, particles=cfg.prior_is_particles),
                f"K={cfg.chain.K}, {cfg.prior_is_particles} proposals/sample")
    if method == "fps":
        return make_sampler("fps", task.prior, task.chain, c_rate=cfg.fps_c_rate), f"K={cfg.chain.K}, 1 particle"
    if method == "fps_smc":
        return (make_sampler("fps_smc", task.prior, task.chain, particles=cfg.fps_smc_particles,
                             c_rate=cfg.fps_c_rate), f"K={cfg.chain.K}, {cfg.fps_smc_particles} particles/sample")
    raise ValueError(method)


def score_observation(task: Task, i: int, samples) -> tuple[dict, torch.Tensor]:
    """(per-observation metrics, images) of one method's samples: mean log r, PSNR / SSIM of the samples
    and PSNR of their mean against the truth (phase retrieval: after alignment), log Z."""
    imgs = task.images(samples.x0).float()
    truth = task.truths[i]
    if task.task == "phase_retrieval":
        imgs = align_phase_retrieval(imgs, truth, task.image_op.pad)
    rec = {"mean_log_r": float(samples.log_r.double().mean()), "psnr": float(np.mean(psnr(imgs, truth))),
           "ssim": float(np.mean(ssim(imgs, truth))),
           "psnr_of_mean": float(psnr(imgs.mean(0, keepdim=True), truth)[0])}
    rec.update(logz_from_samples(samples))
    return rec, imgs
