"""Calibration figures per group of observations: by source kind and by signal-to-noise of the data.

A set's pooled coverage can meet the exact-sampler level while groups of it sit on either side: a
posterior too narrow on faint sources and too wide on bright ones averages out in the pooled figure.
So the calibration summary also splits a set by the observations' source kind (``SRCKIND``, held-out
sets) and into quartiles of the data's signal-to-noise (:func:`pipeline.metrics.chi2.data_snr`).

The SNR groups must be a function of the data alone. Exact samples are calibrated given y, hence in any
group defined from y; a group defined from the truth (its noiseless peak, its flux) selects truths from
one side of their posteriors: for exact samples of a Gaussian source whose flux the data constrain weakly,
the truth-peak quartiles cover 0.58 / 0.78 / 0.81 / 0.62 at 68 % against the exact level 0.70, while the
data-SNR quartiles cover 0.71 / 0.69 / 0.67 / 0.71 (2,000 observations x 32 samples, standard error 0.012
per quartile; tests/evaluation/test_groups.py).
"""

from __future__ import annotations

import numpy as np

from pipeline.metrics.coverage import interval_coverage

# SNR groups of near-equal size; a set needs at least this many observations to be split
SNR_GROUPS = 4


def median_or_none(values, nan_ok: bool = False):
    """Median of the non-None values (NaN-ignoring with ``nan_ok``), None when there are none."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if nan_ok:
        v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def per_kind_summary(kinds: list, per_obs: dict, samples: np.ndarray, truths: np.ndarray) -> dict:
    """Held-out figures per source kind (the observation's ``SRCKIND``): observations, median chi2_nu
    of the samples and of the truths (image and arc), mean error [source units] and per-pixel coverage
    at 68 / 95 % (beside the same exact-sampler level as the whole set)."""
    out = {}
    for kind in sorted({k for k in kinds if k is not None}):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        cov = interval_coverage(samples[idx], truths[idx], levels=(0.68, 0.95))
        out[kind] = {
            "n_obs": len(idx),
            "chi2_median": median_or_none([per_obs["chi2_median"][i] for i in idx]),
            "chi2_arc_median": median_or_none([per_obs["chi2_arc_median"][i] for i in idx], nan_ok=True),
            "truth_chi2_median": median_or_none([per_obs["truth_chi2"][i] for i in idx]),
            "truth_chi2_arc_median": median_or_none([per_obs["truth_chi2_arc"][i] for i in idx], nan_ok=True),
            "mean_err": float(np.mean([per_obs["mean_err"][i] for i in idx])),
            "coverage68": cov[0.68],
            "coverage95": cov[0.95],
        }
    return out


def snr_groups(per_obs: dict, snr, groups: int = SNR_GROUPS) -> list[dict]:
    """Per SNR group (observations sorted by ``snr`` and split into ``groups`` of near-equal size):
    {snr_min, snr_max (dimensionless), n_obs, coverage68, coverage95 (the mean of the group's
    per-observation coverages), chi2_arc_median, truth_chi2_arc_median (medians of the per-observation
    values)}. ``per_obs``: a method's per-observation fields (``coverage68``, ``coverage95``,
    ``chi2_arc_median``; ``truth_chi2_arc`` when present)."""
    snr = np.asarray(snr, dtype=float)
    c68, c95 = np.asarray(per_obs["coverage68"], float), np.asarray(per_obs["coverage95"], float)
    if not len(snr) == len(c68) == len(c95) == len(per_obs["chi2_arc_median"]):
        raise ValueError(f"{len(snr)} SNRs for {len(c68)} per-observation coverages")
    if not 1 <= groups <= len(snr):
        raise ValueError(f"groups must be in [1, {len(snr)}], got {groups}")
    truth_arc = per_obs.get("truth_chi2_arc") or [None] * len(snr)
    rows = []
    for idx in np.array_split(np.argsort(snr, kind="stable"), groups):
        rows.append({"snr_min": float(snr[idx].min()), "snr_max": float(snr[idx].max()), "n_obs": int(len(idx)),
                     "coverage68": float(c68[idx].mean()), "coverage95": float(c95[idx].mean()),
                     "chi2_arc_median": median_or_none([per_obs["chi2_arc_median"][i] for i in idx], nan_ok=True),
                     "truth_chi2_arc_median": median_or_none([truth_arc[i] for i in idx], nan_ok=True)})
    return rows
