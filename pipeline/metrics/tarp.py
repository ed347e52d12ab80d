"""TARP expected-coverage test (Lemos, Coogan et al. 2023), own implementation.

For observation i with truth theta_i and posterior samples x_ij, draw one reference point r_i
uniformly in the unit hypercube of *normalised* coordinates. The credibility of the ball around r_i
that just reaches theta_i is f_i = fraction of samples closer to r_i than theta_i. For a calibrated
posterior f_i ~ U(0, 1), so the expected coverage ECP(alpha) = P(f < alpha) lies on the diagonal.
``max|ECP - alpha|`` over a FIXED grid of alpha bins is the summary; its sampling noise is large for
few observations, so it is always reported with its null distribution for the same
(n_obs, n_samples, alpha bins) (:func:`tarp_null`) and the p-value of the observed value under that
null (:func:`null_p_value`), which is the test. No confidence interval is given for the maximum: a
percentile bootstrap of a maximum of noisy deviations sits above the true value (for exact samplers
at 64 observations x 32 samples it missed it in every simulated set), and methods are not ranked by
overlapping intervals.

Normalisation (``norm``): ``"pooled"`` (default) maps each dimension by the min/max over ALL samples
and truths together. That map is a symmetric function of each observation's truth and samples, so
for exact posteriors the truth stays exchangeable with its samples and f_i is exactly uniform on
{0, 1/n, ..., 1} whatever the dimension. ``"truths"`` is the ``tarp`` package's ``norm=True`` (min/max
of the truths only): each truth then sits inside [0, 1] while its samples spill out, which biases f
towards 0 when observations are few and dimensions many (measured with calibrated Gaussians, null
p95 of max|ECP - alpha| at 10 bins and 32 samples: 0.80 instead of 0.40 for 8 observations x 256
dims; 0.275 instead of 0.21 for 32 observations). ``"none"`` uses raw coordinates.

All randomness comes from a ``numpy.random.Generator``; inputs are never modified.
Shapes: samples (n_obs, n_samples, d), truths (n_obs, d) (images are flattened by the caller).
"""

from __future__ import annotations

import numpy as np


NORMS = ("pooled", "truths", "none")


def normalise(samples: np.ndarray, truths: np.ndarray, mode: str = "pooled") -> tuple[np.ndarray, np.ndarray]:
    """Map every dimension to [0, 1] by the min/max of the samples and truths together (``pooled``)
    or of the truths only (``truths``, as ``tarp``). A constant dimension gets scale 1 (``tarp``
    divides by 1e-10 there, which lets such a dimension dominate every distance)."""
    if mode == "none":
        return samples, truths
    if mode == "pooled":
        lo = np.minimum(samples.min((0, 1)), truths.min(0))
        hi = np.maximum(samples.max((0, 1)), truths.max(0))
    elif mode == "truths":
        lo, hi = truths.min(0), truths.max(0)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {mode!r}")
    scale = np.where(hi - lo > 0, hi - lo, 1.0)
    return (samples - lo) / scale, (truths - lo) / scale


def tarp_credibility(samples, truths, *, rng: np.random.Generator | None = None, references=None,
                     norm: str = "pooled") -> np.ndarray:
    """Per-observation TARP credibility f_i in [0, 1] (n_obs,), float64.

    references: (n_obs, d) points in the (normalised) space, or None to draw them from ``rng``
    uniformly in [0, 1]^d, one per observation."""
    samples = np.asarray(samples, dtype=np.float64)
    truths = np.asarray(truths, dtype=np.float64)
    if samples.ndim != 3 or truths.ndim != 2 or samples.shape[0] != truths.shape[0] \
            or samples.shape[2] != truths.shape[1]:
        raise ValueError(f"samples must be (n_obs, n_samples, d) and truths (n_obs, d); got "
                         f"{samples.shape} and {truths.shape}")
    samples, truths = normalise(samples, truths, norm)
    if references is None:
        if rng is None:
            raise ValueError("give rng (numpy Generator) or references")
        references = rng.uniform(0.0, 1.0, size=truths.shape)
    references = np.asarray(references, dtype=np.float64)
    # squared distances are enough to compare; observations in chunks of ~64 MB of float64
    n_obs, n_s, d = samples.shape
    step = max(1, int(8e6 // max(1, n_s * d)))
    f = np.empty(n_obs)
    for i in range(0, n_obs, step):
        r = references[i:i + step]
        ds = ((samples[i:i + step] - r[:, None]) ** 2).sum(-1)
        dt = ((truths[i:i + step] - r) ** 2).sum(-1)
        f[i:i + step] = (ds < dt[:, None]).mean(1)
    return f


def alpha_grid(n_bins: int) -> np.ndarray:
    """The fixed credibility grid: n_bins + 1 edges from 0 to 1."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    return np.linspace(0.0, 1.0, int(n_bins) + 1)


def ecp_at(f: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """ECP(alpha) = fraction of f strictly below alpha, and 1 at alpha >= 1 (histogram convention:
    the last bin is closed)."""
    f = np.asarray(f, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    e = (f[None, :] < alpha[:, None]).mean(1)
    return np.where(alpha >= 1.0, 1.0, e)


def max_deviation(f: np.ndarray, n_bins: int) -> float:
    """max over the alpha grid of |ECP(alpha) - alpha|."""
    a = alpha_grid(n_bins)
    return float(np.max(np.abs(ecp_at(f, a) - a)))


def bootstrap_ecp(f: np.ndarray, n_bins: int, *, rng: np.random.Generator, n_boot: int = 500):
    """Resample observations (with their fixed references) with replacement.

    Returns (ecp_boot (n_boot, n_bins+1), max_dev_boot (n_boot,))."""
    f = np.asarray(f, dtype=np.float64)
    a = alpha_grid(n_bins)
    idx = rng.integers(0, f.size, size=(n_boot, f.size))
    ecp = np.stack([ecp_at(f[j], a) for j in idx])
    return ecp, np.abs(ecp - a).max(1)


def tarp_null(n_obs: int, n_samples: int, n_dims: int, *, n_bins: int, rng: np.random.Generator,
              n_sim: int = 300, max_dims: int = 256, norm: str = "pooled"):
    """Null distribution of ECP curves and of max|ECP - alpha| for calibrated posteriors.

    Each simulation draws n_obs Gaussian posteriors N(m_i, s_i^2 I) with random means and widths,
    a truth from each and n_samples draws from the same posterior (exact calibration), then runs
    the full TARP pipeline (normalisation, random references). With ``pooled`` (or no)
    normalisation the law of f_i is exactly uniform on {0, 1/n, ..., 1} whatever d (the truth is
    exchangeable with the samples), so capping the dimension at ``max_dims`` for speed changes
    nothing; with ``truths`` normalisation the null depends on d (pass max_dims=n_dims).
    Returns (ecp (n_sim, n_bins+1), max_dev (n_sim,))."""
    d = int(min(n_dims, max_dims))
    a = alpha_grid(n_bins)
    ecps = np.empty((n_sim, a.size))
    for k in range(n_sim):
        m = rng.normal(size=(n_obs, 1, d))
        s = rng.uniform(0.1, 0.5, size=(n_obs, 1, 1))
        draws = m + s * rng.normal(size=(n_obs, n_samples + 1, d))
        f = tarp_credibility(draws[:, 1:], draws[:, 0], rng=rng, norm=norm)
        ecps[k] = ecp_at(f, a)
    return ecps, np.abs(ecps - a).max(1)


def tarp_null_ranks(n_obs: int, n_samples: int, *, n_bins: int, rng: np.random.Generator,
                    n_sim: int = 2000):
    """The same null without simulating posteriors: f_i uniform on {0, 1/n, ..., 1}, which is the
    exact law of TARP's f for exact posteriors with pooled (or no) normalisation, whatever the
    dimension (:func:`tarp_null` checks it by simulation). Returns (ecp (n_sim, n_bins+1),
    max_dev (n_sim,))."""
    a = alpha_grid(n_bins)
    f = rng.integers(0, n_samples + 1, size=(n_sim, n_obs)) / n_samples
    ecp = (f[:, None, :] < a[None, :, None]).mean(2)
    ecp[:, a >= 1.0] = 1.0
    return ecp, np.abs(ecp - a).max(1)


def null_distribution(n_obs: int, n_samples: int, n_dims: int, *, n_bins: int, rng: np.random.Generator,
                      norm: str = "pooled", n_sim: int | None = None):
    """The null used by the calibration: exact rank law (2000 draws) for pooled/no normalisation,
    Gaussian simulation at the full dimension (300 draws) for ``truths`` normalisation, whose null
    depends on the dimension."""
    if norm == "truths":
        return tarp_null(n_obs, n_samples, n_dims, n_bins=n_bins, rng=rng, n_sim=n_sim or 300,
                         max_dims=n_dims, norm=norm)
    return tarp_null_ranks(n_obs, n_samples, n_bins=n_bins, rng=rng, n_sim=n_sim or 2000)


def null_p_value(observed: float, null_max_dev) -> float:
    """Fraction of null draws of max|ECP - alpha| at or above ``observed`` (ties count against the
    method, so a discrete statistic never gets a too-small p-value from them)."""
    null_max_dev = np.asarray(null_max_dev, dtype=np.float64).reshape(-1)
    if null_max_dev.size == 0:
        raise ValueError("empty null distribution")
    return float(np.mean(null_max_dev >= observed - 1e-12))


def tarp_summary(samples, truths, *, n_bins: int, rng: np.random.Generator, n_boot: int = 500,
                 n_null: int | None = None, band=(2.5, 97.5), null=None, norm: str = "pooled") -> dict:
    """Everything the calibration report needs for one method and set (JSON-serialisable).

    null: optional precomputed ``tarp_null(...)`` result (ecp, max_dev) for the same n_obs,
    n_samples and n_bins, so that several methods on the same set share one null distribution.

    Keys: alpha, ecp, ecp_band (pointwise bootstrap percentiles of ECP over observations),
    null_band (percentiles of null ECP), tarp_max_dev, tarp_p_value (:func:`null_p_value`),
    tarp_null_p50/p95, f (credibilities), n_obs, n_samples, n_alpha_bins, norm."""
    samples = np.asarray(samples)
    truths = np.asarray(truths)
    n_obs, n_s = samples.shape[:2]
    samples = samples.reshape(n_obs, n_s, -1)
    truths = truths.reshape(n_obs, -1)
    f = tarp_credibility(samples, truths, rng=rng, norm=norm)
    a = alpha_grid(n_bins)
    ecp = ecp_at(f, a)
    boot, _ = bootstrap_ecp(f, n_bins, rng=rng, n_boot=n_boot)
    if null is None:
        null = null_distribution(n_obs, n_s, truths.shape[1], n_bins=n_bins, rng=rng, norm=norm, n_sim=n_null)
    null_ecp, null_dev = null
    if null_ecp.shape[1] != a.size:
        raise ValueError("null distribution was computed for another number of alpha bins")
    dev = float(np.abs(ecp - a).max())
    return {
        "alpha": a.tolist(),
        "ecp": ecp.tolist(),
        "ecp_band": np.percentile(boot, band, axis=0).tolist(),
        "null_band": np.percentile(null_ecp, band, axis=0).tolist(),
        "tarp_max_dev": dev,
        "tarp_p_value": null_p_value(dev, null_dev),
        "tarp_null_p50": float(np.percentile(null_dev, 50)),
        "tarp_null_p95": float(np.percentile(null_dev, 95)),
        "f": f.tolist(),
        "n_obs": int(n_obs),
        "n_samples": int(n_s),
        "n_alpha_bins": int(n_bins),
        "norm": norm,
    }
