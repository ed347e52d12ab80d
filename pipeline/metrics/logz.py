"""Per-observation log-evidence estimators from trajectory log-probabilities.

For a sampler with trajectory law q(tau) and the prior chain p_theta(tau), the importance weight of a
trajectory is ``log w = log r(x0) + log p_theta(tau) - log q(tau)`` with ``log r = log p(y | x0)`` fully
normalised. Then

* ELBO: ``mean(log w)`` (a lower bound on log Z in expectation), reported with its standard error;
* importance-weighted (IW): ``logmeanexp(log w)`` (consistent; a lower bound in expectation at finite n);
* Kish effective sample size ``(sum w)^2 / sum w^2``.

Z depends on the observation y, so every estimator here takes the samples of ONE observation, or
an explicit group index (one group per observation); nothing is ever pooled across groups.
All sums are float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class LogZEstimate:
    """log Z estimates for one observation, in nats."""

    elbo: float
    elbo_se: float
    iw: float
    ess: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def log_weights(log_r, log_p_traj, log_q_traj) -> torch.Tensor:
    """``log r + log p_theta(tau) - log q(tau)``, float64, shape (n,)."""
    lr, lp, lq = (torch.as_tensor(v).double().reshape(-1) for v in (log_r, log_p_traj, log_q_traj))
    if not lr.shape == lp.shape == lq.shape:
        raise ValueError(f"log_r {tuple(lr.shape)}, log_p {tuple(lp.shape)}, log_q {tuple(lq.shape)} differ")
    return lr + lp - lq


def logmeanexp(v: torch.Tensor) -> float:
    v = torch.as_tensor(v).double().reshape(-1)
    return float(torch.logsumexp(v, 0) - math.log(v.numel()))


def ess(log_w) -> float:
    """Kish effective sample size of (unnormalised) log-weights; non-finite weights count as zero."""
    lw = torch.as_tensor(log_w).double().reshape(-1)
    lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
    if not torch.isfinite(lw).any():
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def logz_elbo(log_w) -> tuple[float, float]:
    """(mean, standard error) of the log-weights."""
    lw = torch.as_tensor(log_w).double().reshape(-1)
    n = lw.numel()
    se = float(lw.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(lw.mean()), se


def logz_iw(log_w) -> float:
    """Importance-weighted estimate ``logmeanexp(log w)``."""
    return logmeanexp(log_w)


def estimate_logz(log_w) -> LogZEstimate:
    """All estimators for the log-weights of ONE observation's trajectories."""
    lw = torch.as_tensor(log_w).double().reshape(-1)
    if lw.numel() == 0:
        raise ValueError("no samples")
    elbo, se = logz_elbo(lw)
    return LogZEstimate(elbo=elbo, elbo_se=se, iw=logz_iw(lw), ess=ess(lw), n=lw.numel())


def estimate_logz_grouped(log_w, groups) -> dict[int, LogZEstimate]:
    """Per-group estimates: ``groups[i]`` is the observation index of trajectory i (never pooled)."""
    lw = torch.as_tensor(log_w).double().reshape(-1)
    g = torch.as_tensor(groups).reshape(-1).long()
    if g.shape != lw.shape:
        raise ValueError(f"groups {tuple(g.shape)} and log_w {tuple(lw.shape)} differ in shape")
    return {int(j): estimate_logz(lw[g == j]) for j in torch.unique(g).tolist()}


def estimate_logz_samples(samples) -> LogZEstimate:
    """Estimates from a :class:`pipeline.samplers.base.Samples` of ONE observation.

    Raises ``ValueError`` for samplers without a trajectory density (particle methods, whose weights are not a trajectory density).
    """
    if samples.log_r is None or not samples.has_trajectory_density:
        raise ValueError("log Z not available: the sampler returned no trajectory log-probabilities")
    return estimate_logz(log_weights(samples.log_r, samples.log_p_traj, samples.log_q_traj))
