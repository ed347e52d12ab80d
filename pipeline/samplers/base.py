"""The ``Sampler`` interface every posterior method implements, and its result type.

``sample(problem, y, n) -> Samples``. Gaussian-step samplers (RTB, DPS, CLA, exact guidance, FPS with
one particle, the prior) fill the trajectory log-probs, so one estimator gives every method's log Z
(:mod:`pipeline.metrics.logz`). Particle methods (FPS-SMC) fill ``log_w`` instead and report log Z
as not available; what each method returns is declared in :mod:`pipeline.samplers.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Samples:
    """One observation's posterior samples and what each method knows about their law.

    Conventions shared by every Gaussian-step sampler (RTB and the guided ones alike):

    * ``log_q_traj`` / ``log_p_traj`` are the log-densities (nats, float64) of the whole trajectory
      x_K -> ... -> x_1 under the sampler's own law q and under the prior chain p_theta, BOTH including
      the start term log N(x_K; 0, I) (it cancels in ``log_r + log_p_traj - log_q_traj``, the
      importance log-weight, so ELBO and IW log Z do not depend on it).
    * ``nfe`` is the number of network evaluations per RETURNED sample: every forward call of the
      prior's or the posterior's network counts one, a vector-Jacobian product through the prior
      counts one more; a method that draws several proposals per returned sample (particles) counts
      all of them.
    """

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
