"""Calibration of lens-parameter posteriors over a set of observations with known lenses.

For n_obs observations, S posterior samples of the p lens parameters each, and the true parameters:

* **coverage** per parameter of the central mid-rank intervals (:mod:`pipeline.metrics.coverage`),
  with the level an exact sampler reaches at S samples (23/33 for 68 % and 31/33 for 95 % at S = 32)
  and the central 99.9 % binomial band of the fraction around it for n_obs observations: the band an
  exact sampler's coverage falls in 99.9 % of the time;
* **bias** per parameter: the mean over observations of z = (sample mean - truth) / sample std,
  dimensionless. For exact samples of a Gaussian posterior, z = sqrt(1 + 1/S) T with T Student-t on
  S - 1 degrees of freedom (the truth is one more draw from the posterior), so sd(z) =
  sqrt((1 + 1/S) (S - 1) / (S - 3)), 1.05 at S = 32, not 1; the band is +- 3.29 sd(z) / sqrt(n_obs),
  3.29 the two-sided 99.9 % normal quantile;
* **TARP** over the p parameters jointly (:func:`pipeline.metrics.tarp.tarp_summary`, pooled
  normalisation, so each parameter's units drop out), with its null for the same n_obs and S.

``ok`` asks every band and TARP (p-value >= 0.05) at once, so an exact sampler fails it about 6 % of
the time with 3 parameters (TARP's 5 % plus 0.1 % per band), more with more parameters. The bias band
is exact for Gaussian posteriors; for skewed ones sd(z) is a little larger (1.06 for a half-normal,
1.14 for an exponential, by simulation). The position angle phi is treated as a line: its rank-based
coverage stays valid, but its bias means little for a posterior that wraps around 0 / pi.

Samples (n_obs, S, p) and truths (n_obs, p) in the parameters' own units (arcsec, rad, ...).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from pipeline.metrics.coverage import exact_coverage_level, interval_coverage
from pipeline.metrics.tarp import tarp_summary

BAND_TAIL = 0.0005          # each tail of the 99.9 % bands
_Z = float(stats.norm.isf(BAND_TAIL))


def exact_coverage_band(n_obs: int, n_samples: int, level: float) -> tuple[float, float, float]:
    """(lo, reference, hi): an exact sampler's expected coverage at ``level`` with ``n_samples`` samples,
    and the central 99.9 % binomial band of its observed fraction over ``n_obs`` observations."""
    ref = exact_coverage_level(n_samples, level)
    lo = stats.binom.ppf(BAND_TAIL, n_obs, ref) / n_obs
    hi = stats.binom.isf(BAND_TAIL, n_obs, ref) / n_obs
    return float(lo), ref, float(min(hi, 1.0))


def exact_bias_sd(n_samples: int) -> float:
    """sd of (sample mean - truth) / sample std for S exact samples of a Gaussian posterior (S >= 4)."""
    s = int(n_samples)
    return math.sqrt((1 + 1 / s) * (s - 1) / (s - 3))


def lens_calibration(samples, truths, names: list[str], *, rng: np.random.Generator, levels=(0.68, 0.95),
                     n_bins: int = 10) -> dict:
    """Per-parameter coverage (with exact-sampler bands) and bias, and TARP over all parameters.

    Returns ``{"n_obs", "n_samples", "parameters": {name: {"coverage": {level: value}, "band": {level: [lo,
    ref, hi]}, "bias", "bias_band", "ok"}}, "tarp": tarp_summary(...), "ok"}``; ``ok`` is True when every
    coverage and bias lies in its band and the TARP p-value is at least 0.05."""
    samples = np.asarray(samples, dtype=np.float64)
    truths = np.asarray(truths, dtype=np.float64)
    if samples.ndim != 3 or truths.shape != (samples.shape[0], samples.shape[2]) or samples.shape[2] != len(names):
        raise ValueError(f"need samples (n_obs, S, {len(names)}) and truths (n_obs, {len(names)}), "
                         f"got {samples.shape} and {truths.shape}")
    n_obs, n_s, _ = samples.shape
    if n_s < 4:
        raise ValueError("lens calibration needs at least 4 samples per observation")
    bias_band = _Z * exact_bias_sd(n_s) / math.sqrt(n_obs)
    params, all_ok = {}, True
    for j, name in enumerate(names):
        cov = interval_coverage(samples[:, :, j], truths[:, j], levels=levels)
        bands = {float(c): exact_coverage_band(n_obs, n_s, c) for c in levels}
        std = samples[:, :, j].std(1, ddof=1)
        z = (samples[:, :, j].mean(1) - truths[:, j]) / np.where(std > 0, std, np.nan)
        bias = float(np.nanmean(z))
        ok = all(bands[c][0] <= cov[c] <= bands[c][2] for c in bands) and abs(bias) <= bias_band
        all_ok &= ok
        params[name] = {"coverage": cov, "band": {c: list(b) for c, b in bands.items()}, "bias": bias,
                        "bias_band": bias_band, "ok": bool(ok)}
    tarp = tarp_summary(samples, truths, n_bins=n_bins, rng=rng)
    tarp.pop("f")
    all_ok &= tarp["tarp_p_value"] >= 0.05
    return {"n_obs": int(n_obs), "n_samples": int(n_s), "parameters": params, "tarp": tarp, "ok": bool(all_ok)}
