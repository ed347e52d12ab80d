"""Rank-based per-pixel interval coverage (DESIGN section 8).

For each observation and pixel, the truth's mid-rank among the n posterior samples gives
``u = (n_below + n_equal/2 + 1/2) / (n + 1)``. For exact posterior samples the rank is uniform on
{0, ..., n}, so u is uniform on the grid {(r + 1/2)/(n + 1)}; the central interval at level c covers
the truth when |u - 1/2| <= c/2, with probability within 1/(n + 1) of c. Ties (e.g. pixels where
every sample and the truth are 0) get u = 1/2 and count as covered.

Footprint: the pixels where the truth exceeds ``frac`` (default 0.1) times its own peak, per
observation; sky pixels, where many samplers are trivially right, are left out there.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FOOTPRINT_FRAC = 0.1


def rank_statistic(samples, truths) -> np.ndarray:
    """u in (0, 1) per observation and pixel: samples (n_obs, n, *pix), truths (n_obs, *pix)."""
    samples = np.asarray(samples)
    truths = np.asarray(truths)
    if samples.shape[0] != truths.shape[0] or samples.shape[2:] != truths.shape[1:]:
        raise ValueError(f"samples {samples.shape} do not match truths {truths.shape}")
    n = samples.shape[1]
    t = truths[:, None]
    below = (samples < t).sum(1)
    equal = (samples == t).sum(1)
    return (below + 0.5 * equal + 0.5) / (n + 1)


def footprint(truths, frac: float = DEFAULT_FOOTPRINT_FRAC) -> np.ndarray:
    """Boolean mask (n_obs, *pix): truth > frac * max(truth) of the same observation (only where
    that peak is positive)."""
    truths = np.asarray(truths)
    peak = truths.reshape(truths.shape[0], -1).max(1)
    peak = peak.reshape((-1,) + (1,) * (truths.ndim - 1))
    return (truths > frac * peak) & (peak > 0)


def interval_coverage(samples, truths, levels=(0.68, 0.95), mask=None) -> dict:
    """Fraction of (observation, pixel) pairs whose central interval at each level holds the truth.

    mask: optional boolean (n_obs, *pix) selection (e.g. :func:`footprint`). Returns
    {level: fraction} (NaN when the selection is empty)."""
    u = rank_statistic(samples, truths)
    sel = np.ones(u.shape, bool) if mask is None else np.asarray(mask, bool)
    out = {}
    for c in levels:
        hit = np.abs(u - 0.5) <= c / 2 + 1e-12
        out[float(c)] = float(hit[sel].mean()) if sel.any() else float("nan")
    return out


def coverage_curve(samples, truths, levels, mask=None) -> np.ndarray:
    """Per-pixel empirical coverage at each nominal level (for the coverage figure)."""
    cov = interval_coverage(samples, truths, levels=tuple(levels), mask=mask)
    return np.array([cov[float(c)] for c in levels])
