"""The ``Sampler`` interface every posterior method implements, and its result type.

``sample(problem, y, n) -> Samples``. Gaussian-step samplers (RTB, DPS, CLA, exact guidance, FPS with
one particle, the prior) fill the trajectory log-probs, so one estimator gives every method's log Z
(:mod:`pipeline.metrics.logz`). Particle methods (FPS-SMC) fill ``log_w`` instead and report log Z
as not available (DESIGN section 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Samples:
    x0: torch.Tensor                       # (n, *x_shape) samples (equally weighted unless log_w)
    log_r: torch.Tensor | None = None      # (n,) log p(y | x0), float64
    log_q_traj: torch.Tensor | None = None  # (n,) log q(tau) of the sampler's own trajectory law
    log_p_traj: torch.Tensor | None = None  # (n,) log p_theta(tau) of the prior chain on the same tau
    log_w: torch.Tensor | None = None      # (n,) particle log-weights (particle methods only)
    nfe: int = 0                           # network evaluations per sample
    info: dict = field(default_factory=dict)

    @property
    def has_trajectory_density(self) -> bool:
        return self.log_q_traj is not None and self.log_p_traj is not None


class Sampler:
    """Base class; ``name`` is one of the method names used everywhere (see ``pipeline.samplers``)."""

    name: str = "base"

    def sample(self, problem, y: torch.Tensor, n: int, *, generator=None) -> Samples:
        raise NotImplementedError
