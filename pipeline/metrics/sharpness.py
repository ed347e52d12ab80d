"""Sharpness beside coverage: a sampler that ignores y is calibrated, so report how much narrower
the posterior is than the prior and how far its mean is from the truth.

Both are computed from the equally weighted returned samples (:func:`sample_moments`), like coverage
and TARP, never from a file's MEAN/STD (for particle methods those are weighted moments of all
particles, a different estimator).

- ``sharpness`` per observation = sqrt(mean_pixels Var_post) / sqrt(mean_pixels Var_prior): the
  RMS posterior std over the RMS prior std (a ratio of pixel-averaged variances, so pixels where
  the prior std is ~0, e.g. empty corners, cannot blow it up). 1 = no information gained.
- ``mean_error`` per observation = RMS over pixels of (posterior mean - truth), in the units of the
  samples (source surface brightness, the posterior file's BUNIT).
"""

from __future__ import annotations

import numpy as np


def sample_moments(samples) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std (ddof = 1, unbiased variance) of equally weighted samples
    (n_obs, n, *pix) -> two (n_obs, *pix) float64 arrays, in the samples' units."""
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim < 2 or s.shape[1] < 2:
        raise ValueError(f"need (n_obs, n >= 2, ...) samples for a std, got {s.shape}")
    return s.mean(1), s.std(1, ddof=1)


def prior_std_map(prior_samples) -> np.ndarray:
    """Per-pixel std (*pix) of prior draws (n, *pix)."""
    p = np.asarray(prior_samples, dtype=np.float64)
    if p.shape[0] < 2:
        raise ValueError("need at least 2 prior samples for a std")
    return p.std(0, ddof=1)


def sharpness(post_std, prior_std) -> np.ndarray:
    """post_std (n_obs, *pix) or (*pix); prior_std (*pix). Returns (n_obs,) or a scalar array."""
    post = np.asarray(post_std, dtype=np.float64)
    prior = np.asarray(prior_std, dtype=np.float64)
    axes = tuple(range(post.ndim - prior.ndim, post.ndim))
    den = np.sqrt(np.mean(prior ** 2))
    if not den > 0:
        raise ValueError("prior std is zero everywhere")
    return np.sqrt(np.mean(post ** 2, axis=axes)) / den


def mean_error(post_mean, truths) -> np.ndarray:
    """RMS over pixels of (posterior mean - truth), per observation (n_obs,)."""
    m = np.asarray(post_mean, dtype=np.float64)
    t = np.asarray(truths, dtype=np.float64)
    return np.sqrt(((m - t) ** 2).reshape(m.shape[0], -1).mean(1))
