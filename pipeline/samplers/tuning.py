"""Tuning a heuristic guidance scale (DPS, DPS+CLA) on a separate seed, then freezing it.

Protocol: draw a *tuning* observation from the prior chain with its own seed (never a seed used for
evaluation), run the sampler at every scale of a log-spaced grid with common random numbers, score each
by the ELBO ``mean(log r + log p_theta(tau) - log q(tau))`` (= log Z - KL(q || posterior) on trajectories,
so maximising it is principled; ``objective="log_r"`` uses mean log r instead, which favours
over-confident scales), refine once around the best grid point, and return the frozen scale with a
record that results files store verbatim (``Samples.info['tuning']``).
"""

from __future__ import annotations

import logging
import math

import torch

from pipeline.diffusion.sampling import sample_prior
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_GRIDS = {
    "dps": [10.0 ** e for e in (-3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1)],
    "dps_cla": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
}


def tuning_observation(prior, chain, problem, seed: int, device=None):
    """(y, x_true): a truth from the prior chain and its noisy observation, both from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    x = sample_prior(prior, chain, 1, generator=g, device=device)
    y = problem.to(x.device).simulate(x, generator=g)[0]
    return y, x[0]


def _objective(samples, objective: str) -> float:
    if objective == "elbo":
        v = samples.log_r + samples.log_p_traj - samples.log_q_traj
    elif objective == "log_r":
        v = samples.log_r
    else:
        raise PipelineError(f"unknown tuning objective {objective!r} (elbo, log_r)")
    v = v.double()
    if not torch.isfinite(v).all():
        return -math.inf
    return float(v.mean())


def tune_scale(method: str, prior, chain, problem, y, *, grid=None, n: int = 256, seed: int = 0,
               objective: str = "elbo", refine: bool = True, sampler_opts: dict | None = None,
               tuning_seed: int | None = None) -> tuple[float, dict]:
    """Grid-search the guidance scale of ``method`` on the tuning observation ``y``.

    ``seed`` seeds the sampler's noise (the same for every scale); ``tuning_seed`` (recorded) is the seed
    that produced ``y``. Returns ``(scale, record)``; record keys: method, objective, grid, values,
    scale, value, n, K, seed, tuning_seed.
    """
    from pipeline.samplers import TUNED_METHODS, make_sampler

    if method not in TUNED_METHODS:
        raise PipelineError(f"method '{method}' has no heuristic scale to tune (tuned: {', '.join(TUNED_METHODS)})")
    grid = sorted(float(s) for s in (grid if grid is not None else DEFAULT_GRIDS[method]))
    if not grid or min(grid) < 0:
        raise PipelineError(f"tuning grid for '{method}' must be non-empty and >= 0, got {grid}")
    opts = dict(sampler_opts or {})

    def score(scale):
        s = make_sampler(method, prior, chain, scale=scale, **opts)
        out = s.sample(problem, y, n, generator=torch.Generator().manual_seed(int(seed)))
        val = _objective(out, objective)
        log.info("tune %s scale=%.4g %s=%.4f", method, scale, objective, val)
        return val

    values = [score(s) for s in grid]
    best = max(range(len(grid)), key=lambda i: values[i])
    scales, vals = list(grid), list(values)
    if refine and len(grid) > 1:
        lo = grid[best - 1] if best > 0 else grid[best]
        hi = grid[best + 1] if best < len(grid) - 1 else grid[best]
        if lo > 0 and hi > 0:
            fine = [math.exp(u) for u in torch.linspace(math.log(lo), math.log(hi), 5)[1:-1].tolist()]
        else:
            fine = torch.linspace(lo, hi, 5)[1:-1].tolist()
        fine = [f for f in fine if all(abs(f - s) > 1e-12 * max(1.0, s) for s in scales)]
        for f in fine:
            scales.append(f)
            vals.append(score(f))
    i = max(range(len(scales)), key=lambda j: vals[j])
    if not math.isfinite(vals[i]):
        raise PipelineError(f"tuning '{method}': every scale gave non-finite {objective}")
    order = sorted(range(len(scales)), key=lambda j: scales[j])
    record = {"method": method, "objective": objective, "grid": [scales[j] for j in order],
              "values": [vals[j] if math.isfinite(vals[j]) else None for j in order],
              "scale": scales[i], "value": vals[i], "n": int(n), "K": int(chain.K), "seed": int(seed),
              "tuning_seed": None if tuning_seed is None else int(tuning_seed)}
    return scales[i], record


def tune_on_separate_seed(method: str, prior, chain, problem, tuning_seed: int, **kwargs) -> tuple[float, dict]:
    """Draw the tuning observation from ``tuning_seed`` (keep it apart from evaluation seeds) and tune."""
    y, _ = tuning_observation(prior, chain, problem, tuning_seed)
    return tune_scale(method, prior, chain, problem, y, tuning_seed=tuning_seed, **kwargs)
