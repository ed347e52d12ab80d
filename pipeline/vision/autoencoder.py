"""A small convolutional autoencoder for the latent-space variant of the vision benchmarks.

``encode(x)``: images (B, C, H, W) in [-1, 1] -> latents (B, latent_channels, H/f, W/f) with
f = 2**n_down, divided by ``latent_scale`` so the latent training set has unit standard deviation
(the diffusion prior's N(0, I) start then matches the data scale; Rombach et al.'s scale factor).
``decode(z)``: latents -> images ``OUT_BOUND * tanh(h / OUT_BOUND)`` with OUT_BOUND = 2: trained
end to end, so images in [-1, 1] need only moderate pre-activations (a plain tanh saturated at the MNIST
background and collapsed training to a constant image), while any latent, however wild, decodes to a
bounded image (the likelihood through the decoder stays finite for samples of an untrained prior). The likelihood of a latent problem goes
through ``decode`` (:class:`pipeline.vision.latent.LatentProblem`).

Training is plain MSE reconstruction plus a small L2 penalty on the raw latents (keeps the latent
compact, so the diffusion prior does not have to cover a long-tailed code distribution). The
checkpoint is one file (``torch.save`` of hyperparameters, weights, latent scale and metadata),
written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.errors import InputFileError
from pipeline.io.atomic import atomic_file
from pipeline.runtime import tqdm_disable

log = logging.getLogger(__name__)


OUT_BOUND = 2.0


def _bound(h: torch.Tensor) -> torch.Tensor:
    return OUT_BOUND * torch.tanh(h / OUT_BOUND)


class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.silu(self.c1(F.silu(x))))


class AutoEncoder(nn.Module):
    """Conv encoder/decoder with ``n_down`` stride-2 stages; see the module docstring."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, base_channels: int = 32, n_down: int = 2,
                 image_size: int = 32):
        super().__init__()
        if image_size % (2 ** n_down):
            raise ValueError(f"image_size {image_size} not divisible by 2**n_down = {2 ** n_down}")
        self._hparams = dict(in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
                             n_down=n_down, image_size=image_size)
        b = base_channels
        enc = [nn.Conv2d(in_channels, b, 3, padding=1)]
        ch = b
        for i in range(n_down):
            cout = b * min(2 ** (i + 1), 4)
            enc += [nn.SiLU(), nn.Conv2d(ch, cout, 4, stride=2, padding=1)]
            ch = cout
        enc += [_Res(ch), nn.SiLU(), nn.Conv2d(ch, latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(latent_channels, ch, 3, padding=1), _Res(ch)]
        for i in reversed(range(n_down)):
            cout = b * min(2 ** i, 4)
            dec += [nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, cout, 3, padding=1)]
            ch = cout
        dec += [nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def hparams(self) -> dict:
        return dict(self._hparams)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h = self._hparams
        return (h["in_channels"], h["image_size"], h["image_size"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self._hparams
        s = h["image_size"] // 2 ** h["n_down"]
        return (h["latent_channels"], s, s)

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents (unit std over the training set)."""
        return self.encoder(x) / self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (in [-1, 1] for codes of real images; bounded by +-OUT_BOUND)."""
        return _bound(self.decoder(z * self.latent_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def train_autoencoder(images, *, latent_channels: int = 4, base_channels: int = 32, n_down: int = 2,
                      steps: int = 1000, batch_size: int = 64, lr: float = 2e-3, latent_l2: float = 1e-4,
                      seed: int = 0, device="cpu", valid=None, log_every: int = 100,
                      time_budget_s: float | None = None) -> tuple[AutoEncoder, dict]:
    """Train an :class:`AutoEncoder` on ``images`` ((N, C, H, W) in [-1, 1], numpy or tensor).

    Adam with a cosine learning-rate decay; stops early at ``time_budget_s`` seconds. Returns the model
    (eval mode, ``latent_scale`` set to the std of the raw training latents) and a history dict with
    per-``log_every`` losses and the final validation MSE (on ``valid`` when given).
    """
    x_all = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x_all.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(x_all.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    ae = AutoEncoder(x_all.shape[1], latent_channels, base_channels, n_down, x_all.shape[-1]).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    hist = {"step": [], "loss": [], "mse": []}
    t0 = time.perf_counter()
    ae.train()
    done = 0
    for step in tqdm(range(steps), desc="autoencoder", disable=tqdm_disable()):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx].to(device)
        z = ae.encode_raw(x)
        rec = _bound(ae.decoder(z))
        mse = F.mse_loss(rec, x)
        loss = mse + latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["loss"].append(float(loss.detach()))
            hist["mse"].append(float(mse.detach()))
            log.debug("autoencoder step %d loss %.5f mse %.5f", step, hist["loss"][-1], hist["mse"][-1])
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            log.info("autoencoder: time budget %.0f s reached after %d steps", time_budget_s, done)
            break
    ae.eval()
    with torch.no_grad():
        zs = torch.cat([ae.encode_raw(x_all[i:i + 256].to(device)) for i in range(0, min(len(x_all), 2048), 256)])
        ae.latent_scale.fill_(float(zs.std()))
    hist["steps_done"] = done
    hist["seconds"] = time.perf_counter() - t0
    hist["latent_scale"] = float(ae.latent_scale)
    if valid is not None:
        hist["valid_mse"] = reconstruction_mse(ae, valid)
    return ae, hist


@torch.no_grad()
def reconstruction_mse(ae: AutoEncoder, images, batch_size: int = 256) -> float:
    """Mean squared reconstruction error over ``images`` (in [-1, 1] units)."""
    x_all = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    dev = ae.latent_scale.device
    total = 0.0
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(dev)
        total += float(((ae(x) - x) ** 2).sum())
    return total / x_all.numel()


@torch.no_grad()
def encode_images(ae: AutoEncoder, images, batch_size: int = 256) -> np.ndarray:
    """Normalised latents of ``images`` as a float32 numpy array (N, *latent_shape)."""
    x_all = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    dev = ae.latent_scale.device
    return torch.cat([ae.encode(x_all[i:i + batch_size].to(dev)).cpu()
                      for i in range(0, len(x_all), batch_size)]).numpy()


def save_autoencoder(ae: AutoEncoder, path, meta: dict | None = None) -> Path:
    """Write the autoencoder to one file atomically (hparams, weights, latent scale, meta)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"kind": "vision-autoencoder", "hparams": ae.hparams(),
            "state_dict": {k: v.detach().cpu() for k, v in ae.state_dict().items()},
            "meta": json.loads(json.dumps(meta or {}, default=str))}
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_autoencoder(path, device="cpu") -> tuple[AutoEncoder, dict]:
    """Rebuild an autoencoder saved by :func:`save_autoencoder`; returns (model in eval mode, meta)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "autoencoder checkpoint not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputFileError(path, f"not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(blob, dict) or blob.get("kind") != "vision-autoencoder":
        raise InputFileError(path, "not a vision autoencoder checkpoint", field="kind")
    ae = AutoEncoder(**blob["hparams"])
    ae.load_state_dict(blob["state_dict"])
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.to(device).eval(), blob.get("meta", {})


def psnr_of_mse(mse: float) -> float:
    """PSNR [dB] of an MSE in [-1, 1] units (range 2)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")
