"""Tuning a guidance scale on a separate seed, then freezing it: one search for every method.

Protocol (:func:`tune_scale`): draw *tuning* observations from the prior predictive with their own seed
(never a seed used for evaluation), run the sampler at every scale of a grid with common random numbers,
score each scale, optionally refine once around the best grid point, and return the frozen scale with a
record that results files store verbatim. The training-free heuristics (DPS, DPS+CLA:
:func:`tune_on_separate_seed`) and the frozen-prior guidance inside an untrained RTB posterior
(:mod:`pipeline.rtb.tuning`, lensing and vision wrappers) all go through it.

Objectives (``objective=``):

* ``"elbo"`` (default): ``mean(log r + log p_theta(tau) - log q(tau))`` = log Z - KL(q || posterior) on
  *trajectories*, the quantity RTB itself optimises and the one behind the log Z columns. It leans to weak
  guidance (strong late DPS kicks cost path KL even when the x0 marginal is good).
* ``"log_r"``: mean log-likelihood of the samples (the DPS papers' practice); rewards over-confidence and,
  for DPS+CLA, keeps rising to the largest grid scale.
* ``"chi2"``: data-space calibration. For exact posterior samples and y from the prior predictive
  ``E[chi2(y, A x_s)] = m`` (unmasked pixels), score ``-|log(mean chi2 / m)|``. Its curve is non-monotone
  for DPS (overshooting scales raise chi2 again), so it can pick an overshooting scale.

No objective wins everywhere (compare them with ``python -m pipeline.bench.sampler_report``); ELBO is the
default because it is principled. The record says which one froze the scale.
"""

from __future__ import annotations

import logging
import math

import torch

from pipeline.diffusion.sampling import sample_prior
from pipeline.errors import PipelineError
from pipeline.samplers.registry import TUNED_METHODS, make_sampler

log = logging.getLogger(__name__)

DEFAULT_GRIDS = {
    "dps": [round(10.0 ** (-3 + 0.25 * i), 6) for i in range(17)],       # 1e-3 .. 10, quarter decades
    "dps_cla": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
}


OBJECTIVES = ("chi2", "elbo", "log_r")


def prior_predictive(prior, chain, problem, n: int, generator, device=None):
    """(y (n, *y_shape), x (n, *x_shape)): ``n`` truths from the prior chain, then their noisy observations
    under ``problem``, both from ``generator`` in that order (network units)."""
    x = sample_prior(prior, chain, int(n), generator=generator, device=device)
    return problem.to(x.device).simulate(x, generator=generator), x


def tuning_observations(prior, chain, problem, seed: int, n_obs: int = 1, device=None):
    """:func:`prior_predictive` with its own generator seeded by ``seed``: (y, x_true)."""
    return prior_predictive(prior, chain, problem, n_obs, torch.Generator().manual_seed(int(seed)), device)


def tuning_observation(prior, chain, problem, seed: int, device=None):
    """(y, x_true): one truth from the prior chain and its noisy observation, both from ``seed``."""
    y, x = tuning_observations(prior, chain, problem, seed, 1, device)
    return y[0], x[0]


def objective_values(samples, objective: str, problem, y) -> torch.Tensor:
    """Per-sample values the objective averages (float64, (n,)): the trajectory ELBO terms
    ``log r + log p - log q``, ``log r``, or ``chi2 / m``."""
    if objective == "elbo":
        v = samples.log_r + samples.log_p_traj - samples.log_q_traj
    elif objective == "log_r":
        v = samples.log_r
    elif objective == "chi2":
        v = problem.residual_chi2(samples.x0, y.to(samples.x0.device)) / problem.n_data
    else:
        raise PipelineError(f"unknown tuning objective {objective!r} ({', '.join(OBJECTIVES)})")
    return v.double().reshape(-1).cpu()


def objective_score(values: torch.Tensor, objective: str) -> float:
    """The score of a scale from its per-sample values (higher is better; -inf if any is non-finite):
    their mean, or for ``chi2`` ``-|log(mean chi2 / m)|`` (0 where exact posteriors are on average)."""
    if not torch.isfinite(values).all():
        return -math.inf
    mean = float(values.mean())
    if objective == "chi2":
        return -abs(math.log(mean)) if mean > 0 else -math.inf
    return mean


def tune_scale(sampler_at, observations, *, grid, n: int, seed: int = 0, objective: str = "elbo",
               refine: bool = False, label: str = "scale") -> tuple[float, dict]:
    """The one guidance-scale search: the grid value (optionally refined once) with the best score.

    ``sampler_at(scale) -> Sampler``; ``observations``: list of ``(problem, y)`` pairs, ``y`` one
    observation (``y_shape``) or several under the same operator (``(k, *y_shape)``, sampled in one call);
    ``n`` samples per observation, each call with a generator seeded by ``seed`` (common random numbers
    across scales). The per-sample objective values of all observations
    are pooled before scoring (:func:`objective_score`). ``refine``: after the grid, three log-spaced
    (linear when the bracket touches 0) values between the best point's neighbours. Returns
    ``(scale, record)``; record keys: objective, grid, values (None where non-finite), scale, value,
    n (per observation), n_obs, seed.
    """
    grid = sorted(float(s) for s in grid)
    if not grid or min(grid) < 0:
        raise PipelineError(f"tuning grid for {label} must be non-empty and >= 0, got {grid}")
    if objective not in OBJECTIVES:
        raise PipelineError(f"unknown tuning objective {objective!r} ({', '.join(OBJECTIVES)})")
    if not observations or n < 1:
        raise PipelineError(f"tuning {label} needs at least one observation and n >= 1")
    n_obs = sum(1 if tuple(torch.as_tensor(y).shape) == tuple(p.y_shape) else len(y) for p, y in observations)

    def score(scale):
        sampler = sampler_at(scale)
        vals = []
        for problem, y in observations:
            y = torch.as_tensor(y)
            if tuple(y.shape) != tuple(problem.y_shape):  # several observations under one operator: one call
                y = y.repeat_interleave(n, 0)
            m = n if y.ndim == len(problem.y_shape) else y.shape[0]
            out = sampler.sample(problem, y, m, generator=torch.Generator().manual_seed(int(seed)))
            vals.append(objective_values(out, objective, problem, y))
        val = objective_score(torch.cat(vals), objective)
        log.info("tune %s=%.4g: %s %.4f", label, scale, objective, val)
        return val

    scales, vals = list(grid), [score(s) for s in grid]
    if refine and len(grid) > 1:
        best = max(range(len(grid)), key=lambda i: vals[i])
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        if lo > 0 and hi > 0:
            fine = [math.exp(u) for u in torch.linspace(math.log(lo), math.log(hi), 5)[1:-1].tolist()]
        else:
            fine = torch.linspace(lo, hi, 5)[1:-1].tolist()
        for f in fine:
            if all(abs(f - s) > 1e-12 * max(1.0, s) for s in scales):
                scales.append(f)
                vals.append(score(f))
    i = max(range(len(scales)), key=lambda j: vals[j])
    if not math.isfinite(vals[i]):
        raise PipelineError(f"tuning {label}: every scale gave a non-finite {objective}")
    order = sorted(range(len(scales)), key=lambda j: scales[j])
    return scales[i], {"objective": objective, "grid": [scales[j] for j in order],
                       "values": [vals[j] if math.isfinite(vals[j]) else None for j in order],
                       "scale": scales[i], "value": vals[i], "n": int(n), "n_obs": n_obs,
                       "seed": int(seed)}


def tune_on_separate_seed(method: str, prior, chain, problem, tuning_seed: int, n_obs: int = 16, *,
                          n: int = 256, grid=None, seed: int = 0, objective: str = "elbo", refine: bool = True,
                          sampler_opts: dict | None = None) -> tuple[float, dict]:
    """Tune a training-free method's heuristic scale (DPS, DPS+CLA) with :func:`tune_scale` on ``n_obs``
    observations drawn from ``tuning_seed`` (keep it apart from evaluation seeds), ``n`` samples in all.

    Several observations by default: the chi2 target holds in expectation over y, and the ELBO / log r
    averages are less tied to one draw. The record adds method, K, tuning_seed.
    """
    if method not in TUNED_METHODS:
        raise PipelineError(f"method '{method}' has no heuristic scale to tune (tuned: {', '.join(TUNED_METHODS)})")
    ys, _ = tuning_observations(prior, chain, problem, tuning_seed, n_obs)
    opts = dict(sampler_opts or {})
    scale, record = tune_scale(lambda s: make_sampler(method, prior, chain, scale=s, **opts),
                               [(problem, ys)], grid=DEFAULT_GRIDS[method] if grid is None else grid,
                               n=max(1, n // n_obs), seed=seed, objective=objective, refine=refine, label=method)
    return scale, {"method": method, **record, "K": int(chain.K), "tuning_seed": int(tuning_seed)}
