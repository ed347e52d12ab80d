"""Acceptance checks on calibration summaries (one row: a method on a set, as
:func:`pipeline.evaluation.calibration.evaluate_method` writes it), read by the report.

Prior-drawn set: TARP inside its exact-sampler null's 95th percentile, the median chi2_nu over the image
and in the arc inside CHI2_RANGE, and the 68 / 95 % pixel coverage within a Student-t bound of standard
errors of the exact-sampler level. Held-out set: the median chi2_nu bounded by the truths' own, TARP, and
an RMS error of the posterior mean below every baseline row's (a ``baselines:`` run on the same set).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import t as student_t

CHI2_RANGE = (0.8, 1.25)  # acceptance band for the median chi2_nu (image and arc) on the prior-drawn set
COVERAGE_CONFIDENCE = 0.99  # two-sided: |coverage - exact level| / se within Student's t at this level
HELDOUT_CHI2 = (0.8, 1.3, 1.1)  # held-out median chi2_nu: >= 0.8 and <= max(1.3, 1.1 x the truths' own)


def tarp_ok(r: dict) -> bool:
    """max|ECP - alpha| at or below the 95th percentile of its exact-sampler null."""
    return (r.get("tarp_max_dev") is not None and r.get("tarp_null_p95") is not None
            and r["tarp_max_dev"] <= r["tarp_null_p95"])


def coverage_threshold(n_obs: int) -> float:
    """How many standard errors |coverage - exact level| may reach: the two-sided COVERAGE_CONFIDENCE
    quantile of Student's t with n_obs - 1 degrees of freedom (the se comes from n_obs per-observation
    coverages): 2.66 at 64 observations, 2.95 at 16, near the normal 2.58 for many."""
    return float(student_t.ppf(0.5 + COVERAGE_CONFIDENCE / 2, max(int(n_obs) - 1, 1)))


def coverage_ok(r: dict):
    """Pixel coverage at 68 and 95 % within :func:`coverage_threshold` standard errors of the exact-sampler
    level (the summary's ``coverage68``, ``coverage68_ref``, ``coverage68_se`` and the 95 % forms). A zero
    se (every observation covered alike, e.g. samples all equal or absurdly wide) passes only at the exact
    level itself; None when an se is missing (one observation)."""
    limit = coverage_threshold(r.get("n_obs") or 1)
    verdicts = []
    for key in ("coverage68", "coverage95"):
        v, ref, se = r.get(key), r.get(key + "_ref"), r.get(key + "_se")
        if v is None or ref is None or se is None:
            return None
        verdicts.append(abs(v - ref) <= limit * se if se > 0 else abs(v - ref) < 1e-12)
    return all(verdicts)


def acceptance(r: dict) -> dict:
    """Acceptance checks for one method on the prior-drawn set: TARP inside its null p95, the median
    chi2_nu over the image and in the arc inside CHI2_RANGE, and :func:`coverage_ok`."""
    lo, hi = CHI2_RANGE
    chi_ok = all(r.get(k) is not None and lo <= r[k] <= hi for k in ("chi2_median", "chi2_arc_median"))
    return {"tarp": tarp_ok(r), "chi2": chi_ok, "coverage": coverage_ok(r)}


def heldout_acceptance(r: dict, baselines: dict) -> dict:
    """Acceptance checks for one method on the held-out set: the median chi2_nu over the image and in
    the arc at least HELDOUT_CHI2[0] and at most max(HELDOUT_CHI2[1], HELDOUT_CHI2[2] x the truths' own,
    which exceed 1 where the inference grid cannot represent the source), TARP inside its null p95, and
    the RMS error of the posterior mean below every baseline's on the same set (``baselines``: name ->
    summary entry; ``rms`` is None without baselines)."""
    lo, floor, factor = HELDOUT_CHI2
    chi_ok = True
    for key, truth_key in (("chi2_median", "truth_chi2_median"), ("chi2_arc_median", "truth_chi2_arc_median")):
        v, t = r.get(key), r.get(truth_key)
        hi = floor if t is None else max(floor, factor * t)
        chi_ok = chi_ok and v is not None and lo <= v <= hi
    errs = [b.get("mean_err") for b in baselines.values()]
    rms = (None if not errs or r.get("mean_err") is None or None in errs
           else all(r["mean_err"] < e for e in errs))
    return {"chi2": chi_ok, "tarp": tarp_ok(r), "rms": rms}


def paired_difference(r: dict, b: dict):
    """(mean, standard error, n) over the observations both summary rows share of r's per-observation RMS
    error minus b's (``per_obs.mean_err`` paired by ``observations``); None when fewer than two are shared."""
    err_r = dict(zip(r.get("observations") or [], (r.get("per_obs") or {}).get("mean_err") or []))
    err_b = dict(zip(b.get("observations") or [], (b.get("per_obs") or {}).get("mean_err") or []))
    d = np.array([err_r[o] - err_b[o] for o in err_r if o in err_b], dtype=np.float64)
    if d.size < 2:
        return None
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), int(d.size)
