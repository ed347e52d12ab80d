"""The scale of the frozen-prior guidance inside an RTB posterior (``guidance: dps | dps_cla``).

RTB with guidance starts from the guided chain (the correction is zero at initialisation) and learns
the residual. The start matters in practice: within a training budget RTB keeps roughly the spread of
its start (measured on the lensing Gaussian check, see :mod:`pipeline.lensing.gaussian_check`), so the
start should be the guided chain closest to the posterior. That is what the ELBO of the untrained
posterior, ``mean(log r + log p - log q)`` = log Z - KL(q || posterior) on trajectories, ranks; it is
evaluated on observations drawn from a SEPARATE seed, never on the observation being analysed.

A sampler's own tuned scale does not carry over: the DPS shift inside the parameterisation is
Jacobian-free and grows as 1/sqrt(abar_k) at high noise, and samplers are tuned for other objectives
(e.g. chi2 in data space).
"""

from __future__ import annotations

import math

import torch

# Grids searched by default (log-spaced for DPS, whose useful range spans decades).
GUIDANCE_GRIDS = {"dps": [10.0 ** e for e in (-3, -2.5, -2, -1.5, -1, -0.5, 0)],
                  "dps_cla": [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]}


def tune_guidance_scale(prior, chain, problem, guidance: str, tuning_seed: int, *, n: int = 256,
                        n_obs: int = 1, grid=None) -> dict:
    """Grid value of the guidance scale with the best mean ELBO of the untrained posterior.

    ``n_obs`` observations are drawn from the prior chain with ``tuning_seed`` (keep it apart from
    evaluation seeds); ``n`` trajectories per observation and grid value. Returns the tuning record
    (``scale``, ``grid``, ``values`` (mean ELBO per grid value, None where non-finite), ``n``, ``n_obs``,
    ``K``, ``tuning_seed``, ``objective``).
    """
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import make_posterior
    from pipeline.rtb.sampler import RTBSampler
    from pipeline.samplers.tuning import tuning_observations

    if guidance not in GUIDANCE_GRIDS:
        raise ValueError(f"guidance must be one of {sorted(GUIDANCE_GRIDS)}, got {guidance!r}")
    grid = list(grid if grid is not None else GUIDANCE_GRIDS[guidance])
    if not grid:
        raise ValueError("guidance scale grid is empty")
    ys, _ = tuning_observations(prior, chain, problem, tuning_seed, n_obs)

    def elbos(scale):
        # the smallest head: its output is zero at initialisation, so only the guided chain is evaluated
        cfg = RTBConfig(K=chain.K, variance=chain.variance, guidance=guidance, guidance_scale=float(scale),
                        learn_variance=False, head_hidden=8, head_layers=1)
        post = make_posterior(prior, cfg)
        return [trajectory_elbo(RTBSampler(post, f"rtb_{guidance}").sample(
            problem, y, n, generator=torch.Generator().manual_seed(tuning_seed))) for y in ys]

    return {"method": f"rtb_{guidance}", **best_by_elbo(grid, elbos), "n": n, "n_obs": n_obs, "K": chain.K,
            "tuning_seed": tuning_seed}


def trajectory_elbo(samples) -> float:
    """``mean(log r + log p - log q)`` over one observation's trajectories (-inf if any is non-finite)."""
    lw = (samples.log_r + samples.log_p_traj - samples.log_q_traj).double()
    return float(lw.mean()) if torch.isfinite(lw).all() else -math.inf


def best_by_elbo(grid, elbos) -> dict:
    """The grid value whose per-observation ELBOs (``elbos(scale) -> list``) have the best mean."""
    values = []
    for scale in grid:
        per_obs = elbos(scale)
        values.append(sum(per_obs) / len(per_obs))
    best = max(range(len(values)), key=lambda j: values[j])
    return {"objective": "elbo of the untrained (zero-correction) posterior", "grid": list(grid),
            "values": [v if math.isfinite(v) else None for v in values], "scale": grid[best]}
