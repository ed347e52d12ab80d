"""A Gaussian-process prior on vectors with the exact VP-noised eps (the prior of the closed-form lensing
check, :mod:`pipeline.lensing.gaussian_check`).

Squared-exponential covariance ``S_ij = amp^2 exp(-|r_i - r_j|^2 / (2 ell^2))`` on a square pixel grid
(``ell`` and the pixel scale in arcsec, ``amp`` in network units), plus a small ``jitter`` on the
diagonal (keeps S positive definite in float64). With ``S = U diag(lam) U^T`` (one eigendecomposition),
``C_t = abar S + (1-abar) I = U diag(abar lam + 1 - abar) U^T`` and
``eps(x_t) = sqrt(1-abar) C_t^{-1} (x_t - sqrt(abar) m)``, computed in float64.
"""

from __future__ import annotations

import math

import torch

from pipeline.diffusion.prior import Prior
from pipeline.diffusion.schedule import NoiseSchedule


def se_covariance(npix: int, pixscale: float, length_scale: float, amplitude: float, jitter: float = 1e-6):
    """Squared-exponential covariance (d, d), d = npix^2, float64, on a row-major npix x npix grid.

    ``pixscale`` and ``length_scale`` in arcsec; ``amplitude`` is the marginal std (network units)."""
    c = (torch.arange(npix, dtype=torch.float64) - (npix - 1) / 2) * pixscale
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1)
    d2 = ((r[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    S = amplitude ** 2 * torch.exp(-0.5 * d2 / length_scale ** 2)
    return S + jitter * torch.eye(S.shape[0], dtype=torch.float64)


class GaussianProcessPrior(Prior):
    """Zero-or-``mean`` Gaussian prior N(m, S) on vectors (d,) with the exact VP-noised eps.

    One eigendecomposition S = U diag(lam) U^T at construction; every eps call is two (B, d) x (d, d)
    products in float64 (returned in x's dtype and device). Differentiable in x (DPS backpropagates)."""

    def __init__(self, cov, mean=None, schedule: NoiseSchedule | None = None, device="cpu"):
        S = torch.as_tensor(cov, dtype=torch.float64)
        if S.ndim != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"covariance must be (d, d), got {tuple(S.shape)}")
        lam, U = torch.linalg.eigh(0.5 * (S + S.T))
        if float(lam.min()) <= 0:
            raise ValueError(f"covariance is not positive definite (min eigenvalue {float(lam.min()):.3g})")
        d = S.shape[0]
        self.cov = S
        self.mean = torch.zeros(d, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        self.lam, self.U = lam, U
        self.schedule = schedule or NoiseSchedule()
        self.event_shape = (d,)
        self._device = torch.device(device)
        self._dev_cache = {}

    @property
    def device(self) -> torch.device:
        return self._device

    def _on(self, device):
        key = str(device)
        if key not in self._dev_cache:
            self._dev_cache[key] = (self.U.to(device), self.lam.to(device), self.mean.to(device))
        return self._dev_cache[key]

    def _abar(self, t, n, device):
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if t.ndim == 0:
            t = t.expand(n)
        return self.schedule.alpha_bar[t].to(torch.float64).to(device)

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """sqrt(1-abar) C_t^{-1} (x - sqrt(abar) m) at integer training timesteps t (scalar or (B,))."""
        U, lam, m = self._on(x.device)
        ab = self._abar(t, x.shape[0], x.device)[:, None]
        z = (x.double().reshape(x.shape[0], -1) - ab.sqrt() * m) @ U
        out = ((1 - ab).sqrt() * z / (ab * lam + 1 - ab)) @ U.T
        return out.to(x.dtype).reshape(x.shape)

    def log_prob_noised(self, x: torch.Tensor, t) -> torch.Tensor:
        """log N(x; sqrt(abar) m, C_t) per sample (B,), float64."""
        U, lam, m = self._on(x.device)
        ab = self._abar(t, x.shape[0], x.device)[:, None]
        z = (x.double().reshape(x.shape[0], -1) - ab.sqrt() * m) @ U
        c = ab * lam + 1 - ab
        return -0.5 * ((z * z) / c).sum(1) - 0.5 * torch.log(c).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """Exact draws of the analytic (not chain) prior, (n, d) float64."""
        z = torch.randn(n, self.lam.shape[0], generator=generator, dtype=torch.float64)
        return self.mean + (z * self.lam.clamp_min(0).sqrt()) @ self.U.T
