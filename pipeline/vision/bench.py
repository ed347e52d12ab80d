"""``python -m pipeline bench vision``: MNIST / CIFAR-10 inverse problems in pixel and latent space.

For every dataset x task (x space: pixel, latent) the bench

1. loads the dataset (:mod:`pipeline.vision.datasets`; offline) and writes the training FITS;
2. trains (or resumes) one diffusion prior per dataset with the package's own trainer
   (:func:`pipeline.diffusion.train.train_prior`), and for the latent variant a small autoencoder and a
   prior on its latents; the denoised estimate is clipped to the data range (pixels [-1, 1], latents
   +-``latent_clip``; :class:`pipeline.vision.clipped_prior.ClippedPrior`) for every method alike;
3. builds the task's fixed operator (:mod:`pipeline.vision.operators`) and simulates ``n_obs``
   observations from held-out TEST images (noise seeded per observation), plus one extra observation
   used only to tune DPS's scale;
4. samples every method on the SAME observations with the same K-step chain:
   amortized RTB (one posterior per dataset x task, trained on observations simulated from TRAIN
   images), RTB+DPS (the same with frozen DPS guidance in its parameterisation), DPS, DPS+CLA,
   prior + importance resampling, FPS and FPS-SMC (the last three on linear pixel-space tasks only);
5. scores each observation: mean log r, log Z as ELBO +- standard error and importance-weighted (IW)
   from the trajectory log-weights ``log r + log p_theta(tau) - log q(tau)`` (per observation, never
   pooled), PSNR and SSIM against the truth (phase retrieval: after aligning each sample to the truth
   over shifts and the 180-degree rotation, which |FFT| cannot see), seconds and network evaluations
   per sample;
6. writes ``table.md`` / ``table.json`` (per dataset x space x task x method, means over observations,
   with each method's compute budget), ``per_observation.jsonl`` and figure grids ``figures/*.png``.

log Z for FPS-SMC is not available (its normaliser targets the bridged model); for prior+IS the IW
value is the importance-sampling estimate from all its proposals (q = prior chain) and the ELBO column
is the plain prior chain's (mean log r over proposals).

NFE (network evaluations per sample): prior eps calls, plus vector-Jacobian products for DPS-type
guidance, plus correction-head calls for RTB (the head is a much smaller network; listed apart in the
budget column).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import config_hash, from_mapping
from pipeline.errors import ConfigError
from pipeline.vision.clipped_prior import ClippedPrior
from pipeline.vision.config import QUICK, VisionConfig, method_applies

log = logging.getLogger(__name__)

SPACES = ("pixel", "latent")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML config (section 'vision:')")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: vision.out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of a few minutes: MNIST, 2 tasks + 1 latent task, tiny budgets")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="override vision.datasets (mnist cifar10)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="override vision.tasks")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="override vision.methods")
    parser.add_argument("--latent-datasets", nargs="*", metavar="NAME", help="override vision.latent_datasets")
    parser.add_argument("--latent-tasks", nargs="*", metavar="TASK", help="override vision.latent_tasks")
    parser.add_argument("--mnist-dir", metavar="DIR", help="MNIST IDX directory (else the bundled 5k subset)")
    parser.add_argument("--cifar10-dir", metavar="DIR", help="cifar-10-batches-py directory (else the stand-in)")
    parser.add_argument("--n-obs", type=int, metavar="N", help="override vision.n_obs")
    parser.add_argument("--n-samples", type=int, metavar="N", help="override vision.n_samples")
    parser.add_argument("--seed", type=int, help="override vision.seed")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override vision.device")


def config_from_args(args) -> tuple[VisionConfig, str]:
    """Config = defaults <- file section <- --quick <- explicit flags (validated together)."""
    source = args.config or "<defaults>"
    data: dict = {}
    if args.config:
        from pipeline.config import load_yaml

        raw = load_yaml(args.config).get("vision") or {}
        if not isinstance(raw, dict):
            raise ConfigError(args.config, "vision", "expected a mapping")
        data.update(raw)
    if getattr(args, "quick", False):
        data.update(QUICK)
    flags = {"out": args.out, "datasets": args.datasets, "tasks": args.tasks, "methods": args.methods,
             "latent_datasets": args.latent_datasets, "latent_tasks": args.latent_tasks,
             "mnist_dir": args.mnist_dir, "cifar10_dir": args.cifar10_dir, "n_obs": args.n_obs,
             "n_samples": args.n_samples, "seed": args.seed, "device": args.device}
    data.update({k: v for k, v in flags.items() if v is not None})
    cfg = from_mapping(VisionConfig, data, source, prefix="vision.")
    return cfg, source


def run(args) -> int:
    from pipeline.runtime import configure_threads

    configure_threads()
    cfg, source = config_from_args(args)
    summary = run_bench(cfg)
    print(json.dumps({"out": cfg.out, "rows": len(summary["rows"]), "claim": summary["claim"]["summary"]}))
    return 0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _write_text_atomic(path: Path, text: str) -> None:
    from pipeline.io.atomic import write_text

    write_text(path, text)


def _finite(v):
    return None if v is None or not math.isfinite(v) else float(v)


def _recorded_train_seconds(run_dir: Path) -> float | None:
    """Wall seconds of the (last) training session, from the trainer's metrics.jsonl."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "elapsed_s" in rec:
            return float(rec["elapsed_s"])
    return None


def _prior_config(cfg: VisionConfig, *, unet: str, steps: int, augment: str, channel_mults=None):
    from pipeline.diffusion.train import PriorConfig

    return PriorConfig(unet=unet, channel_mults=channel_mults, steps=steps, batch_size=cfg.prior_batch, lr=cfg.prior_lr, seed=cfg.seed,
                       device=cfg.device, augment=augment, sample_K=cfg.K, sample_variance=cfg.variance,
                       warmup_steps=min(100, max(1, steps // 10)), checkpoint_every=max(100, steps // 4),
                       log_every=max(10, steps // 20), ema_decay=0.999 if steps >= 2000 else 0.99)


class Context:
    """Trained artefacts per dataset (loaded lazily, cached): dataset, pixel prior, autoencoder, latent prior."""

    def __init__(self, cfg: VisionConfig, out: Path, device):
        self.cfg, self.out, self.device = cfg, out, device
        self._ds, self._prior, self._ae, self._lprior = {}, {}, {}, {}
        self.costs: dict[str, dict] = {}

    def dataset(self, name):
        if name not in self._ds:
            from pipeline.vision.datasets import load_dataset, summary, write_training_fits

            ds = load_dataset(name, mnist_dir=self.cfg.mnist_dir, cifar10_dir=self.cfg.cifar10_dir, seed=self.cfg.seed,
                              standin_train=self.cfg.standin_train)
            log.info("dataset %s", summary(ds))
            path = self.out / "data" / f"{ds.name}.fits"
            if not path.exists():
                write_training_fits(path, ds)
            self._ds[name] = (ds, path)
        return self._ds[name]

    def prior(self, name):
        if name not in self._prior:
            from pipeline.diffusion.train import train_prior
            from pipeline.diffusion.network_prior import load_prior

            ds, path = self.dataset(name)
            augment = "none" if name == "mnist" else "flip"  # digits are not mirror-symmetric
            pcfg = _prior_config(self.cfg, unet=self.cfg.prior_unet, steps=self.cfg.prior_steps, augment=augment,
                                 channel_mults=self.cfg.prior_channel_mults)
            run_dir = self.out / "priors" / f"{ds.name}-{pcfg.result_hash()}"
            res = train_prior(pcfg, path, run_dir)
            if not res.completed:
                raise RuntimeError(f"prior training for {name} did not complete ({res.step}/{res.target_steps})")
            self._prior[name] = ClippedPrior(load_prior(run_dir, device=self.device), -1.0, 1.0)
            self.costs[f"prior:{name}"] = {"steps": res.step, "seconds_this_run": round(res.wall_seconds, 1),
                                           "train_seconds_recorded": _recorded_train_seconds(run_dir),
                                           "n_params": res.n_params, "unet": pcfg.unet, "run_dir": str(run_dir)}
        return self._prior[name]

    def autoencoder(self, name):
        if name not in self._ae:
            from pipeline.vision.autoencoder import load_autoencoder, save_autoencoder, train_autoencoder

            ds, _ = self.dataset(name)
            hp = {"steps": self.cfg.ae_steps, "base": self.cfg.ae_base_channels, "lat": self.cfg.latent_channels,
                  "seed": self.cfg.seed, "ds": ds.name, "n": len(ds.train)}
            path = self.out / "ae" / f"{ds.name}-{config_hash(hp)}.pt"
            if path.exists():
                ae, meta = load_autoencoder(path, device=self.device)
            else:
                ae, hist = train_autoencoder(ds.train, latent_channels=self.cfg.latent_channels,
                                             base_channels=self.cfg.ae_base_channels, steps=self.cfg.ae_steps,
                                             seed=self.cfg.seed, device=self.device, valid=ds.valid)
                meta = {"dataset": ds.name, "valid_mse": hist["valid_mse"], "seconds": hist["seconds"],
                        "latent_scale": hist["latent_scale"], "hparams": hp}
                save_autoencoder(ae, path, meta)
                ae, meta = load_autoencoder(path, device=self.device)
            baseline = float(((ds.valid - ds.train.mean(0)) ** 2).mean())
            self.costs[f"autoencoder:{name}"] = {"steps": self.cfg.ae_steps, "valid_mse": meta.get("valid_mse"),
                                                 "mean_image_mse": baseline, "path": str(path)}
            self._ae[name] = ae
        return self._ae[name]

    def latent_prior(self, name):
        if name not in self._lprior:
            from pipeline.diffusion.train import train_prior
            from pipeline.diffusion.network_prior import load_prior
            from pipeline.vision.autoencoder import encode_images
            from pipeline.vision.datasets import VisionDataset, write_training_fits

            ds, _ = self.dataset(name)
            ae = self.autoencoder(name)
            ae_id = Path(self.costs[f"autoencoder:{name}"]["path"]).stem
            path = self.out / "data" / f"{ae_id}-latents.fits"
            if not path.exists():
                lds = VisionDataset(f"{ds.name}-latent", encode_images(ae, ds.train), encode_images(ae, ds.valid),
                                    encode_images(ae, ds.test), source=f"latents of {ds.name} by {ae_id}",
                                    standin=ds.standin)
                write_training_fits(path, lds)
            pcfg = _prior_config(self.cfg, unet=self.cfg.latent_prior_unet, steps=self.cfg.latent_prior_steps,
                                 augment="none")
            run_dir = self.out / "priors" / f"{ae_id}-latent-{pcfg.result_hash()}"
            res = train_prior(pcfg, path, run_dir)
            if not res.completed:
                raise RuntimeError(f"latent prior training for {name} did not complete")
            lp = load_prior(run_dir, device=self.device)
            c = self.cfg.latent_clip
            self._lprior[name] = ClippedPrior(lp, -c, c) if c > 0 else lp
            self.costs[f"latent_prior:{name}"] = {"steps": res.step, "seconds_this_run": round(res.wall_seconds, 1),
                                           "train_seconds_recorded": _recorded_train_seconds(run_dir),
                                                  "n_params": res.n_params, "unet": pcfg.unet, "run_dir": str(run_dir)}
        return self._lprior[name]


class Task:
    """One dataset x space x task: the fixed problem, truths and observations."""

    def __init__(self, ctx: Context, dataset: str, space: str, task: str):
        from pipeline.vision.latent import LatentProblem
        from pipeline.vision.operators import make_operator

        cfg = ctx.cfg
        self.dataset, self.space, self.task = dataset, space, task
        ds, _ = ctx.dataset(dataset)
        self.ds_name = ds.name
        self.image_op = make_operator(task, ds.image_shape, sigma_y=cfg.sigma_y, seed=cfg.operator_seed, box=cfg.box,
                                      p_missing=cfg.p_missing, oversample=cfg.oversample,
                                      kernel_size=cfg.kernel_size, crf_strength=cfg.crf_strength).to(ctx.device)
        if space == "latent":
            self.prior = ctx.latent_prior(dataset)
            self.problem = LatentProblem(self.image_op, ctx.autoencoder(dataset)).to(ctx.device)
        else:
            self.prior = ctx.prior(dataset)
            self.problem = self.image_op
        self.chain = self.prior.schedule.chain(cfg.K, cfg.variance)
        # observations: n_obs test images + 1 tuning image; the noise is seeded per observation
        rng = np.random.default_rng(cfg.seed + 7)
        idx = rng.choice(len(ds.test), size=cfg.n_obs + 1, replace=False)
        self.truth_index = [int(i) for i in idx]
        self.truths = torch.as_tensor(ds.test[idx]).to(ctx.device)
        ys = []
        for i in range(cfg.n_obs + 1):
            g = torch.Generator().manual_seed(cfg.seed * 100003 + 1009 * i + 17)
            ys.append(self.image_op.simulate(self.truths[i:i + 1], generator=g)[0])
        self.ys = torch.stack(ys)
        self.train_images = torch.as_tensor(ds.train)
        self.key = f"{self.ds_name}/{space}/{task}"

    @property
    def n_obs(self) -> int:
        return self.truths.shape[0] - 1

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples in image space (decoded for the latent variant), detached."""
        with torch.no_grad():
            return (self.problem.decode(x0) if self.space == "latent" else x0).detach()

    def obs_sampler(self, G: int, generator) -> torch.Tensor:
        """G observations simulated from random TRAIN images (for amortized RTB training)."""
        idx = torch.randint(0, len(self.train_images), (G,), generator=generator)
        x = self.train_images[idx].to(self.truths.device)
        return self.image_op.simulate(x, generator=generator)


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
def _logz_from_samples(s) -> dict:
    from pipeline.metrics.logz import estimate_logz, log_weights

    out = {"elbo": None, "elbo_se": None, "iw": None, "ess": None}
    if s.has_trajectory_density:
        est = estimate_logz(log_weights(s.log_r, s.log_p_traj, s.log_q_traj))
        out.update(elbo=_finite(est.elbo), elbo_se=_finite(est.elbo_se), iw=_finite(est.iw), ess=_finite(est.ess))
    elif s.info.get("logz_iw") is not None:
        out.update(iw=_finite(s.info["logz_iw"]), elbo=_finite(s.info.get("prior_elbo")),
                   elbo_se=_finite(s.info.get("prior_elbo_se")))
    return out


def tune_dps_scale(cfg: VisionConfig, task: Task, generator) -> tuple[float, list[dict]]:
    """Pick DPS's scale from ``cfg.dps_grid`` on the extra (tuning) observation, by ELBO or mean log r."""
    from pipeline.samplers import make_sampler

    y = task.ys[-1]
    rec = []
    for scale in cfg.dps_grid:
        s = make_sampler("dps", task.prior, task.chain, scale=scale).sample(task.problem, y, cfg.n_samples,
                                                                              generator=generator)
        lz = _logz_from_samples(s)
        rec.append({"scale": scale, "mean_log_r": float(s.log_r.mean()), "elbo": lz["elbo"]})
    key = "elbo" if cfg.dps_tune_metric == "elbo" else "mean_log_r"
    best = max(rec, key=lambda r: -math.inf if r[key] is None else r[key])
    return float(best["scale"]), rec


def _cond_fn_for(task: Task):
    """The observation enters RTB's head as extra image channels when it lives on x's grid (pixel-space
    inpainting and deblurring); otherwise (phase retrieval, latent space) only through the likelihood-
    gradient feature, and cond is an empty (B, 0, H, W) tensor so replay and batching still work."""
    C, H, W = task.prior.event_shape
    use_image = task.space == "pixel" and tuple(task.problem.y_shape) == tuple(task.problem.x_shape)

    def cond_fn(y):
        if use_image:
            return y
        return torch.zeros((y.shape[0], 0, H, W), dtype=y.dtype, device=y.device)

    return cond_fn, (C if use_image else 0)


def _rtb_config(cfg: VisionConfig, guidance: str, scale: float, dps_scale: float):
    from pipeline.rtb.config import RTBConfig

    return RTBConfig(K=cfg.K, variance=cfg.variance, parameterisation="head", head_preset=cfg.rtb_head,
                     features=["x0hat", "grad"], guidance=guidance, guidance_scale=scale,
                     amortized=True, logz="vargrad", group_size=cfg.rtb_group, steps=cfg.rtb_steps,
                     batch_size=cfg.rtb_batch, lr=cfg.rtb_lr, replay_rate=cfg.rtb_replay_rate,
                     prior_rate=0.0, tempered_rate=0.1,
                     dps_rate=cfg.rtb_dps_rate if guidance == "none" else 0.0, dps_scale=dps_scale,
                     seed=cfg.seed, device=cfg.device, log_every=max(1, cfg.rtb_steps // 20),
                     checkpoint_every=max(1, cfg.rtb_steps), eval_samples=cfg.n_samples)


def _policy_samples(post, cond_fn, y, n, generator, K):
    from pipeline.rtb.sampler import RTBSampler

    name = "rtb_amortized" if post.guidance is None else "rtb_dps"
    return RTBSampler(post, name, cond_fn=cond_fn, batch_size=n).sample(None, y, n, generator=generator)


def tune_rtb_dps_scale(cfg: VisionConfig, task: Task, generator) -> tuple[float, list[dict]]:
    """Scale of RTB+DPS's frozen (Jacobian-free) DPS guidance, picked by ELBO of the untrained policy
    (q = prior + guidance: the head starts at zero) on the tuning observation. The frozen guidance uses
    d x0_hat / d x_k ~ I / sqrt(abar_k), far stronger than the network's Jacobian at high noise, so the
    network-DPS scale does not transfer."""
    from pipeline.rtb.posterior import build_posterior, posterior_spec

    cond_fn, cond_channels = _cond_fn_for(task)
    y = task.ys[-1]
    rec = []
    for scale in cfg.rtb_dps_grid:
        spec = posterior_spec(task.prior, _rtb_config(cfg, "dps", scale, scale), cond_channels=cond_channels)
        post = build_posterior(task.prior, task.problem, spec)
        s = _policy_samples(post, cond_fn, y, cfg.n_samples, generator, cfg.K)
        lz = _logz_from_samples(s)
        rec.append({"scale": scale, "mean_log_r": float(s.log_r.mean()), "elbo": lz["elbo"]})
    best = max(rec, key=lambda r: -math.inf if r["elbo"] is None else r["elbo"])
    return float(best["scale"]), rec


class RTBMethod:
    """Amortized RTB posterior for one task (optionally with frozen DPS guidance): train, then sample."""

    def __init__(self, cfg: VisionConfig, task: Task, ctx: Context, *, guidance: str, scale: float,
                 dps_scale: float):
        from pipeline.rtb.posterior import build_posterior, posterior_spec
        from pipeline.rtb.trainer import RTBTrainer

        self.task, self.guidance = task, guidance
        self.cond_fn, cond_channels = _cond_fn_for(task)
        self.rcfg = _rtb_config(cfg, guidance, scale, dps_scale)
        spec = posterior_spec(task.prior, self.rcfg, cond_channels=cond_channels)
        self.post = build_posterior(task.prior, task.problem, spec)
        name = f"{task.ds_name}-{task.space}-{task.task}-{'rtb_dps' if guidance != 'none' else 'rtb'}"
        prior_id = str(task.prior.meta.get("checkpoint", ""))
        run_dir = ctx.out / "rtb" / f"{name}-{config_hash([self.rcfg.hash_fields(), spec, prior_id])}"
        self.trainer = RTBTrainer(self.post, self.rcfg, obs_sampler=task.obs_sampler, cond_fn=self.cond_fn,
                                  run_dir=run_dir, metrics_path=run_dir / "metrics.jsonl", spec=spec)
        t0 = time.perf_counter()
        self.trainer.resume()
        self.trainer.train()
        self.train_seconds = time.perf_counter() - t0
        self.summary = self.trainer.summary()
        self.n_head_params = sum(p.numel() for p in self.post.trainable_parameters())

    def sample(self, y, n, generator):
        with self.trainer.ema_weights():
            return _policy_samples(self.post, self.cond_fn, y.to(self.task.truths.device), n, generator,
                                   self.task.chain.K)

    def budget(self, cfg: VisionConfig) -> str:
        flag = "DIVERGED (rollback limit hit); " if self.summary.get("diverged") else ""
        return (f"{flag}K={cfg.K}; train {self.summary['steps']} it x {cfg.rtb_batch} traj, "
                f"{self.summary.get('rollbacks', 0)} rollbacks "
                f"({self.train_seconds:.0f} s this run), head {self.n_head_params / 1e3:.0f}k params; "
                f"sample: K prior + K-1 head evals")


def build_sampler(method: str, cfg: VisionConfig, task: Task, dps_scale: float):
    from pipeline.samplers import make_sampler

    if method == "dps":
        return make_sampler("dps", task.prior, task.chain, scale=dps_scale), f"K={cfg.K}, scale {dps_scale:g}"
    if method == "dps_cla":
        return (make_sampler("dps_cla", task.prior, task.chain, scale=cfg.dps_cla_scale),
                f"K={cfg.K}, scale {cfg.dps_cla_scale:g}")
    if method == "prior_is":
        return (make_sampler("prior_is", task.prior, task.chain, particles=cfg.prior_is_particles),
                f"K={cfg.K}, {cfg.prior_is_particles} proposals/sample")
    if method == "fps":
        return make_sampler("fps", task.prior, task.chain, c_rate=cfg.fps_c_rate), f"K={cfg.K}, 1 particle"
    if method == "fps_smc":
        return (make_sampler("fps_smc", task.prior, task.chain, particles=cfg.fps_smc_particles,
                             c_rate=cfg.fps_c_rate), f"K={cfg.K}, {cfg.fps_smc_particles} particles/sample")
    raise ValueError(method)


def score_observation(task: Task, i: int, samples) -> dict:
    """Per-observation metrics of one method's samples (see the module docstring)."""
    from pipeline.vision.metrics import psnr, ssim
    from pipeline.vision.operators import align_phase_retrieval

    imgs = task.images(samples.x0).float()
    truth = task.truths[i]
    if task.task == "phase_retrieval":
        imgs = align_phase_retrieval(imgs, truth, task.image_op.pad)
    rec = {"mean_log_r": float(samples.log_r.double().mean()), "psnr": float(np.mean(psnr(imgs, truth))),
           "ssim": float(np.mean(ssim(imgs, truth))),
           "psnr_of_mean": float(psnr(imgs.mean(0, keepdim=True), truth)[0])}
    rec.update(_logz_from_samples(samples))
    return rec, imgs


# ------------------------------------------------------------------------------------------------
# the bench
# ------------------------------------------------------------------------------------------------
def run_bench(cfg: VisionConfig) -> dict:
    """Run every dataset x space x task x method of ``cfg``; write the table, JSON and figures."""
    from pipeline.runtime import choose_device

    device = choose_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, out, device)
    combos = [(d, "pixel", t) for d in cfg.datasets for t in cfg.tasks]
    combos += [(d, "latent", t) for d in cfg.latent_datasets for t in cfg.latent_tasks]
    rows, per_obs, figures, tuning = [], [], [], {}
    t_start = time.perf_counter()
    for dataset, space, task_name in combos:
        log.info("task %s / %s / %s", dataset, space, task_name)
        task = Task(ctx, dataset, space, task_name)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 11)
        dps_scale = cfg.dps_scale
        if cfg.dps_tune and any(m in cfg.methods for m in ("dps", "rtb_dps")):
            dps_scale, rec = tune_dps_scale(cfg, task, gen)
            tuning[task.key] = {"chosen": dps_scale, "metric": cfg.dps_tune_metric, "grid": rec}
            log.info("%s: DPS scale %.3g (by %s)", task.key, dps_scale, cfg.dps_tune_metric)
        rtb_dps_scale = cfg.rtb_dps_scale
        if cfg.dps_tune and "rtb_dps" in cfg.methods:
            rtb_dps_scale, rec = tune_rtb_dps_scale(cfg, task, gen)
            tuning[task.key + " (rtb_dps frozen guidance)"] = {"chosen": rtb_dps_scale, "metric": "elbo",
                                                                "grid": rec}
            log.info("%s: RTB+DPS guidance scale %.3g", task.key, rtb_dps_scale)
        fig_panels = {}
        for method in cfg.methods:
            if not method_applies(method, task_name, space):
                continue
            t0 = time.perf_counter()
            if method in ("rtb_amortized", "rtb_dps"):
                m = RTBMethod(cfg, task, ctx, guidance="none" if method == "rtb_amortized" else "dps",
                              scale=rtb_dps_scale, dps_scale=dps_scale)
                sample_fn, budget = m.sample, m.budget(cfg)
                train_s = m.train_seconds
                extra = {"rtb_summary": m.summary}
            else:
                sampler, budget = build_sampler(method, cfg, task, dps_scale)
                sample_fn = lambda y, n, g, s=sampler, p=task.problem: s.sample(p, y, n, generator=g)  # noqa: E731
                train_s, extra = 0.0, {}
            obs_recs = []
            for i in range(task.n_obs):
                g = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + 31 * i + 5)
                ts = time.perf_counter()
                s = sample_fn(task.ys[i], cfg.n_samples, g)
                secs = (time.perf_counter() - ts) / cfg.n_samples
                rec, imgs = score_observation(task, i, s)
                rec.update(dataset=task.ds_name, space=space, task=task_name, method=method, obs=i,
                           truth_index=task.truth_index[i], n=cfg.n_samples, nfe=int(s.nfe),
                           seconds_per_sample=secs)
                obs_recs.append(rec)
                per_obs.append(rec)
                if i == 0:
                    fig_panels[method] = imgs[: cfg.figure_samples].cpu()
            rows.append(_aggregate(obs_recs, budget=budget, train_seconds=train_s,
                                   total_seconds=time.perf_counter() - t0, **extra))
        figures.append(_figure(out, task, fig_panels))
        # written after every task, so a long run that is interrupted still leaves a (partial) table
        summary = _write_outputs(cfg, out, ctx, rows, per_obs, tuning, figures, t_start,
                                 complete=(dataset, space, task_name) == combos[-1])
    log.info("vision bench done in %.0f s: %s", summary["seconds_total"], out / "table.md")
    return summary


def _write_outputs(cfg, out, ctx, rows, per_obs, tuning, figures, t_start, complete: bool) -> dict:
    summary = {"config": dataclasses.asdict(cfg), "config_hash": config_hash(cfg), "complete": complete,
               "rows": rows, "costs": ctx.costs, "dps_tuning": tuning, "figures": [str(f) for f in figures if f],
               "seconds_total": round(time.perf_counter() - t_start, 1),
               "datasets": {k: v[0].describe() for k, v in ctx._ds.items()}}
    summary["claim"] = claim_check(per_obs)
    _write_text_atomic(out / "table.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write_text_atomic(out / "per_observation.jsonl", "".join(json.dumps(r) + "\n" for r in per_obs))
    _write_text_atomic(out / "table.md", render_markdown(summary))
    return summary


def _aggregate(recs: list[dict], **extra) -> dict:
    """Means over observations; the ELBO's SE combines the per-observation SEs (independent)."""
    r0 = recs[0]
    row = {k: r0[k] for k in ("dataset", "space", "task", "method", "n", "nfe")}
    row["n_obs"] = len(recs)

    def mean(key):
        vals = [r[key] for r in recs if r.get(key) is not None]
        return float(np.mean(vals)) if len(vals) == len(recs) else None

    for key in ("mean_log_r", "elbo", "iw", "psnr", "ssim", "psnr_of_mean", "seconds_per_sample", "ess"):
        row[key] = mean(key)
    ses = [r["elbo_se"] for r in recs if r.get("elbo_se") is not None]
    row["elbo_se"] = float(math.sqrt(sum(s * s for s in ses)) / len(recs)) if len(ses) == len(recs) else None
    row.update(extra)
    return row


def claim_check(per_obs: list[dict]) -> dict:
    """Per task and observation: is RTB's (and RTB+DPS's) ELBO >= DPS's? Counted with the SEs."""
    by = {}
    for r in per_obs:
        by.setdefault((r["dataset"], r["space"], r["task"], r["obs"]), {})[r["method"]] = r
    res = {}
    for (d, sp, t, i), ms in sorted(by.items()):
        if "dps" not in ms or ms["dps"].get("elbo") is None:
            continue
        for m in ("rtb_amortized", "rtb_dps"):
            if m not in ms or ms[m].get("elbo") is None:
                continue
            key = f"{d}/{sp}/{t}/{m}"
            e = res.setdefault(key, {"n_obs": 0, "geq": 0, "significantly_lower": 0, "diff": []})
            diff = ms[m]["elbo"] - ms["dps"]["elbo"]
            se = math.hypot(ms[m].get("elbo_se") or 0.0, ms["dps"].get("elbo_se") or 0.0)
            e["n_obs"] += 1
            e["geq"] += int(diff >= 0)
            e["significantly_lower"] += int(diff < -2 * se)
            e["diff"].append(round(diff, 3))
    lines = []
    for key, e in res.items():
        lines.append(f"{key}: ELBO >= DPS on {e['geq']}/{e['n_obs']} observations "
                     f"({e['significantly_lower']} lower by > 2 SE); mean diff {np.mean(e['diff']):+.1f} nats")
    return {"per_task": res, "summary": lines}


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def render_markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = ["# Vision benchmark (bench vision)", ""]
    if not summary.get("complete", True):
        lines += ["**PARTIAL: the run has not finished all tasks yet.**", ""]
    for name, d in summary["datasets"].items():
        tag = "**STAND-IN (not CIFAR-10)**: " if d["standin"] else ""
        lines.append(f"- {name}: {tag}{d['name']}, {d['image_shape']}, splits {d['n']}")
    lines += [
        f"- sigma_y = {cfg['sigma_y']}; K = {cfg['K']} chain steps for every method; {cfg['n_obs']} test "
        f"observations per task, {cfg['n_samples']} samples per observation and method; seed {cfg['seed']}.",
        "- log Z in nats, per observation then averaged over observations: ELBO +- SE (mean of "
        "log r + log p(tau) - log q(tau)) and IW (log-mean-exp). FPS-SMC: not available (SMC normaliser of "
        "the bridged model). prior_is: IW over all its prior-chain proposals; its ELBO column is the prior "
        "chain's own (mean log r of the proposals). FPS: its log q is "
        "the density given the sample's own random bridge y_{1:K} (the marginal is intractable); the bridge "
        "is an auxiliary variable whose law does not depend on the trajectory, so its ELBO/IW are valid "
        "but loose lower bounds on log p(y) under the chain, not estimates of it.",
        "- RTB rows: amortized posteriors (one per dataset x task), trained on observations simulated from "
        "TRAIN images and evaluated on the held-out observations; the budget column gives their training.",
        "- PSNR/SSIM against the truth, images in [-1, 1] (SSIM on [0, 1]); phase retrieval samples are first "
        "aligned to the truth over shifts and the 180-degree rotation (|FFT| cannot see them).",
        "- Priors: the denoised estimate is clipped to the data range (clip_denoised) for every method.",
        "- NFE: network evaluations per sample (prior eps calls + DPS VJPs; RTB: K prior + K-1 head calls).",
        "",
        "| dataset | space | task | method | mean log r | log Z ELBO +- SE | log Z IW | PSNR | SSIM | "
        "s/sample | NFE | budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        elbo = "n/a" if r["elbo"] is None else f"{r['elbo']:.1f} +- {r['elbo_se']:.1f}"
        lines.append(f"| {r['dataset']} | {r['space']} | {r['task']} | {r['method']} | {_fmt(r['mean_log_r'])} | "
                     f"{elbo} | {_fmt(r['iw'])} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.3f')} | "
                     f"{_fmt(r['seconds_per_sample'], '.3f')} | {r['nfe']} | {r['budget']} |")
    lines += ["", "## Claim: RTB's log Z (ELBO) >= DPS's, per task", ""]
    lines += [f"- {s}" for s in summary["claim"]["summary"]] or ["- (no RTB/DPS pair was run)"]
    lines += ["", "## Training costs", ""]
    for k, v in summary["costs"].items():
        lines.append(f"- {k}: {json.dumps(v)}")
    if summary["dps_tuning"]:
        lines += ["", "## DPS scale tuning (on a separate observation)", ""]
        for k, v in summary["dps_tuning"].items():
            grid = ", ".join(f"{g['scale']:g}: ELBO {_fmt(g['elbo'])}, log r {g['mean_log_r']:.1f}" for g in v["grid"])
            lines.append(f"- {k}: chose {v['chosen']:g} by {v['metric']} ({grid})")
    lines += ["", f"Total wall time: {summary['seconds_total']:.0f} s. Figures: "
              + ", ".join(Path(f).name for f in summary["figures"]), ""]
    return "\n".join(lines)


def _show_y(task: Task) -> np.ndarray:
    """A displayable (H', W', C) picture of the first observation."""
    y = task.ys[0].detach().cpu().float()
    if task.task == "phase_retrieval":
        a = torch.log1p(torch.fft.fftshift(y, dim=(-2, -1)))
        a = a / a.max()
        return a.permute(1, 2, 0).numpy()
    y = y.clone()
    y[~task.image_op.mask.cpu()] = 0.0  # hidden pixels grey
    return ((y.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _figure(out: Path, task: Task, panels: dict) -> Path | None:
    """Grid: one row per method (truth, observation, samples, sample mean) for observation 0."""
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pic(x):
        return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()

    n_s = max(len(v) for v in panels.values())
    rows, cols = len(panels), n_s + 3
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows + 0.4), squeeze=False)
    truth = task.truths[0].detach().cpu()
    ypic = _show_y(task)
    cmap = "gray" if truth.shape[0] == 1 else None
    for r, (method, imgs) in enumerate(panels.items()):
        ims = [pic(truth), ypic] + [pic(im) for im in imgs] + [pic(imgs.mean(0))]
        titles = ["truth", "y"] + [f"sample {j + 1}" for j in range(len(imgs))] + ["mean"]
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(ims):
                im = ims[c]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap=cmap, vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(titles[c] if c < len(ims) - 1 else "mean", fontsize=7)
        axes[r, 0].text(-0.1, 0.5, method, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{task.key}" + (" (phase retrieval: aligned)" if task.task == "phase_retrieval" else ""),
                 fontsize=8)
    path = out / "figures" / f"{task.ds_name}_{task.space}_{task.task}.png"
    from pipeline.plots.common import save_figure

    return save_figure(fig, path, dpi=110, bbox_inches="tight")
