"""The lens prior p(theta) of a :class:`~pipeline.lensing.config.LensConfig` as a normalised density.

The simulator draws lenses from it (:func:`draw_lens`) and a sampler that infers the lens scores it
(:meth:`LensPrior.log_prob`), so both use one law:

* centre x0, y0 [arcsec] uniform on [-center, center] each;
* axis ratio q uniform on ``q``, position angle phi [rad] uniform on ``phi``, Einstein radius
  rein [arcsec] uniform on ``rein``, EPL slope t uniform on ``t`` (EPL only);
* external shear (g1, g2) isotropic normal with standard deviation ``shear_sigma`` per component,
  truncated to the disc |g| <= ``shear_max`` by rejection. Its density on the disc is
  N(g1; 0, s^2) N(g2; 0, s^2) / (1 - exp(-gmax^2 / (2 s^2))), the denominator being the disc's mass
  under the untruncated normal.

A parameter whose range is a single point (``center: 0``, ``q: [0.8, 0.8]``, ``shear_sigma: 0``) is
fixed, not inferred: :attr:`LensPrior.names` lists the free ones, in the order of theta's columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.io.lens_samples import UNITS  # noqa: F401  (each parameter's unit, re-exported here)
from pipeline.lensing.config import LensConfig
from pipeline.lensing.operator import LensParams
_MAX_REJECTIONS = 10_000


def draw_lens(cfg: LensConfig, rng: np.random.Generator, shear: str = "reject") -> LensParams:
    """One lens from the prior of ``cfg`` (see the module docstring); the shear is redrawn until
    |g| <= shear_max. The draws come in a fixed order (shear, x0, y0, q, phi, rein, t), so a seed gives
    the same lens wherever it is drawn.

    ``shear="rescale"`` is the rule of lens pools drawn by earlier versions (a draw outside the disc
    scaled onto its edge: no density); it is kept only so that their training checkpoints resume with
    the same lenses (:func:`pipeline.lensing.finetune.pool_shear_rule`)."""
    if shear not in ("reject", "rescale"):
        raise ValueError(f"shear must be 'reject' or 'rescale', got {shear!r}")
    g = np.zeros(2)
    if shear == "rescale" and cfg.shear_sigma > 0:
        g = rng.normal(0.0, cfg.shear_sigma, size=2)
        mag = float(np.hypot(*g))
        if mag > cfg.shear_max:
            g = g * (cfg.shear_max / mag)
    elif cfg.shear_sigma > 0 and cfg.shear_max > 0:
        for _ in range(_MAX_REJECTIONS):
            g = rng.normal(0.0, cfg.shear_sigma, size=2)
            if np.hypot(*g) <= cfg.shear_max:
                break
        else:
            raise ValueError(f"lens.shear_max={cfg.shear_max} is too small for lens.shear_sigma={cfg.shear_sigma}: "
                             f"no shear inside the disc in {_MAX_REJECTIONS} draws")
    return LensParams(model=cfg.model, x0=float(rng.uniform(-cfg.center, cfg.center)),
                      y0=float(rng.uniform(-cfg.center, cfg.center)), q=float(rng.uniform(*cfg.q)),
                      phi=float(rng.uniform(*cfg.phi)), rein=float(rng.uniform(*cfg.rein)),
                      t=float(rng.uniform(*cfg.t)) if cfg.model == "EPL" else 1.0,
                      g1=float(g[0]), g2=float(g[1]), z_lens=cfg.z_lens, z_source=cfg.z_source)


def shear_disc_log_mass(sigma: float, gmax: float) -> float:
    """log P(|g| <= gmax) for g ~ N(0, sigma^2 I_2): log(1 - exp(-gmax^2 / (2 sigma^2)))."""
    return math.log(-math.expm1(-gmax * gmax / (2.0 * sigma * sigma)))


@dataclass(frozen=True)
class LensPrior:
    """p(theta) of ``config`` over the free lens parameters ``names`` (theta's columns, float64).

    ``log_prob`` is in nats per unit of theta's coordinates (arcsec for x0, y0, rein; rad for phi); the
    fixed parameters take their single value in :meth:`to_lens`."""

    config: LensConfig

    @property
    def box(self) -> dict:
        """Free uniform parameters: name -> (lo, hi)."""
        c = self.config
        ranges = {"x0": (-c.center, c.center), "y0": (-c.center, c.center), "rein": tuple(c.rein),
                  "q": tuple(c.q), "phi": tuple(c.phi)}
        if c.model == "EPL":
            ranges["t"] = tuple(c.t)
        return {k: (float(lo), float(hi)) for k, (lo, hi) in ranges.items() if hi > lo}

    @property
    def has_shear(self) -> bool:
        return self.config.shear_sigma > 0 and self.config.shear_max > 0

    @property
    def names(self) -> list[str]:
        return list(self.box) + (["g1", "g2"] if self.has_shear else [])

    @property
    def dim(self) -> int:
        return len(self.names)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """log p(theta), (B,) for theta (B, dim); -inf outside the support."""
        theta = torch.as_tensor(theta, dtype=torch.float64)
        lp = torch.zeros(theta.shape[0], dtype=torch.float64, device=theta.device)
        inside = torch.ones(theta.shape[0], dtype=torch.bool, device=theta.device)
        for j, (lo, hi) in enumerate(self.box.values()):
            inside &= (theta[:, j] >= lo) & (theta[:, j] <= hi)
            lp = lp - math.log(hi - lo)
        if self.has_shear:
            s, gmax = self.config.shear_sigma, self.config.shear_max
            g2 = theta[:, -2] ** 2 + theta[:, -1] ** 2
            inside &= g2 <= gmax * gmax
            lp = lp - g2 / (2 * s * s) - math.log(2 * math.pi * s * s) - shear_disc_log_mass(s, gmax)
        return torch.where(inside, lp, torch.tensor(-math.inf, dtype=torch.float64, device=theta.device))

    def sample(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """n draws (n, dim) through :func:`draw_lens`."""
        return torch.stack([self.to_vector(draw_lens(self.config, rng)) for _ in range(n)])

    def to_vector(self, lens: LensParams) -> torch.Tensor:
        """theta (dim,) of a lens (its free parameters, in ``names`` order)."""
        return torch.tensor([float(getattr(lens, k)) for k in self.names], dtype=torch.float64)

    def to_lens(self, theta) -> LensParams:
        """The lens of one theta row; fixed parameters take their single value."""
        c = self.config
        values = {"x0": 0.0, "y0": 0.0, "rein": c.rein[0], "q": c.q[0], "phi": c.phi[0],
                  "t": c.t[0] if c.model == "EPL" else 1.0, "g1": 0.0, "g2": 0.0}
        values.update({k: float(v) for k, v in zip(self.names, torch.as_tensor(theta).reshape(-1).tolist())})
        return LensParams(model=c.model, z_lens=c.z_lens, z_source=c.z_source, **values)
