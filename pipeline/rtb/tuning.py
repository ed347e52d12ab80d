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

from pipeline.rtb.config import PolicyConfig, RTBConfig
from pipeline.rtb.posterior import make_posterior
from pipeline.rtb.sampler import RTBSampler
from pipeline.samplers.tuning import tune_scale, tuning_observations

# Grids searched by default (log-spaced for DPS, whose useful range spans decades).
GUIDANCE_GRIDS = {"dps": [10.0 ** e for e in (-3, -2.5, -2, -1.5, -1, -0.5, 0)],
                  "dps_cla": [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]}
UNTRAINED_ELBO = "elbo of the untrained (zero-correction) posterior"


def guidance_grid(guidance: str, grid=None) -> list[float]:
    """``grid``, or the default grid of ``guidance`` (``dps`` / ``dps_cla``); a one-line error otherwise."""
    if guidance not in GUIDANCE_GRIDS:
        raise ValueError(f"guidance must be one of {sorted(GUIDANCE_GRIDS)}, got {guidance!r}")
    grid = list(grid if grid is not None else GUIDANCE_GRIDS[guidance])
    if not grid:
        raise ValueError("guidance scale grid is empty")
    return grid


def tune_guidance_scale(prior, chain, problem, guidance: str, tuning_seed: int, *, n: int = 256,
                        n_obs: int = 1, grid=None) -> dict:
    """Grid value of the guidance scale with the best mean ELBO of the untrained posterior
    (:func:`pipeline.samplers.tuning.tune_scale`, no refinement).

    ``n_obs`` observations are drawn from the prior chain with ``tuning_seed`` (keep it apart from
    evaluation seeds); ``n`` trajectories per observation and grid value. Returns the tuning record
    (``method``, ``scale``, ``grid``, ``values`` (mean ELBO per grid value, None where non-finite), ``n``,
    ``n_obs``, ``K``, ``tuning_seed``, ``objective``).
    """
    grid = guidance_grid(guidance, grid)
    ys, _ = tuning_observations(prior, chain, problem, tuning_seed, n_obs)

    def sampler_at(scale):
        # the smallest head: its output is zero at initialisation, so only the guided chain is evaluated
        cfg = RTBConfig(policy=PolicyConfig(guidance=guidance, guidance_scale=float(scale), learn_variance=False,
                                            head_hidden=8, head_layers=1))
        return RTBSampler(make_posterior(prior, chain, cfg), f"rtb_{guidance}")

    _, record = tune_scale(sampler_at, [(problem, y) for y in ys], grid=grid, n=n, seed=tuning_seed,
                           objective="elbo", label=f"rtb_{guidance} guidance scale")
    return {"method": f"rtb_{guidance}", **record, "objective": UNTRAINED_ELBO, "K": chain.K,
            "tuning_seed": tuning_seed}
