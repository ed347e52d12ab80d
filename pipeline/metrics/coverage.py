"""Rank-based per-pixel interval coverage, compared with what an exact sampler reaches.

For each observation and pixel, the truth's mid-rank among the n posterior samples gives
``u = (n_below + n_equal/2 + 1/2) / (n + 1)``. For exact posterior samples (continuous, no ties) the
rank is uniform on {0, ..., n}, so u is uniform on the grid {(r + 1/2)/(n + 1)}; the central
interval at level c covers the truth when |u - 1/2| <= c/2. With few samples the grid is coarse and
an exact sampler does not reach c itself but :func:`exact_coverage_level` (e.g. 7/9 at c = 0.68 and
n = 8, 23/33 at n = 32), which is the reference every coverage value is compared with. Ties (e.g.
pixels where every sample and the truth are 0) get u = 1/2 and count as covered, so they lift
coverage above the reference.

Footprint: the pixels where the *pooled mean* of the truth and its n samples exceeds ``frac``
(default 0.1) times that mean's peak, per observation. The rule is symmetric in the truth and the
samples, so for exact samples the truth stays exchangeable with them inside the footprint and the
footprint coverage has the same reference; selecting by the truth alone would favour pixels where
the truth is high, i.e. ranked high, and bias coverage low. Sky pixels, where many samplers are
trivially right, are left out there.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FOOTPRINT_FRAC = 0.1
_EPS = 1e-12  # float slack of the |u - 1/2| <= c/2 test (u on a grid, c given in decimals)


def _covered(u, level: float):
    """The mid-rank rule: central interval at ``level`` holds the truth."""
    return np.abs(np.asarray(u) - 0.5) <= level / 2 + _EPS


def exact_coverage_level(n: int, level: float) -> float:
    """Expected coverage of the central interval at ``level`` (a fraction in (0, 1)) for n exact
    posterior samples without ties: the rank r is uniform on {0, ..., n} and the mid-rank rule
    covers the r with |(r + 1/2)/(n + 1) - 1/2| <= level/2."""
    n = int(n)
    if n < 1:
        raise ValueError(f"need at least 1 sample, got {n}")
    u = (np.arange(n + 1) + 0.5) / (n + 1)
    return float(_covered(u, float(level)).mean())


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


def footprint(truths, frac: float = DEFAULT_FOOTPRINT_FRAC, samples=None) -> np.ndarray:
    """Boolean mask (n_obs, *pix): image > frac * max(image) of the same observation (only where
    that peak is positive). The image is the pooled mean of each truth (n_obs, *pix) and its
    samples (n_obs, n, *pix) when ``samples`` is given (the rule for coverage), else the truth."""
    img = np.asarray(truths, dtype=np.float64)
    if samples is not None:
        s = np.asarray(samples, dtype=np.float64)
        if s.shape[0] != img.shape[0] or s.shape[2:] != img.shape[1:]:
            raise ValueError(f"samples {s.shape} do not match truths {img.shape}")
        img = (img + s.sum(1)) / (s.shape[1] + 1)
    peak = img.reshape(img.shape[0], -1).max(1)
    peak = peak.reshape((-1,) + (1,) * (img.ndim - 1))
    return (img > frac * peak) & (peak > 0)


def interval_coverage(samples, truths, levels=(0.68, 0.95), mask=None) -> dict:
    """Fraction of (observation, pixel) pairs whose central interval at each level holds the truth.

    mask: optional boolean (n_obs, *pix) selection (e.g. :func:`footprint`; it must not depend on
    the truth alone). Returns {level: fraction} (NaN when the selection is empty); compare each with
    ``exact_coverage_level(n_samples, level)``."""
    u = rank_statistic(samples, truths)
    sel = np.ones(u.shape, bool) if mask is None else np.asarray(mask, bool)
    out = {}
    for c in levels:
        hit = _covered(u, c)
        out[float(c)] = float(hit[sel].mean()) if sel.any() else float("nan")
    return out


def coverage_by_observation(samples, truths, level: float, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Per observation: (covered pixel count, selected pixel count) of the central interval at ``level``,
    each of shape (n_obs,). Their ratio of sums is :func:`interval_coverage`'s value."""
    u = rank_statistic(samples, truths)
    sel = np.ones(u.shape, bool) if mask is None else np.asarray(mask, bool)
    flat = (u.shape[0], -1)
    hits = (_covered(u, level) & sel).reshape(flat).sum(1)
    return hits.astype(np.float64), sel.reshape(flat).sum(1).astype(np.float64)


def coverage_standard_error(hits, counts) -> float:
    """Standard error of the pooled coverage ``sum(hits) / sum(counts)`` from the spread between
    observations (the ratio estimator's: sqrt(n/(n-1) * sum((h_i - R m_i)^2)) / sum(m_i) over the n
    observations with m_i > 0; for equal counts, the std (ddof 1) of the per-observation coverages over
    sqrt(n)). Pixels of one observation are correlated, so a binomial error over all pixels is too small;
    observations are independent. NaN with fewer than two observations."""
    h, m = np.asarray(hits, np.float64), np.asarray(counts, np.float64)
    keep = m > 0
    h, m = h[keep], m[keep]
    n = h.size
    if n < 2:
        return float("nan")
    r = h.sum() / m.sum()
    return float(np.sqrt(n / (n - 1) * np.sum((h - r * m) ** 2)) / m.sum())


def coverage_z(samples, truths, level: float, mask=None) -> dict:
    """Pooled coverage at ``level``, the exact-sampler level for the same number of samples, the
    standard error from :func:`coverage_standard_error` and z = (coverage - exact) / se (None when se is 0
    or undefined), and each observation's own coverage (``per_obs``; NaN where it selects no pixel). An
    exact sampler gives z of mean 0 and spread 1 (t with n_obs - 1 degrees of freedom)."""
    h, m = coverage_by_observation(samples, truths, level, mask)
    cov = float(h.sum() / m.sum()) if m.sum() > 0 else float("nan")
    ref = exact_coverage_level(np.asarray(samples).shape[1], level)
    se = coverage_standard_error(h, m)
    z = (cov - ref) / se if np.isfinite(se) and se > 0 else None
    per_obs = np.divide(h, m, out=np.full_like(h, np.nan), where=m > 0)
    return {"coverage": cov, "ref": ref, "se": se, "z": None if z is None else float(z), "per_obs": per_obs}


def coverage_curve(samples, truths, levels, mask=None) -> np.ndarray:
    """Per-pixel empirical coverage at each nominal level (for the coverage figure)."""
    cov = interval_coverage(samples, truths, levels=tuple(levels), mask=mask)
    return np.array([cov[float(c)] for c in levels])


def exact_coverage_curve(n: int, levels) -> np.ndarray:
    """:func:`exact_coverage_level` at each nominal level: the exact-sampler line of the figure."""
    return np.array([exact_coverage_level(n, c) for c in levels])
