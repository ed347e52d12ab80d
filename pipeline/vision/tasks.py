"""Trained artefacts and inverse problems of the vision benchmark (:mod:`pipeline.vision.bench`).

:class:`Context` trains (or resumes) and caches, per dataset, the pixel-space diffusion prior, the
autoencoder and the prior on its latents; the denoised estimate is clipped to the data range (pixels
[-1, 1], latents +-``latent_clip``) for every method alike. :class:`Task` is one dataset x space x task:
the fixed operator, ``n_obs`` held-out TEST truths and their observations (noise seeded per
observation), plus one extra observation used only for tuning. Images in [-1, 1].
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.config import config_hash
from pipeline.diffusion.network_prior import load_prior
from pipeline.diffusion.schedule import build_chain
from pipeline.diffusion.train import train_prior
from pipeline.runtime import choose_device
from pipeline.vision.autoencoder import encode_images, load_autoencoder, save_autoencoder, train_autoencoder
from pipeline.vision.clipped_prior import ClippedPrior
from pipeline.vision.config import VisionConfig
from pipeline.vision.datasets import VisionDataset, load_dataset, summary, write_training_fits
from pipeline.vision.latent import LatentProblem
from pipeline.vision.operators import make_operator

log = logging.getLogger(__name__)

SPACES = ("pixel", "latent")


def recorded_train_seconds(run_dir: Path) -> float | None:
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


class Context:
    """Trained artefacts per dataset (loaded lazily, cached): dataset, pixel prior, autoencoder, latent prior.
    ``device``: auto, cpu or cuda (:func:`pipeline.runtime.choose_device`)."""

    def __init__(self, cfg: VisionConfig, out: Path, device: str = "auto"):
        self.cfg, self.out, self.device_choice = cfg, out, device
        self.device = choose_device(device)
        self._ds, self._prior, self._ae, self._lprior = {}, {}, {}, {}
        self.costs: dict[str, dict] = {}

    def dataset(self, name):
        if name not in self._ds:
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
            ds, path = self.dataset(name)
            pcfg = self.cfg.pixel_prior(name)
            run_dir = self.out / "priors" / f"{ds.name}-{pcfg.result_hash()}"
            res = train_prior(pcfg, path, run_dir, device=self.device_choice)
            if not res.completed:
                raise RuntimeError(f"prior training for {name} did not complete ({res.step}/{res.target_steps})")
            self._prior[name] = ClippedPrior(load_prior(run_dir, device=self.device), -1.0, 1.0)
            self.costs[f"prior:{name}"] = {"steps": res.step, "seconds_this_run": round(res.wall_seconds, 1),
                                           "train_seconds_recorded": recorded_train_seconds(run_dir),
                                           "n_params": res.n_params, "unet": pcfg.unet, "run_dir": str(run_dir)}
        return self._prior[name]

    def autoencoder(self, name):
        if name not in self._ae:
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
            ds, _ = self.dataset(name)
            ae = self.autoencoder(name)
            ae_id = Path(self.costs[f"autoencoder:{name}"]["path"]).stem
            path = self.out / "data" / f"{ae_id}-latents.fits"
            if not path.exists():
                lds = VisionDataset(f"{ds.name}-latent", encode_images(ae, ds.train), encode_images(ae, ds.valid),
                                    encode_images(ae, ds.test), source=f"latents of {ds.name} by {ae_id}",
                                    standin=ds.standin)
                write_training_fits(path, lds)
            pcfg = self.cfg.latent_prior
            run_dir = self.out / "priors" / f"{ae_id}-latent-{pcfg.result_hash()}"
            res = train_prior(pcfg, path, run_dir, device=self.device_choice)
            if not res.completed:
                raise RuntimeError(f"latent prior training for {name} did not complete")
            lp = load_prior(run_dir, device=self.device)
            c = self.cfg.latent_clip
            self._lprior[name] = ClippedPrior(lp, -c, c) if c > 0 else lp
            self.costs[f"latent_prior:{name}"] = {"steps": res.step, "seconds_this_run": round(res.wall_seconds, 1),
                                                  "train_seconds_recorded": recorded_train_seconds(run_dir),
                                                  "n_params": res.n_params, "unet": pcfg.unet, "run_dir": str(run_dir)}
        return self._lprior[name]

    def dataset_descriptions(self) -> dict:
        """name -> description of every dataset loaded so far (for the summary JSON)."""
        return {k: v[0].describe() for k, v in self._ds.items()}


class Task:
    """One dataset x space x task: the fixed problem, truths and observations."""

    def __init__(self, ctx: Context, dataset: str, space: str, task: str):
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
        self.chain = build_chain(cfg.chain, self.prior.schedule, prefix="vision.chain.")
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

    def obs_sampler(self, G: int, generator) -> tuple[torch.Tensor, None]:
        """G observations simulated from random TRAIN images (for amortized RTB training), and no lens
        index (every observation shares the task's problem)."""
        idx = torch.randint(0, len(self.train_images), (G,), generator=generator)
        x = self.train_images[idx].to(self.truths.device)
        return self.image_op.simulate(x, generator=generator), None
