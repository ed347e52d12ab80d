"""Sharpness beside coverage (DESIGN section 8): a sampler that ignores y is calibrated, so report
how much narrower the posterior is than the prior and how far its mean is from the truth.

- ``sharpness`` per observation = sqrt(mean_pixels Var_post) / sqrt(mean_pixels Var_prior): the
  RMS posterior std over the RMS prior std (a ratio of pixel-averaged variances, so pixels where
  the prior std is ~0, e.g. empty corners, cannot blow it up). 1 = no information gained.
- ``mean_error`` per observation = RMS over pixels of (posterior mean - truth), in image units.
"""

from __future__ import annotations

import numpy as np


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
