"""The classic regularised inversion beside RTB, per calibration set: one paragraph of the report.

Both methods sample the same observations on the same source grid and operator. The comparison uses
the calibration summary of each (:func:`pipeline.evaluation.calibration.evaluate_method`): RMS error of
the posterior mean, median chi2_nu over the image and in the arc (against the truths' own, the level an
exact sampler reaches), per-pixel 68 / 95 % coverage (against the exact-sampler level for the same
number of samples), and log Z per lens. The two log Z are evidences of the same data under two different
source priors (the diffusion prior chain and the Gaussian regularisation prior), so the higher one is
the prior the data prefer; the inversion's is exact (marginalised over its two regularisation weights,
:mod:`pipeline.samplers.inversion`), RTB's are the ELBO (a lower bound) and the importance-weighted
estimate (a lower bound in expectation).
"""

from __future__ import annotations

import math

INVERSION = "inversion"
RTB_ORDER = ("rtb_amortized", "rtb_amortized_is", "rtb_amortized_smc", "rtb_amortized_gn", "rtb")


def _median(values):
    v = sorted(x for x in values if x is not None and math.isfinite(x))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def _logz_list(r: dict, key: str) -> list:
    return [(z or {}).get(key) for z in (r.get("logz") or [])]


def count_higher(a: list, b: list) -> tuple[int, int]:
    """(number of lenses where a > b, number where both are known), lens by lens."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return sum(x > y for x, y in pairs), len(pairs)


def _cov_gap(r: dict) -> float | None:
    """Summed |coverage - exact-sampler level| at 68 and 95 % (0 = as an exact sampler)."""
    try:
        return abs(r["coverage68"] - r["coverage68_ref"]) + abs(r["coverage95"] - r["coverage95_ref"])
    except (KeyError, TypeError):
        return None


def _winner(name: str, a, b, lower_is_better: bool = True) -> tuple[str, str] | None:
    """(criterion, winning method) for values a (RTB) and b (inversion); None when either is unknown or tied."""
    if a is None or b is None or a == b:
        return None
    rtb_wins = (a < b) if lower_is_better else (a > b)
    return name, ("rtb" if rtb_wins else INVERSION)


def _f(v, nd=3) -> str:
    return "n/a" if v is None else f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.1f}"


def inversion_paragraph(set_name: str, methods: dict) -> str | None:
    """The comparison paragraph of one set, or None when the set lacks the inversion or an RTB method."""
    rtb = next((m for m in RTB_ORDER if m in methods), None)
    if INVERSION not in methods or rtb is None:
        return None
    r, v = methods[rtb], methods[INVERSION]
    truth = (r.get("truth_chi2_median"), r.get("truth_chi2_arc_median"))
    gap = [None if t is None or x is None else abs(x - t)
           for x, t in ((r.get("chi2_median"), truth[0]), (v.get("chi2_median"), truth[0]),
                        (r.get("chi2_arc_median"), truth[1]), (v.get("chi2_arc_median"), truth[1]))]
    z_inv = _logz_list(v, "iw")
    up_iw, n_iw = count_higher(z_inv, _logz_list(r, "iw"))
    up_elbo, n_elbo = count_higher(z_inv, _logz_list(r, "elbo"))
    wins = [w for w in (_winner("RMS error of the posterior mean", r.get("mean_err"), v.get("mean_err")),
                        _winner("chi2_nu over the image (closeness to the truths')", gap[0], gap[1]),
                        _winner("chi2_nu in the arc (closeness to the truths')", gap[2], gap[3]),
                        _winner("coverage (closeness to the exact-sampler level)", _cov_gap(r), _cov_gap(v)),
                        _winner("median log Z (inversion's exact value against RTB's IW estimate)",
                                _median(_logz_list(r, "iw")), _median(z_inv), lower_is_better=False))
            if w is not None]
    inv_wins = [c for c, w in wins if w == INVERSION]
    rtb_wins = [c for c, w in wins if w == "rtb"]
    cov = (lambda m: f"{_f(m.get('coverage68'))} / {_f(m.get('coverage95'))}")
    return (
        f"**{set_name}**, `{rtb}` against `inversion` ({r.get('n_obs')} lenses): RMS error of the posterior mean "
        f"{_f(r.get('mean_err'))} against {_f(v.get('mean_err'))}; median chi2_nu over the image "
        f"{_f(r.get('chi2_median'))} against {_f(v.get('chi2_median'))} and in the arc "
        f"{_f(r.get('chi2_arc_median'))} against {_f(v.get('chi2_arc_median'))} (the truths' own: "
        f"{_f(truth[0])} and {_f(truth[1])}); 68 / 95 % coverage {cov(r)} against {cov(v)} (an exact sampler: "
        f"{_f(r.get('coverage68_ref'))} / {_f(r.get('coverage95_ref'))}); median log Z: the inversion's exact "
        f"evidence {_f(_median(z_inv), 6)} against RTB's ELBO {_f(_median(_logz_list(r, 'elbo')), 6)} and IW "
        f"estimate {_f(_median(_logz_list(r, 'iw')), 6)} nats; the inversion's is higher than RTB's IW estimate "
        f"on {up_iw} of {n_iw} lenses and than its ELBO on {up_elbo} of {n_elbo}. "
        f"The inversion wins on: {'; '.join(inv_wins) or 'none of these'}. "
        f"RTB wins on: {'; '.join(rtb_wins) or 'none of these'}.")


INVERSION_NOTE = (
    "`inversion` is the classic regularised pixelated linear inversion on the same source grid and operator: "
    "a Gaussian source prior with gradient regularisation plus a small zeroth-order term, its two weights chosen "
    "by the exact Bayesian evidence, exact posterior samples. Its log Z is the exact evidence marginalised over "
    "the two weights under a log-uniform hyperprior; the evidence at the best weights (type-II maximum, in each "
    "posterior file as LOGZT2) is higher by the Occam factor of the tuned weights. The two log Z are evidences of "
    "the same data under different source priors: the higher one is the prior the data prefer. RTB's ELBO is a "
    "lower bound and its IW estimate a lower bound in expectation, so a lens where the inversion's evidence is "
    "higher may still favour the diffusion prior.")
